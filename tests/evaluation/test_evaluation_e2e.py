"""A tiny end-to-end self-influence grid and test-to-train comparison (real stages, tiny models)."""
import json

import numpy as np
import pandas as pd
import pytest

from musicattr.attribution.settings import ScoreSettings, UnlearnSettings

from conftest import build_planted_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import lightning as L

    from musicattr.attribution.index import IndexModule
    from musicattr.data.datamodules import StorePredictDataModule

    setup = build_planted_setup(tmp_path_factory.mktemp("eval"))
    L.Trainer(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False, inference_mode=False,
              enable_progress_bar=False).predict(
        IndexModule(setup["ckpt"], setup["fisher"], str(setup["root"] / "index"), num_draws=2, k=4096,
                    write_caches=False),
        datamodule=StorePredictDataModule(setup["store"]))
    return {**setup, "index": str(setup["root"] / "index")}


def rank_of(scores: pd.DataFrame, item_id: str, column: str = "score") -> int:
    """1 + the number of other items scored at least as high (numpy, independent of metrics.target_rank)."""
    s = scores.set_index("item_id")[column]
    return int((s.drop(item_id).to_numpy() >= s[item_id]).sum()) + 1


def grid_runs(out, grid_table: pd.DataFrame, targets: list[str]) -> pd.DataFrame:
    """Per (configuration, target): the target's rank recomputed from that run's own scores.parquet."""
    from musicattr.evaluation.evaluate import config_name

    rows = []
    for cfg in grid_table[["target", "strategy", "lr", "steps"]].to_dict("records"):
        for ti, item in enumerate(targets):
            scores = pd.read_parquet(out / "runs" / config_name(cfg) / f"target{ti:03d}" / "scores.parquet")
            rows.append({"config": config_name(cfg), "target_item": item, "rank": rank_of(scores, item),
                         "rank_rel": rank_of(scores, item, "relative_score")})
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_tiny_grid_writes_table1_resumes_and_recomputes_on_other_settings(setup, monkeypatch):
    from musicattr.evaluation import evaluate as self_influence

    out = setup["root"] / "grid"
    configs = [{"target": "all", "strategy": "mixed", "lr": 1e-5, "steps": 1},
               {"target": "to_kv", "strategy": "both", "lr": 1e-5, "steps": 1}]
    kw = dict(num_targets=2, configs=configs, unlearning=UnlearnSettings(num_draws=8), scoring=ScoreSettings(draws=2),
              fd_samples=2, fd_steps=2, top_k=3,
              use_wandb=False, index=setup["index"])
    table = self_influence.run_grid(setup["ckpt"], setup["store"], setup["fisher"], str(out), **kw)
    assert len(table) == 2 and set(table["target"]) == {"all", "to_kv"}
    assert {"sim_top3[aisfx]", "sim_bot3[aisfx]", "FD[aisfx]"} <= set(table.columns)
    assert np.isfinite(table["FD[aisfx]"]).all()
    targets = json.loads((out / "setup.json").read_text())["targets"]
    assert not set(targets) & {"audio/track010.wav", "audio/track011.wav"}  # planted copies are never targets
    # R(z_tar) and R rel: the mean over targets of the ranks in each run's own scores
    mine = grid_runs(out, table, targets)
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4
    merged = runs.merge(mine, on=["config", "target_item"], suffixes=("", "_mine"))
    assert (merged["rank"] == merged["rank_mine"]).all() and (merged["rank_rel"] == merged["rank_rel_mine"]).all()
    expected = mine.groupby("config")[["rank", "rank_rel"]].mean()
    for r in table.to_dict("records"):
        name = self_influence.config_name(r)
        assert r["R(z_tar)"] == pytest.approx(expected.loc[name, "rank"])
        assert r["R_rel"] == pytest.approx(expected.loc[name, "rank_rel"])
    md = (out / "table1.md").read_text()
    assert "| all | ✓ |  |" in md and "aisfx" in md and "R rel" in md
    # the index ranks the targets for the configuration with its tensors and M_L (all, mixed), not to_kv/both
    runs = pd.read_csv(out / "runs.csv")
    with_index = runs[runs["config"].str.startswith("all-mixed")]
    assert with_index["rank_index"].between(1, setup["n"]).all() and with_index["rank_index_rel"].notna().all()
    assert runs[runs["config"].str.startswith("to_kv")]["rank_index"].isna().all()
    assert "R index" in md
    # resume: a rerun with the same settings recomputes no (target, config) pair
    calls = []
    real_unlearn = self_influence.run_unlearn
    monkeypatch.setattr(self_influence, "run_unlearn", lambda *a, **k: calls.append(a))
    self_influence.run_grid(setup["ckpt"], setup["store"], setup["fisher"], str(out), **kw)
    assert calls == []
    # another setting (T = 3 scoring draws): every row is recomputed, none relabelled
    monkeypatch.setattr(self_influence, "run_unlearn", real_unlearn)
    table3 = self_influence.run_grid(setup["ckpt"], setup["store"], setup["fisher"], str(out),
                                     **{**kw, "scoring": ScoreSettings(draws=3), "index": None})
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["score_draws"]) == [2] * 4 + [3] * 4  # the T=2 rows kept as they were
    t3 = runs[runs["score_draws"] == 3]
    assert set(zip(t3["config"], t3["target_item"])) == set(zip(mine["config"], mine["target_item"]))
    mine3 = grid_runs(out, table3, targets)
    assert sorted(mine3["rank"]) == sorted(t3["rank"])
    expected = mine3.groupby("config")["rank"].mean()
    for r in table3.to_dict("records"):
        assert r["R(z_tar)"] == pytest.approx(expected.loc[self_influence.config_name(r)])


@pytest.mark.slow
def test_tiny_comparison_writes_correlations_recall_and_figure(setup):
    from musicattr.evaluation.compare import run_comparison

    out = setup["root"] / "compare"
    kw = dict(prompts=["a low tone"], durations=[1.0], unlearning=UnlearnSettings(lr=1e-5, num_draws=8),
              scoring=ScoreSettings(draws=2), gen_steps=2,
              use_wandb=False, query_items=["index:3"], training_queries=1)
    summary = run_comparison(setup["ckpt"], setup["store"], setup["fisher"], str(out), index=setup["index"], **kw)
    assert summary["queries"] == 2 and summary["planted_queries"] == 1 and summary["training_queries"] == 2
    listing = pd.read_csv(out / "queries.csv")
    assert list(listing["kind"]) == ["generated", "planted", "training", "training"]
    assert listing["query_item"].iloc[2] == "audio/track003.wav"
    chosen = listing["query_item"].iloc[3]  # k-means: a diverse item, never a planted copy
    assert chosen not in ("audio/track003.wav", "audio/track000.wav", "audio/track010.wav", "audio/track011.wav")
    # a training query is unlearned as in train-to-train, and its own audio is its most similar track
    from musicattr.attribution.unlearn import load_unlearned

    assert load_unlearned(str(out / "queries" / "t000" / "unlearned.safetensors"))[1]["query_item"] == \
        "audio/track003.wav"
    own = pd.read_parquet(out / "queries" / "t000" / "all-against-all.parquet")
    assert own.iloc[0]["item_id"] == "audio/track003.wav" and own.iloc[0]["score"] == pytest.approx(1.0, abs=1e-3)
    # the index as another method: its table, its correlations and recall, its agreement with unlearning
    for qid in ("q000", "q001"):
        t = pd.read_parquet(out / "queries" / qid / "index" / "scores.parquet")
        assert set(t["method"]) == {"index"} and len(t) == setup["n"]
    assert {"recall_index@10", "pearson[index~average[aisfx]]", "top10[index~unlearning]"} <= set(summary)
    assert summary["spearman[index~unlearning]"] > 0.9
    for key in ("pearson[all-against-all[aisfx]]", "spearman[average[aisfx]]", "recall_unlearning@1",
                "recall_all-against-all[aisfx]@10", "recall_unlearning-relative@1",
                "pearson[unlearning-relative~all-against-all[aisfx]]"):
        assert key in summary, key
    # the correlations: numpy's Pearson of each query's two tables, averaged over queries
    pearson = []
    for qid in ("q000", "q001"):
        u = pd.read_parquet(out / "queries" / qid / "unlearning" / "scores.parquet").sort_values("index")
        a = pd.read_parquet(out / "queries" / qid / "all-against-all.parquet").sort_values("index")
        pearson.append(np.corrcoef(u["score"], a["score"])[0, 1])
    assert summary["pearson[all-against-all[aisfx]]"] == pytest.approx(np.mean(pearson), abs=1e-6)
    # planted recall: 1 iff a copy of the planted track is in the method's top 10 (12 items: always) / top 1
    groups = {f"audio/track{i:03d}.wav" for i in (0, 10, 11)}
    top1 = pd.read_parquet(out / "queries" / "q001" / "unlearning" / "scores.parquet").iloc[0]["file_name"]
    assert summary["recall_unlearning@1"] == float(top1 in groups)
    assert summary["recall_unlearning@10"] == 1.0
    assert (out / "figure1.png").stat().st_size > 10_000
    table = pd.read_parquet(out / "queries" / "q000" / "all-against-all.parquet")
    assert len(table) == setup["n"] and list(table["rank"]) == list(range(1, setup["n"] + 1))

    # another unlearning lr: the queries are reused, every unlearned model is recomputed
    from musicattr.attribution.unlearn import load_unlearned

    wav = out / "generated" / "q000.wav"
    mtime = wav.stat().st_mtime_ns
    run_comparison(setup["ckpt"], setup["store"], setup["fisher"], str(out), **{**kw, "unlearning": UnlearnSettings(lr=2e-5, num_draws=8)})
    assert wav.stat().st_mtime_ns == mtime
    for qid in ("q000", "q001"):
        assert load_unlearned(str(out / "queries" / qid / "unlearned.safetensors"))[1]["lr"] == 2e-5
    # another prompt: the queries are generated anew
    run_comparison(setup["ckpt"], setup["store"], setup["fisher"], str(out), **{**kw, "prompts": ["a high tone"]})
    infos = json.loads((out / "generated" / "queries.json").read_text())
    assert [q["caption"] for q in infos][0] == "a high tone" and len(infos) == 2
