"""The two-stage query (attribution/two_stage.py, ``musicattr query --exact_top M``): the exact rows are the exact
Eq. 1 of ``attribute`` for those items (from an unlearned file and from a query gradient), with M = N every row is
exact and ranked as exact Eq. 1 ranks, and the ``exact`` column marks the candidates of a checked scores table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_scores_close, build_fisher_setup, chdir, score_tolerance, stage_trainer
from musicattr.attribution.index import IndexModule
from musicattr.attribution.query import open_query, run_query
from musicattr.attribution.score import ScoringModule
from musicattr.attribution.scores_table import check_scores_table
from musicattr.attribution.unlearn import load_unlearned, run_unlearn
from musicattr.data.datamodules import StorePredictDataModule
from musicattr.data.latent_store import LatentStore

N_ITEMS, T, K, LR = 12, 4, 6, 1e-5  # lr 1e-5: scores well above the float error of the tiny model's losses


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A store, theta0, its Fisher, a sketched index (k = 256, T draws; it fills the baseline cache), item 3
    unlearned by `unlearn` and that file's exact Eq. 1 by `attribute` (relative)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("two_stage")
    build_fisher_setup(d, N_ITEMS)
    with chdir(d):
        stage_trainer().predict(IndexModule("theta0.ckpt", "fisher.safetensors", "index", num_draws=T, k=256,
                                            flush_every=1), datamodule=StorePredictDataModule("store", 5))
        run_unlearn("theta0.ckpt", "fisher.safetensors", "q3.safetensors", query_item="3", store="store", lr=LR,
                    num_draws=K)
        stage_trainer().predict(ScoringModule("theta0.ckpt", "q3.safetensors", "exact", num_draws=T, relative=True,
                                              use_baseline_cache=False), datamodule=StorePredictDataModule("store", 4))
    return d


def query(work, out, **kw) -> list[dict]:
    args = {"index": str(work / "index"), "checkpoint": str(work / "theta0.ckpt"),
            "fisher": str(work / "fisher.safetensors"), "out_dir": str(out), "store": str(work / "store"), "lr": LR,
            "num_draws": K, "top_k": 0, **kw}
    return run_query(**args)


def table(summary, q: int = 0) -> pd.DataFrame:
    return pd.read_parquet(Path(summary[q]["folder"]) / "scores.parquet")


def exact_eq1(work) -> pd.DataFrame:
    return pd.read_parquet(work / "exact" / "scores.parquet").set_index("index")


def assert_exact_rows_are_eq1(df: pd.DataFrame, exact: pd.DataFrame) -> None:
    rows = df[df["exact"]].set_index("index")
    ref = exact.loc[rows.index]
    losses = ref["baseline_loss"]
    assert_scores_close(rows["score"], ref["score"], losses)
    assert_scores_close(rows["score_se"], ref["score_se"], losses)
    assert_scores_close(rows["unlearned_loss"], ref["unlearned_loss"], losses)
    assert_scores_close(rows["baseline_loss"], ref["baseline_loss"], losses)
    np.testing.assert_allclose(rows["sensitivity"], ref["sensitivity"], rtol=1e-6)
    np.testing.assert_allclose(rows["relative_score"], rows["score"] / rows["sensitivity"], rtol=1e-12)


def test_exact_rows_equal_attribute_from_an_unlearned_file(work, tmp_path):
    summary = query(work, tmp_path, unlearned=[str(work / "q3.safetensors")], exact_top=3)
    df = table(summary)
    assert 3 <= df["exact"].sum() <= 6
    assert_exact_rows_are_eq1(df, exact_eq1(work))
    run = json.loads((Path(summary[0]["folder"]) / "run.json").read_text())
    two = run["two_stage"]
    assert run["exact_top"] == two["exact_top"] == 3 and two["num_draws"] == T and two["seed"] == 0
    assert two["baseline_cache"] is not None and two["forwards"] == df["exact"].sum() * T  # theta0 side cached
    assert two["candidates"] == df["exact"].sum() and not two["reused"]


def test_exact_rows_equal_attribute_from_a_query_gradient(work, tmp_path):
    """theta' = theta0 + P^1/2 psi is `unlearn`'s Eq. 2 step: the same weights to float32 rounding, the same rows."""
    ctx = open_query(str(work / "index"), str(work / "theta0.ckpt"), str(work / "fisher.safetensors"),
                     str(work / "store"))
    step: dict[str, torch.Tensor] = {}
    ctx.projected_query(query_item="3", lr=LR, num_draws=K, seed=0, strategy="mixed", step=step)
    unlearned, _ = load_unlearned(str(work / "q3.safetensors"))
    assert set(step) == set(unlearned)
    for name, v in unlearned.items():
        np.testing.assert_allclose(step[name].numpy(), v.numpy(), rtol=2 * float(torch.finfo(v.dtype).eps), atol=0)
    summary = query(work, tmp_path, query_items=["index:3"], exact_top=4)
    df = table(summary)
    assert_exact_rows_are_eq1(df, exact_eq1(work))
    assert json.loads((Path(summary[0]["folder"]) / "run.json").read_text())["two_stage"]["theta_unlearned"] \
        .startswith("theta0 + P^1/2 psi")


def test_every_row_exact_when_m_is_n_ranks_as_exact_eq1(work, tmp_path):
    df = table(query(work, tmp_path, unlearned=[str(work / "q3.safetensors")], exact_top=N_ITEMS))
    exact = exact_eq1(work)
    assert df["exact"].all() and len(df) == N_ITEMS
    assert_exact_rows_are_eq1(df, exact)
    gaps = np.diff(np.sort(exact["score"].to_numpy()))
    assert gaps.min() > 2 * score_tolerance(exact["baseline_loss"])  # no tie within rounding: ranks are defined
    assert list(df.sort_values("rank")["index"]) == list(exact.sort_values("rank").index)
    assert list(df.sort_values("relative_rank")["index"]) == list(exact.sort_values("relative_rank").index)


def test_exact_column_marks_the_candidates_ranked_first(work, tmp_path):
    store_ids = LatentStore(work / "store").items["item_id"]
    f = str(work / "q3.safetensors")
    index_only = table(query(work, tmp_path / "index", unlearned=[f], relative=False))
    summary = query(work, tmp_path / "two", unlearned=[f], exact_top=4, relative=False)
    path = Path(summary[0]["folder"]) / "scores.parquet"
    df = check_scores_table(pd.read_parquet(path), path, item_ids=store_ids)
    assert df["exact"].dtype == bool and df["exact"].sum() == 4
    # the candidates are the index's top 4; they take ranks 1..4 by exact score, the rest keep the index's order
    assert set(df.loc[df["exact"], "index"]) == set(index_only.nsmallest(4, "rank")["index"])
    assert (df["rank"].to_numpy() == np.arange(1, N_ITEMS + 1)).all() and df["exact"].head(4).all()
    assert (np.diff(df["score"].head(4)) <= 0).all() and (np.diff(df["score"].iloc[4:]) <= 0).all()
    rest = index_only.set_index("index").loc[df["index"].iloc[4:]]
    np.testing.assert_array_equal(df["score"].iloc[4:], rest["score"])
    assert df.loc[~df["exact"], "score_se"].isna().all() and df.loc[df["exact"], "score_se"].notna().all()
    # relative on: the top 4 by tau^ and the top 4 by tau^ / s
    rel = table(query(work, tmp_path / "rel", unlearned=[f], exact_top=4))
    idx_rel = table(query(work, tmp_path / "index-rel", unlearned=[f]))
    want = set(idx_rel.nsmallest(4, "rank")["index"]) | set(idx_rel.nsmallest(4, "relative_rank")["index"])
    assert set(rel.loc[rel["exact"], "index"]) == want
    assert set(rel.nsmallest(len(want), "relative_rank")["index"]) == want
    # a head of 6 with M = 3: the index's top 6, 3 of them exact, ranked first
    head = table(query(work, tmp_path / "head", unlearned=[f], exact_top=3, head=6, relative=False))
    check_scores_table(head, "head")
    assert len(head) == 6 and head["exact"].sum() == 3 and head["exact"].head(3).all()
    assert set(head["index"]) == set(index_only.nsmallest(6, "rank")["index"])


def test_rerun_reuses_the_exact_rows_and_m_below_one_is_refused(work, tmp_path):
    f = str(work / "q3.safetensors")
    first = table(query(work, tmp_path, unlearned=[f], exact_top=2))
    summary = query(work, tmp_path, unlearned=[f], exact_top=2)
    assert json.loads((Path(summary[0]["folder"]) / "run.json").read_text())["two_stage"]["reused"]
    pd.testing.assert_frame_equal(table(summary), first)
    with pytest.raises(ValueError, match="exact_top = 0"):
        query(work, tmp_path, unlearned=[f], exact_top=0)


def test_similarity_proposer_adds_exact_rows_the_index_ranks_last(work, tmp_path):
    """similar_top M_s: compare's all-against-all table beside the unlearned file proposes its top M_s; the index's
    bottom items proposed that way become exact rows equal to exact Eq. 1, in the full table and in a head."""
    import shutil

    from musicattr.attribution.similar_candidates import SimilarityUnavailableError

    qdir = tmp_path / "q3"
    qdir.mkdir()
    f = str(shutil.copy(work / "q3.safetensors", qdir / "unlearned.safetensors"))
    index_only = table(query(work, tmp_path / "index", unlearned=[f]))
    last3 = set(index_only.nlargest(3, "rank")["index"].astype(int))  # the index's bottom 3 by tau^
    sim = index_only.assign(score=-index_only["score"])[["index", "score"]]  # similarity ranks them first
    sim.to_parquet(qdir / "all-against-all.parquet")
    top2 = set(index_only.nsmallest(2, "rank")["index"]) | set(index_only.nsmallest(2, "relative_rank")["index"])
    for kw in ({}, {"head": 3}):
        summary = query(work, tmp_path / f"sim{len(kw)}", unlearned=[f], exact_top=2, similar_top=3, **kw)
        df = table(summary)
        assert set(df.loc[df["exact"], "index"].astype(int)) == top2 | last3
        assert_exact_rows_are_eq1(df, exact_eq1(work))
        assert df["exact"].head(len(top2 | last3)).all() and (len(df) == N_ITEMS or kw)
        two = json.loads((Path(summary[0]["folder"]) / "run.json").read_text())["two_stage"]
        assert two["similar_top"] == 3 and two["similar_added"] == len(last3 - top2)
        assert two["similarity_source"].endswith("all-against-all.parquet")
    with pytest.raises(ValueError, match="fix: set exact_top"):
        query(work, tmp_path / "bad", unlearned=[f], similar_top=3)
    (qdir / "all-against-all.parquet").unlink()  # no table and no audio of item 3: the error names the fix
    with pytest.raises(SimilarityUnavailableError, match="run `musicattr compare`"):
        query(work, tmp_path / "none", unlearned=[f], exact_top=2, similar_top=3)
    sim.iloc[:-1].to_parquet(qdir / "all-against-all.parquet")  # a table of other items is refused
    with pytest.raises(SimilarityUnavailableError, match="not a similarity table of this store"):
        query(work, tmp_path / "short", unlearned=[f], exact_top=2, similar_top=3)
