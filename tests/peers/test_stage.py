"""``musicattr peers`` on a tiny compare run: every peer writes the standard scores table per query (the schema of
musicattr.attribution.scores_table), the registry finds them, a rerun skips finished queries, bad input names the
file and the fix; TRAK's sign on a training item queried by itself."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_compare_run, make_module, make_store, save_checkpoint
from musicattr.attribution.methods import resolve_methods
from musicattr.attribution.scores_table import COLUMNS, read_scores_table
from musicattr.counterfactual.methods import method_scores
from musicattr.peers.stage import PEERS, run_peers

import musicattr.peers.methods  # noqa: F401  (registers the peers)

pytestmark = pytest.mark.slow  # every peer end to end on a tiny model: ~30 s on one thread

TINY = dict(train_draws=2, query_draws=2, fit_draws=2, batch_size=4, proj_dim=16, query_batch_size=2, score_draws=2,
            unlearn_lr=1e-2)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("peers")
    store = make_store(d / "store", n=6)
    ckpt = save_checkpoint(make_module(), d / "theta0.ckpt")
    item = make_compare_run(d / "compare", store)
    result = run_peers(str(d / "compare"), ckpt, str(d / "store"), **TINY)
    return {"dir": d, "store": store, "ckpt": ckpt, "item": item, "result": result}


def test_every_peer_writes_the_schema_table_per_query(compare_run):
    d, store = compare_run["dir"], compare_run["store"]
    ids = list(store.items["item_id"])
    assert compare_run["result"] == {p: 2 for p in PEERS}
    for peer in PEERS:
        for qid in ("q000", "t000"):
            df = read_scores_table(d / "compare" / "queries" / qid / peer / "scores.parquet", ids)
            assert list(df.columns[:len(COLUMNS)]) == COLUMNS
            assert (df["method"] == peer).all() and (df["query_id"] == qid).all()
            assert list(df["rank"]) == list(range(1, len(ids) + 1)) and np.isfinite(df["score"]).all()
    ul = read_scores_table(d / "compare" / "queries" / "q000" / "unlearning-ekfac" / "scores.parquet", ids)
    np.testing.assert_allclose(ul["score"], ul["unlearned_loss"] - ul["baseline_loss"], rtol=1e-6, atol=1e-9)
    costs = json.loads((d / "compare" / "peers" / "costs.json").read_text())
    assert set(costs) == set(PEERS)
    assert not any(c["per_model_reused"] for c in costs.values())
    # a fresh run records what it paid (a number, not None); not its size: a tiny featurisation can round to 0.0 s
    assert all(isinstance(costs[p]["seconds_per_model"], float) for p in ("ekfac", "trak", "dtrak"))
    # the registry knows them and the benchmark's reader takes their tables
    scores = method_scores(resolve_methods(list(PEERS)), d / "compare", ["q000", "t000"], ids)
    assert set(scores) == set(PEERS) and all(v.shape == (2, len(ids)) for v in scores.values())


def test_a_rerun_skips_finished_queries_and_bad_input_is_named(compare_run):
    d = compare_run["dir"]
    again = run_peers(str(d / "compare"), compare_run["ckpt"], str(d / "store"), **TINY)
    assert again == {p: 0 for p in PEERS}
    with pytest.raises(FileNotFoundError, match="queries.csv.*fix"):
        run_peers(str(d / "nowhere"), compare_run["ckpt"], str(d / "store"), **TINY)
    with pytest.raises(ValueError, match="unknown peers"):
        run_peers(str(d / "compare"), compare_run["ckpt"], str(d / "store"), peers=["lissa"])


def test_trak_sign_a_training_item_queried_by_itself_is_credited(compare_run):
    """Larger = more credit: a training item queried with its own draws (namespace '') and no mask gets a positive
    TRAK and D-TRAK score against itself, the largest of its row."""
    from musicattr.attribution.task import load_theta
    from musicattr.models.sat_task import SATDiffusionTask
    from musicattr.peers.common import store_batches
    from musicattr.peers.trak_peer import trak_scores

    d = compare_run["dir"]
    task, model = load_theta(SATDiffusionTask(), compare_run["ckpt"])
    batches = store_batches(compare_run["store"])
    for kind in ("trak", "dtrak"):
        s, _ = trak_scores(task, model, kind, batches, batches[:3], d / f"sign-{kind}", proj_dim=64, train_draws=4,
                           query_draws=4, query_mask=False, batch_size=3, query_batch_size=3, damping=1e-2,
                           query_namespace="")
        own = s[np.arange(3), np.arange(3)]
        assert (own > 0).all(), (kind, s)
        assert (s.argmax(1) == np.arange(3)).all(), (kind, s)


def test_trak_features_are_reused_under_the_same_key_only(compare_run):
    """A second run with the same features key scores new queries on the kept features (the same numbers as a
    fresh run, no featurisation); another key featurizes afresh."""
    from musicattr.attribution.task import load_theta
    from musicattr.models.sat_task import SATDiffusionTask
    from musicattr.peers.common import store_batches
    from musicattr.peers.common import MADE_FILE, made_seconds
    from musicattr.peers.trak_peer import FEATURES_KEY, trak_scores

    d = compare_run["dir"]
    task, model = load_theta(SATDiffusionTask(), compare_run["ckpt"])
    batches = store_batches(compare_run["store"])
    kw = dict(proj_dim=16, train_draws=2, query_draws=2, batch_size=3, query_batch_size=2)
    work, key = d / "reuse-trak", {"checkpoint": "a", "items": "b"}
    _, first = trak_scores(task, model, "trak", batches, batches[:2], work, features_key=key, **kw)
    made = (work / "0" / "features.mmap").stat().st_mtime_ns
    again, cost = trak_scores(task, model, "trak", batches, batches[2:5], work, features_key=key, **kw)
    assert (work / "0" / "features.mmap").stat().st_mtime_ns == made           # kept, not featurized again
    # the reusing run reports what the features cost when made, not its own near-zero pass
    assert not first["features_reused"] and cost["features_reused"]
    assert cost["featurize_s"] == made_seconds(work) == round(first["featurize_s"], 1)
    (work / MADE_FILE).unlink()          # as after an interrupted featurisation: the key, no record of finished ones
    _, resumed = trak_scores(task, model, "trak", batches, batches[:1], work, features_key=key, **kw)
    assert not resumed["features_reused"] and made_seconds(work) == round(resumed["featurize_s"], 1)
    fresh, _ = trak_scores(task, model, "trak", batches, batches[2:5], d / "fresh-trak", **kw)
    np.testing.assert_allclose(again, fresh, rtol=1e-5, atol=1e-6)
    assert not (d / "fresh-trak" / FEATURES_KEY).exists()
    trak_scores(task, model, "trak", batches, batches[:1], work, features_key={**key, "checkpoint": "c"}, **kw)
    assert (work / "0" / "features.mmap").stat().st_mtime_ns != made           # another key: featurized afresh
    assert json.loads((work / FEATURES_KEY).read_text())["checkpoint"] == "c"
