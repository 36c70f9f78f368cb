"""A tiny counterfactual campaign end to end (real compare run, real Lightning retrains, M = 3, K = 2): the
tables are recomputed here from the files each retrain left (its removed ids, its measured losses) and the
compare run's score tables, an interrupted campaign continues where it stopped, and the CLI runs one retrain
of the plan (also under DDP)."""
import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from conftest import build_planted_setup, cli

pytestmark = pytest.mark.slow
METHODS = {"unlearning": ("unlearning/scores.parquet", "score"),
           "unlearning-relative": ("unlearning/scores.parquet", "relative_score"),
           "all-against-all[aisfx]": ("all-against-all.parquet", "score"),
           "average[aisfx]": ("average.parquet", "score")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from musicattr.attribution.settings import ScoreSettings, UnlearnSettings
    from musicattr.evaluation.compare import run_comparison

    s = build_planted_setup(tmp_path_factory.mktemp("counterfactual"))
    s["compare"] = str(s["root"] / "compare")
    run_comparison(s["ckpt"], s["store"], s["fisher"], s["compare"], prompts=["a low tone"], durations=[1.0],
                   unlearning=UnlearnSettings(lr=1e-5, num_draws=8), scoring=ScoreSettings(draws=2), gen_steps=2, use_wandb=False, query_items=["index:3"])
    return s


def campaign_kwargs(**over):
    from musicattr.counterfactual.campaign import LDSSettings, LeaveKOutSettings

    kw = dict(steps=5, recipe={"batch_size": 4}, lds=LDSSettings(subsets=3, seeds=[0], noise_seed=1, noise_subsets=3),
              leave_k_out=LeaveKOutSettings(k=2, seeds=[0], gen_steps=2), loss_draws=4, checkpoint_every=2,
              use_wandb=False)
    return {**kw, **over}


class Fits(L.Callback):
    """Records each retrain's folder and first step; raises at step 3 of fit number ``crash_at`` (1-based)."""

    def __init__(self, crash_at=None):
        self.runs, self.crash_at = [], crash_at

    def on_train_start(self, trainer, pl_module):
        self.runs.append((trainer.default_root_dir, trainer.global_step))

    def on_train_batch_end(self, trainer, *args):
        if len(self.runs) == self.crash_at and trainer.global_step == 3:
            raise RuntimeError("interrupted")


@pytest.fixture(scope="module")
def campaign(setup):
    """The campaign, interrupted in its 5th retrain and run again."""
    from musicattr.counterfactual.campaign import run_counterfactual

    out = setup["root"] / "counterfactual"
    first = Fits(crash_at=5)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_counterfactual(setup["ckpt"], setup["store"], setup["compare"], str(out),
                           **campaign_kwargs(trainer={"callbacks": [first]}))
    second = Fits()
    summary = run_counterfactual(setup["ckpt"], setup["store"], setup["compare"], str(out),
                                 **campaign_kwargs(trainer={"callbacks": [second]}))
    return {**setup, "out": out, "first": first.runs, "second": second.runs, "summary": summary,
            "plan": json.loads((out / "plan-lds+leave-k-out.json").read_text())["retrains"]}


def retrain_of(c, purpose):
    [r] = [r for r in c["plan"] if purpose in r["purposes"]]
    return c["out"] / "retrains" / r["name"]


def removed(run):
    return (run / "removed.txt").read_text().split()


def losses(run):
    return {q: v["loss"] for q, v in json.loads((run / "losses.json").read_text()).items()}


def scores(c, qid, method):
    table, column = METHODS[method]
    return pd.read_parquet(c["root"] / "compare" / "queries" / qid / table).set_index("item_id")[column]


def test_an_interrupted_campaign_continues_where_it_stopped(campaign):
    first, second = campaign["first"], campaign["second"]
    assert [step for _, step in first] == [0] * 5
    assert second[0] == (first[4][0], 2)  # the interrupted retrain resumed from its step-2 checkpoint
    assert not {d for d, _ in first[:4]} & {d for d, _ in second}  # finished retrains were not refit
    assert len(first) - 1 + len(second) == len(campaign["plan"])
    for r in campaign["plan"]:
        run = campaign["out"] / "retrains" / r["name"]
        assert (run / "model.ckpt").exists() and not (run / "last.ckpt").exists()
        assert torch.load(run / "model.ckpt", weights_only=False)["global_step"] == 5


def test_a_finished_campaign_refits_and_remeasures_nothing(campaign, monkeypatch):
    from musicattr.counterfactual import campaign as module

    def refuse(*a, **k):
        raise AssertionError("a finished retrain was refit")

    monkeypatch.setattr(module, "fit_retrain", refuse)
    monkeypatch.setattr(module, "measure_losses", refuse)
    before = (campaign["out"] / "lds.csv").read_text()
    module.run_counterfactual(campaign["ckpt"], campaign["store"], campaign["compare"], str(campaign["out"]),
                              **campaign_kwargs())
    assert (campaign["out"] / "lds.csv").read_text() == before
    # under DDP a finished campaign only writes its tables; retrains to fit are refused with the fix (job array)
    module.run_counterfactual(campaign["ckpt"], campaign["store"], campaign["compare"], str(campaign["out"]),
                              **campaign_kwargs(trainer={"strategy": "ddp", "devices": 2}))
    with pytest.raises(ValueError, match="--only I --trainer.strategy ddp"):
        module.run_counterfactual(campaign["ckpt"], campaign["store"], campaign["compare"], str(campaign["out"]),
                                  **campaign_kwargs(steps=6, trainer={"strategy": "ddp", "devices": 2}))


def test_each_retrain_is_one_removed_set_and_seed(campaign, setup):
    plan = campaign["plan"]
    ids = set(pd.read_parquet(f"{setup['store']}/index.parquet")["item_id"])
    keys = {(frozenset(removed(campaign["out"] / "retrains" / r["name"])), r["seed"]) for r in plan}
    assert len(keys) == len(plan)  # deduplicated
    for j in range(3):
        run = retrain_of(campaign, f"lds subset {j}")
        assert len(removed(run)) == 6 and set(removed(run)) <= ids  # alpha = 0.5 of 12
        noise = retrain_of(campaign, f"lds noise subset {j}")
        assert removed(noise) == removed(run) and noise != run
    assert removed(retrain_of(campaign, "reference theta0'")) == []


def test_lds_sums_each_methods_scores_over_the_subset_each_retrain_kept(campaign, setup):
    ids = list(pd.read_parquet(f"{setup['store']}/index.parquet")["item_id"])
    runs = [retrain_of(campaign, f"lds subset {j}") for j in range(3)]
    kept = [[i for i in ids if i not in set(removed(run))] for run in runs]
    per = pd.read_csv(campaign["out"] / "lds_per_query.csv")
    assert set(per["query_id"]) == {"q000", "q001", "t000"}
    assert set(per["method"]) == {*METHODS, "random"}  # the index is optional and absent
    for qid in ("q000", "q001", "t000"):
        loss = [losses(run)[qid] for run in runs]
        for method in METHODS:
            s = scores(campaign, qid, method)
            sums = [s.loc[k].sum() for k in kept]
            expected = spearmanr(sums, -np.array(loss)).statistic
            got = per[(per["query_id"] == qid) & (per["method"] == method)]["lds"].item()
            assert got == pytest.approx(expected, nan_ok=True), (qid, method)
        noise = [losses(retrain_of(campaign, f"lds noise subset {j}"))[qid] for j in range(3)]
        row = per[per["query_id"] == qid].iloc[0]
        assert row["seed_lds"] == pytest.approx(spearmanr(loss, noise).statistic, nan_ok=True)
        assert row["seed_std"] == pytest.approx(np.sqrt(np.mean((np.array(loss) - noise) ** 2) / 2))
    table = pd.read_csv(campaign["out"] / "lds.csv").set_index("method")
    assert table.loc["unlearning", "lds"] == pytest.approx(per[per["method"] == "unlearning"]["lds"].mean())


def test_leave_k_out_removes_each_methods_top_k_and_measures_against_theta0_prime(campaign):
    per = pd.read_csv(campaign["out"] / "leave_k_out_per_query.csv", dtype={"removed": str})
    reference = losses(retrain_of(campaign, "reference theta0'"))
    random_sets = set()
    for r in per.to_dict("records"):
        run = campaign["out"] / "retrains" / r["retrain"]
        got = r["removed"].split(";")
        assert removed(run) == got and r["k"] == 2 and len(got) == 2
        if r["method"] == "random":
            random_sets.add(tuple(got))
        else:
            top = scores(campaign, r["query_id"], r["method"]).sort_values(ascending=False, kind="mergesort")
            assert set(got) == set(top.index[:2]), r
        assert r["loss"] == pytest.approx(losses(run)[r["query_id"]])
        assert r["reference_loss"] == pytest.approx(reference[r["query_id"]])
        assert r["increase"] == pytest.approx(r["loss"] - r["reference_loss"])
    assert len(random_sets) == 1  # random-K: the same K items for every query of a seed
    planted = per[per["kind"] == "planted"]
    assert len(planted) and planted["chroma"].between(-1, 1).all() and planted["chroma_reference"].notna().all()
    assert per[per["kind"] != "planted"]["chroma"].isna().all()
    assert (retrain_of(campaign, "reference theta0'") / "planted-q001.wav").exists()
    summary = pd.read_csv(campaign["out"] / "leave_k_out.csv").set_index("method")
    random = per[per["method"] == "random"].set_index(["query_id", "seed"])["increase"]
    for method in METHODS:
        mine = per[per["method"] == method]
        if random.mean() > 0:
            assert summary.loc[method, "ratio_to_random"] == pytest.approx(mine["increase"].mean() / random.mean())
        else:  # a ratio to a loss that random-K removal lowered is undefined
            assert np.isnan(summary.loc[method, "ratio_to_random"])
        paired = mine.set_index(["query_id", "seed"])["increase"] - random
        assert summary.loc[method, "excess_over_random"] == pytest.approx(paired.mean())


def test_query_losses_are_the_retrained_models_fixed_draw_losses(campaign, setup):
    from musicattr.attribution.loss import COUNTERFACTUAL
    from musicattr.data.queries import query_batch
    from musicattr.models.sat_task import SATDiffusionTask

    a, b = retrain_of(campaign, "lds subset 0"), retrain_of(campaign, "lds subset 1")
    for run in (a, b):
        task = SATDiffusionTask()
        model = task.load(str(run / "model.ckpt"))
        batch = query_batch(query_item="audio/track003.wav", store=setup["store"])
        with torch.no_grad():
            expected = float(task.item_loss(model, batch, 0, 4, namespace=COUNTERFACTUAL)[0])
        assert losses(run)["t000"] == pytest.approx(expected, rel=1e-9)
    assert losses(a)["t000"] != losses(b)["t000"]
    task = SATDiffusionTask()
    theta0 = task.load(setup["ckpt"])
    batch = query_batch(query=str(campaign["root"] / "compare" / "generated" / "q000.query.safetensors"))
    with torch.no_grad():
        expected = float(task.item_loss(theta0, batch, 0, 4, namespace=COUNTERFACTUAL)[0])
    per = pd.read_csv(campaign["out"] / "leave_k_out_per_query.csv")
    assert per[per["query_id"] == "q000"]["theta0_loss"].to_numpy() == pytest.approx(expected, rel=1e-9)


def test_one_table_for_every_method(campaign):
    md = (campaign["out"] / "methods.md").read_text()
    for method in [*METHODS, "random"]:
        assert f"| {method} |" in md
    assert "M = 3 subsets at alpha = 0.5" in md and "K = 2" in md
    table = pd.read_csv(campaign["out"] / "methods.csv").set_index("method")
    assert {"lds", "noise_seed_lds", "increase", "ratio_to_random", "wins_over_random"} <= set(table.columns)
    s = campaign["summary"]
    assert s["retrains"] == len(campaign["plan"]) and s["steps"] == 5 and s["mean_fit_s"] > 0


def test_cli_plans_the_campaign_then_runs_one_retrain_under_ddp(setup, tmp_path):
    out = tmp_path / "cf"
    args = ["counterfactual", "--checkpoint", setup["ckpt"], "--store", setup["store"], "--compare", setup["compare"],
            "--out_dir", out, "--experiments", "[lds]", "--steps", 4, "--recipe", "{batch_size: 2}",
            "--lds.subsets", 3, "--lds.noise_subsets", 1, "--loss_draws", 2, "--use_wandb", "false"]
    r = cli([*args, "--plan", "true", "--probe_steps", 2], tmp_path)
    estimate = json.loads((out / "estimate.json").read_text())
    assert estimate["retrains"] == 4 and estimate["to_fit"] == 4 and estimate["seconds_per_step"] > 0
    assert "about" in r.stdout and not list((out / "retrains").glob("*/model.ckpt"))
    plan = json.loads((out / "plan-lds.json").read_text())["retrains"]
    r = cli([*args, "--only", 1, "--trainer.devices", 2, "--trainer.strategy", "ddp"], tmp_path)
    done = [p.parent.name for p in (out / "retrains").glob("*/model.ckpt")]
    assert done == [plan[1]["name"]]
    assert set(json.loads((out / "retrains" / done[0] / "losses.json").read_text())) == {"q000", "q001", "t000"}
