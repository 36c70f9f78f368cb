"""The index ensemble (attribution/ensemble.py, counterfactual/ensemble_members.py, ensemble_stage.py): the mean of
the members' raw scores matched by item id, one member gives that member's table, bad input names the file and the
fix; on a tiny compare run each member's table is `musicattr query`'s answer at that member, the ensemble table is
their mean, the registry and the benchmark's reader find it, and a rerun scores nothing again."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import chdir, make_compare_run, make_module, make_store, save_checkpoint, stage_trainer
from musicattr.attribution.ensemble import (EnsembleError, ensemble_mean, ensemble_table, read_member_scores,
                                            write_ensemble_table)
from musicattr.attribution.methods import resolve_methods
from musicattr.attribution.scores_table import COLUMNS, read_scores_table, scores_table
from musicattr.counterfactual.ensemble_members import Member, parse_members

N = 8


def items(n: int = N) -> pd.DataFrame:
    return pd.DataFrame({"index": np.arange(n), "item_id": [f"audio/t{i:02d}.wav" for i in range(n)],
                         "caption": [f"c{i}" for i in range(n)], "file_name": [f"audio/t{i:02d}.wav" for i in range(n)],
                         "duration_s": np.ones(n), "valid_frames": np.full(n, 16)})


def member_file(path, score, shuffle_seed: int | None = None):
    df = scores_table(items(), score, "index", "q000")
    if shuffle_seed is not None:  # another row order: the ensemble must match members by item id
        df = df.sample(frac=1.0, random_state=shuffle_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


# ---------------------------------------------------------------- the mean


def test_one_member_ensemble_is_that_members_table(tmp_path):
    s = np.random.default_rng(0).standard_normal(N)
    a = member_file(tmp_path / "a.parquet", s, shuffle_seed=3)
    df = write_ensemble_table(tmp_path / "ens" / "scores.parquet", items(), [a], "q000", ["member-0"])
    member = pd.read_parquet(a).set_index("item_id")
    got = read_scores_table(tmp_path / "ens" / "scores.parquet", list(items()["item_id"])).set_index("item_id")
    np.testing.assert_array_equal(got["score"], member.loc[got.index, "score"])
    np.testing.assert_array_equal(got["rank"], member.loc[got.index, "rank"])
    assert (df["member_sd"] == 0).all() and (df["members"] == 1).all()
    assert list(df.columns[:len(COLUMNS)]) == COLUMNS and (df["method"] == "index-ensemble").all()


def test_ensemble_is_the_raw_mean_of_two_known_tables_matched_by_item_id(tmp_path):
    s1 = np.arange(N, dtype=float)                 # item i: i
    s2 = np.array([10.0, -2, 0, 4, 1, 0.5, 7, -1])  # another scale and order: no normalisation
    a = member_file(tmp_path / "a.parquet", s1)
    b = member_file(tmp_path / "b.parquet", s2, shuffle_seed=1)
    df = write_ensemble_table(tmp_path / "e.parquet", items(), [a, b], "q000", ["member-0", "member-1"])
    df = df.sort_values("index")
    np.testing.assert_array_equal(df["score"], (s1 + s2) / 2)
    np.testing.assert_allclose(df["member_sd"], np.abs(s1 - s2) / np.sqrt(2))
    np.testing.assert_array_equal(df["score[member-0]"], s1)
    np.testing.assert_array_equal(df["score[member-1]"], s2)
    # rank 1 = the largest mean: item 6 ((6 + 7) / 2 = 6.5), then item 0 ((0 + 10) / 2 = 5)
    assert df.set_index("index").loc[6, "rank"] == 1 and df.set_index("index").loc[0, "rank"] == 2
    mean, sd = ensemble_mean(np.stack([s1, s2]))
    np.testing.assert_array_equal(mean, (s1 + s2) / 2)


def test_missing_member_table_names_the_file_and_the_fix(tmp_path):
    a = member_file(tmp_path / "a.parquet", np.zeros(N))
    missing = tmp_path / "member-2" / "queries" / "q000" / "scores.parquet"
    with pytest.raises(EnsembleError, match=f"{missing}.*not found.*fix: run `musicattr ensemble`"):
        read_member_scores([a, missing], list(items()["item_id"]))
    assert not (tmp_path / "e.parquet").exists()


def test_member_table_missing_an_item_is_refused(tmp_path):
    df = scores_table(items(), np.zeros(N), "index", "q000").iloc[1:]
    df.to_parquet(tmp_path / "a.parquet", index=False)
    with pytest.raises(EnsembleError, match="a.parquet.*every item.*fix"):
        read_member_scores([tmp_path / "a.parquet"], list(items()["item_id"]))
    with pytest.raises(ValueError, match="member names"):
        ensemble_table(items(), np.zeros((2, N)), "q000", ["member-0"])


def test_members_from_a_config():
    m = parse_members([{"seed": 0, "checkpoint": "a.ckpt", "fisher": "f", "index": "i"}, 1])
    assert m == [Member(0, "a.ckpt", "f", "i"), Member(1)]
    assert m[1].paths("w") == {"checkpoint": "w/member-1/model.ckpt", "fisher": "w/member-1/fisher.safetensors",
                               "index": "w/member-1/index"}
    with pytest.raises(EnsembleError, match="repeat"):
        parse_members([1, {"seed": 1}])
    with pytest.raises(EnsembleError, match="unknown"):
        parse_members([{"seed": 1, "ckpt": "x"}])
    with pytest.raises(EnsembleError, match="no member"):
        parse_members([])


# ---------------------------------------------------------------- the stage on a tiny compare run
LR, K, T = 1e-3, 2, 2


def _fisher_and_index(d, name: str) -> None:
    from musicattr.attribution.fisher import FisherModule
    from musicattr.attribution.index import IndexModule
    from musicattr.data.datamodules import StorePredictDataModule

    with chdir(d):
        stage_trainer().predict(FisherModule(f"{name}.ckpt", f"{name}.fisher.safetensors", num_draws=2,
                                             flush_every=100), datamodule=StorePredictDataModule("store", 4))
        stage_trainer().predict(IndexModule(f"{name}.ckpt", f"{name}.fisher.safetensors", f"{name}.index",
                                            num_draws=T, k=256, flush_every=100, write_caches=False),
                                datamodule=StorePredictDataModule("store", 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A store, two models (training seeds 0 and 1 stand-ins: two seeded tiny DiTs), each with its Fisher and index,
    and a compare run with one generated and one training query."""
    d = tmp_path_factory.mktemp("ensemble")
    store = make_store(d / "store", n=N)
    for seed in (0, 1):
        save_checkpoint(make_module(seed=seed), d / f"m{seed}.ckpt")
        _fisher_and_index(d, f"m{seed}")
    item = make_compare_run(d / "compare", store)
    members = [{"seed": s, "checkpoint": str(d / f"m{s}.ckpt"), "fisher": str(d / f"m{s}.fisher.safetensors"),
                "index": str(d / f"m{s}.index")} for s in (0, 1)]
    return {"dir": d, "store": store, "item": item, "members": members}


def _run(tiny, **kw):
    from musicattr.counterfactual.ensemble_stage import run_ensemble

    d = tiny["dir"]
    args = dict(compare=str(d / "compare"), store=str(d / "store"), members=tiny["members"], work_dir=str(d / "work"),
                bank_dir=str(d / "no-bank"), unlearning={"lr": LR, "num_draws": K}, seed=0, draws_per_forward=2)
    return run_ensemble(**{**args, **kw})


def test_stage_members_are_the_index_answers_and_the_ensemble_their_mean(tiny):
    from musicattr.attribution.query import run_query
    from musicattr.counterfactual.methods import method_scores

    d, ids = tiny["dir"], list(tiny["store"].items["item_id"])
    record = _run(tiny)
    assert set(record["members"]) == {"member-0", "member-1"} and record["mean"].startswith("raw")
    per_member = []
    for s in (0, 1):
        m = tiny["members"][s]
        ref = run_query(m["index"], m["checkpoint"], m["fisher"], str(d / f"ref{s}"),
                        queries=[str(d / "compare" / "generated" / "q000.query.safetensors")],
                        query_items=[tiny["item"]], store=str(d / "store"), lr=LR, num_draws=K, seed=0,
                        draws_per_forward=2, top_k=0)
        for qid, folder in (("q000", ref[0]["folder"]), ("t000", ref[1]["folder"])):
            got = read_scores_table(d / "work" / f"member-{s}" / "queries" / qid / "scores.parquet", ids)
            want = read_scores_table(f"{folder}/scores.parquet", ids)
            # the index's product is float32: one query column against two rounds differently (~1e-7)
            np.testing.assert_allclose(got["score"], want.set_index("item_id").loc[got["item_id"], "score"],
                                       rtol=1e-5)
        per_member.append(read_member_scores([d / "work" / f"member-{s}" / "queries" / "q000" / "scores.parquet"],
                                             ids)[0])
    assert not np.allclose(per_member[0], per_member[1])  # two models: two answers
    ens = read_scores_table(d / "compare" / "queries" / "q000" / "index-ensemble" / "scores.parquet", ids)
    np.testing.assert_allclose(ens.set_index("item_id").loc[ids, "score"], (per_member[0] + per_member[1]) / 2,
                               rtol=1e-12)
    # the registry's method and the benchmark's reader find the tables
    scores = method_scores(resolve_methods(["index-ensemble"]), d / "compare", ["q000", "t000"], ids)
    assert scores["index-ensemble"].shape == (2, N)
    saved = json.loads((d / "work" / "ensemble.json").read_text())
    assert saved["members"]["member-1"]["queries_timed"] == 2 and set(saved["score_scale"]) == {"member-0", "member-1"}


def test_a_rerun_scores_nothing_again_and_bad_input_is_named(tiny):
    d = tiny["dir"]
    _run(tiny)  # the first run (or the test above) scored everything
    table = d / "work" / "member-0" / "queries" / "q000" / "scores.parquet"
    before = table.stat().st_mtime_ns
    again = _run(tiny)
    assert table.stat().st_mtime_ns == before
    assert again["members"]["member-0"]["queries_timed"] == 2  # kept from the run that timed them
    with pytest.raises(EnsembleError, match="queries.csv not found.*fix"):
        _run(tiny, compare=str(d / "nowhere"))
    with pytest.raises(EnsembleError, match="steps = 2.*fix"):
        _run(tiny, unlearning={"lr": LR, "num_draws": K, "steps": 2})
    with pytest.raises(EnsembleError, match="missing.ckpt not found.*fix"):
        _run(tiny, members=[{"seed": 5, "checkpoint": str(d / "missing.ckpt")}])
    with pytest.raises(EnsembleError, match="manifest.json not found.*fix"):
        _run(tiny, members=[{"seed": 7}])  # a refit needs the bank's recipe
