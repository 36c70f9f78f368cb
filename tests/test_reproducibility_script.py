"""scripts/reproducibility.py (the benchmark behind `make reproducibility`): the theta0 losses reused across
queries give the scores of a pass that computes them itself, and the summary's paired differences and intervals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_script


@pytest.fixture(scope="module")
def repro():
    return load_script("reproducibility")


def test_parse_design(repro):
    assert repro.parse_design("uniform:32") == ("uniform", 32, "", "")
    assert repro.parse_design("stratified-8+shared:64") == ("stratified-8", 64, "", "+shared")
    assert repro.parse_design("uniform:32:a10") == ("uniform", 32, "a10", "")


@pytest.mark.parametrize("shared", [False, True])
def test_cached_baseline_gives_the_same_scores(repro, tiny_checkpoint, tiny_store, shared):
    from musicattr.data.datamodules import collate_items
    from musicattr.data.latent_store import LatentStore
    from musicattr.models.sat_task import SATDiffusionTask

    store = tiny_store if isinstance(tiny_store, LatentStore) else LatentStore(tiny_store)
    batches = [collate_items([store[p] for p in range(s, min(len(store), s + 5))]) for s in range(0, len(store), 5)]
    task = SATDiffusionTask(timesteps="stratified-4", shared_draws=shared)
    model = task.load(tiny_checkpoint)
    named = dict(task.net(model).named_parameters())
    keys = [k for k in named if named[k].ndim == 2][:3]
    params = {k: named[k] for k in keys}
    g = torch.Generator().manual_seed(0)
    unlearned = {k: named[k].detach() + 1e-3 * torch.randn(named[k].shape, generator=g) for k in keys}
    before = {k: p.detach().clone() for k, p in params.items()}

    plain = repro.score(task, model, params, unlearned, batches, 3, 8)
    cache: list = []
    first = repro.score(task, model, params, unlearned, batches, 3, 8, cache)
    assert len(cache) == len(batches)
    reused = repro.score(task, model, params, unlearned, batches, 3, 8, cache)
    for k, p in params.items():  # theta0 restored after every pass
        assert torch.equal(p, before[k])
    for a in (first, reused):
        np.testing.assert_allclose(a[0], plain[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a[1], plain[1], rtol=1e-9, atol=1e-12)
    other = repro.score(task, model, params, unlearned, batches, 4, 8)
    assert not np.allclose(other[0], plain[0])  # another seed: other draws


def test_summary_pairs_the_same_queries(repro):
    rows = []
    for q, (a, b) in enumerate([(0.80, 0.90), (0.70, 0.85), (0.75, 0.95)]):
        for design, draws, sp, top in (("uniform", 32, a, 7), ("stratified-8+shared", 64, b, 9)):
            rows.append({"unlearned": f"q{q}", "design": design, "num_draws": draws, "cost": draws / 32,
                         "spearman": sp, "top10_overlap": top, "share_l1": 1 - sp})
    rows.append({"unlearned": "q9", "design": "stratified-8+shared", "num_draws": 64, "cost": 2.0,
                 "spearman": 0.0, "top10_overlap": 0, "share_l1": 1.0})  # not paired: no reference row
    s = repro.summarize(rows, ["uniform:32", "stratified-8+shared:64"], ["q0", "q1", "q2", "q9"])
    ref, new = s["designs"]["uniform:32"], s["designs"]["stratified-8+shared:64"]
    assert ref["queries"] == 3 and new["queries"] == 4
    assert ref["spearman"]["mean"] == pytest.approx(0.75)
    diff = new["spearman_minus_reference"]
    assert diff["queries"] == 3 and diff["mean"] == pytest.approx(0.15)
    assert diff["lo"] <= 0.10 + 1e-12 and diff["hi"] >= 0.20 - 1e-12  # the bootstrap spans the paired values
    assert new["top10_overlap_minus_reference"]["mean"] == pytest.approx(2.0)
    assert "spearman_minus_reference" not in ref
