"""The paper-scale rehearsal (scripts/rehearse.py) and the memory changes it needed, on tiny models.

The end-to-end test runs every stage as the real CLI on a one-block DiT of width 512 over 64 frames (the
paper config's other settings, fit in its bf16-mixed) and checks the figures it writes; the others check
that the memory-lean forms compute the same numbers as before (bit for bit)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("rehearse")


def test_scaled_config_and_extrapolation():
    r = _script()
    fit = r.paper_config(ROOT / "configs" / "paper")
    mc = r.scaled_model_config(fit, 1 / 8, None)
    assert mc["model"]["diffusion"]["config"]["depth"] == 3
    assert mc["model"]["diffusion"]["config"]["embed_dim"] == fit["model"]["model_config"]["model"]["diffusion"][
        "config"]["embed_dim"]
    tiny = r.scaled_model_config(fit, 0.01, 512)
    assert tiny["model"]["diffusion"]["config"]["depth"] == 1 and tiny["model"]["diffusion"]["config"]["num_heads"] == 8
    assert fit["model"]["model_config"]["model"]["diffusion"]["config"]["depth"] == 24  # the config is untouched
    per, _ = r.stage_flops("attribute", 1.0, 3.0, True)
    assert per == 5.0  # two forwards and a gradient per item-timestep
    assert r.paper_units("index", 115_000, 2048) == 115_000 * 16 and r.paper_units("query", 115_000, 2048) == 2048


def test_packed_sketch_is_the_sign_sketch():
    """k <= 2^15 keeps bucket and sign in one int16: the same buckets and signs, the same sketch, bit for bit."""
    from musicattr.attribution import sketch

    sizes = {"a.weight": 4096, "b.bias": 77}
    packed = sketch.SignSketch(sizes, 1 << 15, seed=5)
    assert packed.packed and all(v.dtype == torch.int16 for v in packed.buckets.values())
    for name, n in sizes.items():
        g = torch.Generator().manual_seed(sketch.tensor_seed(5, name))
        h = torch.randint(0, sketch.HASH_RANGE, (n,), generator=g, dtype=torch.int64)
        s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1
        bucket, sign = packed.hashes(name)
        assert torch.equal(bucket.long(), h % (1 << 15)) and torch.equal(sign.long(), s.long())
    wide = sketch.SignSketch(sizes, 1 << 16, seed=5)
    assert not wide.packed
    x = {k: torch.randn(n, dtype=torch.float64) for k, n in sizes.items()}
    a, b = torch.zeros(1 << 15, dtype=torch.float64), torch.zeros(1 << 16, dtype=torch.float64)
    for k in sizes:
        packed.add(a, k, x[k])
        wide.add(b, k, x[k])
    assert torch.equal(a, sketch.fold(b, 1 << 15))


def test_lean_preconditioner_matches_held_inverse():
    """The diagonal Fisher computes (F + lambda)^-1 per tensor when applied: the held inverse's numbers."""
    from musicattr.attribution.preconditioner import DiagonalFisher, damped_inverse

    g = torch.Generator().manual_seed(0)
    fisher = {"w": torch.rand(30, 7, generator=g), "b": torch.rand(7, generator=g) * 1e-3}
    p = DiagonalFisher(fisher, ["w", "b"], 1e-3)
    inv = damped_inverse(fisher, ["w", "b"], 1e-3)
    for k in fisher:
        x32, x64 = torch.randn(fisher[k].shape), torch.randn(fisher[k].shape, dtype=torch.float64)
        assert torch.equal(p.inverse[k], inv[k])
        assert torch.equal(p.apply_tensor(k, x64), x64 * inv[k])
        assert torch.equal(p.apply_tensor(k, x32, 0.5), x32 * inv[k].sqrt().float())
        assert torch.equal(p.apply_tensor(k, x64, 0.5), x64 * inv[k].sqrt())
        assert torch.equal(p.apply_tensor(k, x64, -0.5), x64 / inv[k].sqrt())


@pytest.mark.slow
def test_rehearsal_runs_every_stage(tmp_path):
    """scripts/rehearse.py on a tiny scaled copy of the paper config: every stage exits 0 and is measured."""
    import subprocess

    out = tmp_path / "rehearse"
    cmd = [sys.executable, str(ROOT / "scripts" / "rehearse.py"), "--scale", "0.01", "--width", "512", "--frames", "64",
           "--items", "2", "--threads", "1", "--precision", "bf16-mixed", "--stages", ",".join(_script().STAGES),
           "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "rehearse.json").read_text())
    assert report["all_ok"] and report["fit_precision"] == "bf16-mixed"
    assert [s["stage"] for s in report["stages"]] == list(_script().STAGES)
    for s in report["stages"]:
        assert s["seconds"] > 0 and s["peak_rss_gb"] > 0.1
        assert (s["flops_per_unit"] > 0) == (s["stage"] != "report")
    assert (out / "rehearse.md").read_text().count("\n| ") == len(report["stages"]) + 1
    assert (out / "run" / "index" / "index.json").exists()
    assert list((out / "run" / "index_queries").glob("*/scores.parquet"))


def test_task_checkpointing_gives_the_same_gradient(tmp_path):
    """SATDiffusionTask(checkpointing=True) recomputes each block in the backward pass: the same losses and
    gradients (to float rounding) with one block's activations held instead of all."""
    from conftest import make_module, make_store

    from musicattr.attribution.unlearn import loss_gradient
    from musicattr.data.datamodules import collate_items
    from musicattr.models.sat_task import SATDiffusionTask

    model = make_module()
    batch = collate_items([make_store(tmp_path / "store", n=2, channels=4, frames=16)[0]])
    plain, ckpt = SATDiffusionTask(), SATDiffusionTask(checkpointing=True)
    params = plain.select_parameters(model, "all")
    g0 = loss_gradient(plain, model, params, batch, 0, 4, draws_per_forward=2)
    g1 = loss_gradient(ckpt, model, params, batch, 0, 4, draws_per_forward=2)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-12)
    with torch.no_grad():
        l0 = plain.item_loss(model, batch, 0, 4)
        l1 = ckpt.item_loss(model, batch, 0, 4)
    assert torch.equal(l0, l1)  # no gradient: no checkpointing, the same computation
