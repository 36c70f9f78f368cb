"""scripts/reproducibility_curve.py (the draw-budget curve of reproducible credit): the first T of its T_max
draws are the design's pass at T, so each budget's row equals two passes of scripts/reproducibility.py at that
T; a rerun reads the cached per-draw losses and gives the same rows."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import load_script


def test_reached():
    curve = load_script("reproducibility_curve")
    assert curve.reached({32: 0.9, 64: 0.971, 128: 0.99}, "spearman") == 64
    assert curve.reached({32: 5, 64: 8}, "top10_overlap") is None
    assert curve.reached({32: 0.4, 64: 0.15}, "share_l1") == 64


@pytest.mark.slow
def test_budget_rows_equal_passes_at_that_budget(tiny_checkpoint, tiny_store, tmp_path, monkeypatch):
    from musicattr.attribution.unlearn import save_unlearned
    from musicattr.data.datamodules import collate_items
    from musicattr.data.latent_store import LatentStore
    from musicattr.models.sat_task import SATDiffusionTask

    curve = load_script("reproducibility_curve")
    repro = sys.modules["reproducibility"]
    store = tiny_store if isinstance(tiny_store, LatentStore) else LatentStore(tiny_store)
    task = SATDiffusionTask(timesteps="stratified-4", shared_draws=True)
    model = task.load(tiny_checkpoint)
    named = dict(task.net(model).named_parameters())
    keys = [k for k in named if named[k].ndim == 2][:3]
    g = torch.Generator().manual_seed(0)
    unlearned = {k: named[k].detach() + 1e-2 * torch.randn(named[k].shape, generator=g) for k in keys}
    path = str(tmp_path / "q.safetensors")
    save_unlearned(path, unlearned, {"query_id": "qt"})
    out = tmp_path / "curve" / "curve.json"
    argv = ["reproducibility_curve.py", "--checkpoint", str(tiny_checkpoint), "--store", str(store.root),
            "--unlearned", path, "--design", "stratified-4+shared", "--max_draws", "16", "--chunk", "8",
            "--budgets", "8", "16", "--batch_size", "5", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    curve.main()
    rows = json.loads(out.read_text())
    assert set(rows[0]["budgets"]) == {"8", "16"} and set(rows[0]["reached"]) == set(curve.GOALS)

    batches = [collate_items([store[p] for p in range(s, min(len(store), s + 5))]) for s in range(0, len(store), 5)]
    params = {k: named[k] for k in keys}
    for t in (8, 16):
        passes = [repro.score(task, model, params, unlearned, batches, s, t)[:2] for s in (0, 1)]
        want = repro.compare(*passes)
        got = rows[0]["budgets"][str(t)]
        assert got["top10_overlap"] == want["top10_overlap"]
        for m in ("spearman", "share_l1", "median_se"):
            assert got[m] == pytest.approx(want[m], rel=1e-6, abs=1e-9), (t, m)

    assert len(list((out.parent / "draws").glob("*.pt"))) == 2 * 2 * 2   # (theta0, theta_u) x seeds x chunks
    curve.main()                                                           # resumed: every chunk read back
    assert json.loads(out.read_text()) == rows
