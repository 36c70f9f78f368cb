"""The plumbing of the counterfactual campaign without a campaign: subset filtering, subsets and the plan, the
LDS arithmetic, method tables, the recipe, and one real retrain that resumes."""
import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from conftest import make_module, make_store, save_checkpoint
from musicattr.attribution.similarity import similarity_table
from musicattr.counterfactual.lds import lds_per_query, seed_noise, subset_sums
from musicattr.counterfactual.leave_k_out import summarize, with_increase
from musicattr.counterfactual.methods import Method, method_scores, parse_methods
from musicattr.counterfactual.queries import Query, read_queries, select_queries
from musicattr.counterfactual.recipe import recipe_from_checkpoint
from musicattr.counterfactual.subsets import Plan, PlannedRetrain, lds_subsets, random_scores, top_k
from musicattr.data.datamodules import LatentDataModule


# ---------------------------------------------------------------------------------------------- subset filtering
def test_latent_data_module_leaves_out_the_excluded_ids_only(tmp_path):
    store = make_store(tmp_path / "store", n=12)
    removed = ["audio/track003.wav", "audio/track007.wav", "audio/track011.wav"]
    (tmp_path / "removed.txt").write_text("\n".join(removed) + "\n\n")
    for exclude in (removed, str(tmp_path / "removed.txt")):
        dm = LatentDataModule(str(tmp_path / "store"), batch_size=2, exclude=exclude)
        dm.setup("fit")
        kept = [store[i]["item_id"] for i in dm.train_set.indices]
        assert kept == [i for i in store.items["item_id"] if i not in removed]
        assert not set(store[i]["item_id"] for i in dm.val_set.indices) & set(removed)
    dm = LatentDataModule(str(tmp_path / "store"), batch_size=2, val_every=3, exclude=removed)
    dm.setup("fit")
    ids = [store[i]["item_id"] for i in dm.train_set.indices + dm.val_set.indices]
    assert sorted(ids) == sorted(i for i in store.items["item_id"] if i not in removed)
    with pytest.raises(KeyError, match="not in the store .* fix: exclude item ids of this store"):
        LatentDataModule(str(tmp_path / "store"), exclude=["audio/nope.wav"]).setup("fit")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        LatentDataModule(str(tmp_path / "store"), exclude=str(tmp_path / "missing.txt")).setup("fit")
    with pytest.raises(ValueError, match="training items left"):
        LatentDataModule(str(tmp_path / "store"), batch_size=10, exclude=removed).setup("fit")


# ---------------------------------------------------------------------------------------------- subsets and plan
def test_lds_subsets_keep_alpha_n_items_deterministically():
    ids = [f"id{i:02d}" for i in range(20)]
    a = lds_subsets(ids, 5, 0.5, seed=3)
    assert a == lds_subsets(ids, 5, 0.5, seed=3) and a != lds_subsets(ids, 5, 0.5, seed=4)
    assert all(len(r) == 10 and list(r) == sorted(r) and set(r) <= set(ids) for r in a)
    assert len(set(a)) == 5
    assert all(len(r) == 20 - 6 for r in lds_subsets(ids, 2, 0.3, seed=0))
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        lds_subsets(ids, 2, 1.0, seed=0)


def test_top_k_and_random_k():
    ids = ["a", "b", "c", "d", "e"]
    assert top_k(np.array([0.1, 0.9, 0.5, 0.9, -1.0]), ids, 2) == ("b", "d")
    assert top_k(np.array([0.1, 0.9, 0.5, 0.8, -1.0]), ids, 3) == ("b", "c", "d")
    assert np.array_equal(random_scores(5, 1), random_scores(5, 1))
    assert not np.array_equal(random_scores(5, 1), random_scores(5, 2))
    with pytest.raises(ValueError, match="0 < K < N"):
        top_k(np.zeros(5), ids, 5)


def test_plan_runs_each_removed_set_and_seed_once():
    plan = Plan()
    a = plan.add(("x", "y"), 0, "top-2 unlearning q000")
    b = plan.add(("y", "x"), 0, "top-2 average q000")
    c = plan.add(("x", "y"), 1, "top-2 unlearning q000")
    assert a is b and a is not c and len(plan) == 2 and a.purposes == ["top-2 unlearning q000", "top-2 average q000"]
    ctx = {"store_fingerprint": "s", "recipe": "r"}
    names = {a.name(ctx), c.name(ctx), PlannedRetrain(("x",), 0).name(ctx), a.name({**ctx, "recipe": "r2"})}
    assert len(names) == 4 and a.name(ctx).startswith("s0-2-")


# ---------------------------------------------------------------------------------------------- LDS arithmetic
def test_subset_sums_and_lds_match_a_direct_computation():
    rng = np.random.default_rng(0)
    q, m, n = 3, 6, 10
    scores = rng.standard_normal((q, n))
    kept = rng.random((m, n)) < 0.5
    losses = rng.standard_normal((q, m))
    sums = subset_sums(scores, kept)
    for qi in range(q):
        for j in range(m):
            assert sums[qi, j] == pytest.approx(sum(scores[qi, i] for i in range(n) if kept[j, i]))
    expected = [spearmanr(sums[qi], -losses[qi]).statistic for qi in range(q)]
    assert np.allclose(lds_per_query(scores, kept, losses), expected)
    # a loss that falls exactly as the summed scores rise is predicted perfectly
    assert np.allclose(lds_per_query(scores, kept, -2 * sums + 1), 1.0)
    assert np.isnan(lds_per_query(np.zeros((1, n)), kept, losses[:1])[0])  # constant prediction: undefined


def test_seed_noise_floor():
    a = np.array([[1.0, 2.0, 3.0, 4.0]])
    b = np.array([[1.2, 1.8, 3.4, 4.2]])
    every = np.array([[1.0, 2.0, 3.0, 4.0, 0.0, 5.0]])
    out = seed_noise(a, b, every)
    assert out["seed_std"][0] == pytest.approx(np.sqrt(np.mean((a - b) ** 2) / 2))
    assert out["subset_std"][0] == pytest.approx(np.std(every, ddof=1))
    assert out["seed_lds"][0] == pytest.approx(1.0)
    assert np.isnan(seed_noise(a[:, :2], b[:, :2], every)["seed_lds"][0])  # fewer than 3 subsets


def test_leave_k_out_summary_against_random():
    rows = pd.DataFrame([
        {"query_id": q, "method": m, "seed": s, "loss": loss, "reference_loss": 1.0, "chroma": np.nan,
         "chroma_reference": np.nan}
        for q, m, s, loss in [("q0", "random", 0, 1.1), ("q0", "random", 1, 1.3), ("q1", "random", 0, 1.0),
                              ("q1", "random", 1, 1.2), ("q0", "eq1", 0, 1.5), ("q0", "eq1", 1, 1.1),
                              ("q1", "eq1", 0, 1.4), ("q1", "eq1", 1, 1.4)]])
    per = with_increase(rows)
    s = summarize(per).set_index("method")
    assert s.loc["random", "increase"] == pytest.approx(0.15)
    assert s.loc["eq1", "increase"] == pytest.approx(0.35)
    assert s.loc["eq1", "ratio_to_random"] == pytest.approx(0.35 / 0.15)
    assert s.loc["eq1", "increase_seed_std"] == pytest.approx(np.std([0.45, 0.25], ddof=1))
    assert s.loc["eq1", "wins_over_random"] == pytest.approx(3 / 4)
    assert s.loc["eq1", "increase_pct"] == pytest.approx(35.0)
    assert s.loc["eq1", "excess_over_random"] == pytest.approx(np.mean([0.5 - 0.1, 0.1 - 0.3, 0.4 - 0.0, 0.4 - 0.2]))


def test_leave_k_out_ratio_undefined_when_random_k_does_not_raise_the_loss():
    rows = pd.DataFrame([
        {"query_id": "q0", "method": m, "seed": 0, "loss": loss, "reference_loss": 1.0, "chroma": np.nan,
         "chroma_reference": np.nan} for m, loss in [("random", 0.98), ("eq1", 1.2)]])
    s = summarize(with_increase(rows)).set_index("method")
    assert np.isnan(s.loc["eq1", "ratio_to_random"])            # not -10: a ratio to a loss drop is meaningless
    assert s.loc["eq1", "excess_over_random"] == pytest.approx(0.22)


# ---------------------------------------------------------------------------------------------- methods, queries
def _items(n):
    return [{"item_id": f"audio/track{i:03d}.wav", "index": i, "caption": f"c{i}"} for i in range(n)]


def test_method_tables_are_read_by_item_id_and_checked(tmp_path, caplog):
    items = _items(6)
    ids = [it["item_id"] for it in items]
    queries = [Query("q000", "generated", "p"), Query("t000", "training", "c3", item_id=ids[3])]
    for k, q in enumerate(queries):
        t = similarity_table(torch.arange(6.0) * (k + 1), items, query_id=q.query_id)  # rows sorted by score
        t["relative_score"] = -t["score"]
        (tmp_path / "queries" / q.query_id).mkdir(parents=True)
        t.to_parquet(tmp_path / "queries" / q.query_id / "s.parquet")
    methods = parse_methods([{"name": "eq1", "table": "queries/{query_id}/s.parquet"},
                             {"name": "rel", "table": "queries/{query_id}/s.parquet", "column": "relative_score"},
                             {"name": "index", "table": "queries/{query_id}/index.parquet", "optional": True},
                             {"name": "random"}])
    with caplog.at_level("INFO"):
        scores = method_scores(methods, tmp_path, queries, ids, random_seed=5)
    assert "method index left out" in caplog.text
    assert set(scores) == {"eq1", "rel", "random"}
    assert np.array_equal(scores["eq1"], [np.arange(6.0), 2 * np.arange(6.0)])
    assert np.array_equal(scores["rel"], -scores["eq1"])
    assert np.array_equal(scores["random"], [random_scores(6, 5)] * 2)
    with pytest.raises(FileNotFoundError, match="index.parquet not found .* optional: true"):
        method_scores([Method("index", "queries/{query_id}/index.parquet")], tmp_path, queries, ids)
    with pytest.raises(KeyError, match="no column 'nope'"):
        method_scores([Method("x", "queries/{query_id}/s.parquet", "nope")], tmp_path, queries, ids)
    with pytest.raises(ValueError, match="does not score every item"):
        method_scores(methods[:1], tmp_path, queries, ids + ["audio/extra.wav"])
    with pytest.raises(ValueError, match="names no table"):
        parse_methods([{"name": "eq1"}])


def test_queries_of_a_compare_run(tmp_path):
    pd.DataFrame([{"query_id": "q000", "kind": "generated", "prompt": "a", "planted_group": None, "query_item": None},
                  {"query_id": "q001", "kind": "planted", "prompt": "b", "planted_group": "audio/x.wav",
                   "query_item": None},
                  {"query_id": "t000", "kind": "training", "prompt": "c", "planted_group": None,
                   "query_item": "audio/y.wav"}]).to_csv(tmp_path / "queries.csv", index=False)
    qs = read_queries(tmp_path)
    assert [(q.query_id, q.kind) for q in qs] == [("q000", "generated"), ("q001", "planted"), ("t000", "training")]
    assert qs[1].planted_group == "audio/x.wav" and qs[2].item_id == "audio/y.wav" and qs[2].query_file is None
    assert qs[0].query_file == str(tmp_path / "generated" / "q000.query.safetensors")
    assert [q.query_id for q in select_queries(qs, {"training": 1, "planted": 5})] == ["q001", "t000"]
    assert [q.query_id for q in select_queries(qs, ["t000", "q000"])] == ["t000", "q000"]
    with pytest.raises(KeyError, match="q009"):
        select_queries(qs, ["q009"])
    # a compare run from before training queries: the kind follows from planted_group
    pd.DataFrame([{"query_id": "q000", "prompt": "a", "planted_group": None},
                  {"query_id": "q001", "prompt": "b", "planted_group": "audio/x.wav"}]).to_csv(
        tmp_path / "queries.csv", index=False)
    assert [q.kind for q in read_queries(tmp_path)] == ["generated", "planted"]
    with pytest.raises(FileNotFoundError, match="make figure1"):
        read_queries(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- recipe, retrain
def fit_checkpoint(path, batch_size=4, steps=1200):
    """A checkpoint as `musicattr fit` writes it: the module's and the data module's hyper-parameters and the step."""
    m = make_module()
    torch.save({"hyper_parameters": dict(m.hparams), "state_dict": m.state_dict(), "global_step": steps,
                "datamodule_hyper_parameters": {"store": "x", "batch_size": batch_size}}, path)
    return str(path)


def test_recipe_is_theta0s_fit_with_the_stated_overrides(tmp_path):
    ckpt = fit_checkpoint(tmp_path / "theta0.ckpt")
    r = recipe_from_checkpoint(ckpt)
    assert (r.steps, r.batch_size, r.gradient_clip_val, r.module["lr"]) == (1200, 4, 1.0, 1e-4)
    short = recipe_from_checkpoint(ckpt, steps=300, overrides={"lr": 1e-3, "batch_size": 8})
    assert (short.steps, short.batch_size, short.module["lr"]) == (300, 8, 1e-3)
    assert short.module["model_config"] == r.module["model_config"] and short.fingerprint() != r.fingerprint()
    with pytest.raises(ValueError, match="not DiffusionModule arguments"):
        recipe_from_checkpoint(ckpt, overrides={"learning_rate": 1.0})
    bare = save_checkpoint(make_module(), tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="batch_size: N"):
        recipe_from_checkpoint(bare, steps=3)


class Crash(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            raise RuntimeError("crash")


class Record(L.Callback):
    def __init__(self):
        self.start, self.items = None, None

    def on_train_start(self, trainer, pl_module):
        self.start = trainer.global_step
        self.items = [trainer.datamodule.store[i]["item_id"] for i in trainer.datamodule.train_set.indices]


def test_a_retrain_leaves_its_items_out_and_resumes_after_a_crash(tmp_path):
    from musicattr.counterfactual.retrain import fit_retrain
    from musicattr.models.diffusion_module import load_diffusion_module
    from musicattr.parts import RunMismatchError

    store = make_store(tmp_path / "store", n=12)
    recipe = recipe_from_checkpoint(fit_checkpoint(tmp_path / "theta0.ckpt"), steps=5)
    removed = ("audio/track001.wav", "audio/track005.wav")
    run = tmp_path / "run"
    key = {"removed": list(removed), "seed": 0}
    with pytest.raises(RuntimeError, match="crash"):
        fit_retrain(run, recipe, str(tmp_path / "store"), removed, 0, key, callbacks=[Crash()], checkpoint_every=2)
    assert (run / "last.ckpt").exists() and not (run / "model.ckpt").exists()
    assert (run / "removed.txt").read_text().split() == list(removed)
    rec = Record()
    model = fit_retrain(run, recipe, str(tmp_path / "store"), removed, 0, key, callbacks=[rec], checkpoint_every=2)
    assert rec.start == 2  # resumed from the checkpoint of step 2
    assert rec.items == [i for i in store.items["item_id"] if i not in removed]
    saved = torch.load(model, weights_only=False)
    assert saved["global_step"] == 5 and not (run / "last.ckpt").exists()
    load_diffusion_module(str(model))  # the stages can load it as a theta
    mtime = model.stat().st_mtime_ns
    assert fit_retrain(run, recipe, str(tmp_path / "store"), removed, 0, key) == model  # finished: not retrained
    assert model.stat().st_mtime_ns == mtime
    with pytest.raises(RunMismatchError, match="another key"):
        fit_retrain(run, recipe, str(tmp_path / "store"), removed, 1, {**key, "seed": 1})
    assert json.loads((run / "run.json").read_text()) == key
