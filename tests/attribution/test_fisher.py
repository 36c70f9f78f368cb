"""Diagonal Fisher (attribution/fisher.py): per-sample squared gradients (vmap == loop == brute force),
the file written by `musicattr fisher`, its metadata and checkpoint check, and resuming an interrupted run
(the PartsWriter of musicattr/parts.py with the store's StorePredictDataModule)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import chdir, cli, kill_when_parts_appear, make_module, make_store, save_checkpoint, stage_trainer
from musicattr.attribution.fisher import (FisherMismatchError, FisherModule, load_fisher, squared_grads_loop,
                                          squared_grads_vmap)
from musicattr.attribution.loss import make_draws
from musicattr.models.v_objective import v_objective
from musicattr.data.datamodules import StorePredictDataModule, collate_items
from musicattr.data.latent_store import LatentStore
from musicattr.models.diffusion_module import load_diffusion_module
from musicattr.fingerprint import file_fingerprint
from musicattr.models.sat_task import SATDiffusionTask
from musicattr.atomic import finished_files


N_ITEMS, T_DRAWS = 12, 3
ROOT = Path(__file__).resolve().parents[2]


def fisher_args(out, num_draws=T_DRAWS, batch_size=4, flush_every=1, **extra):
    args = ["fisher", "--model.checkpoint", "theta0.ckpt", "--data.store", "store", "--model.out", out,
            "--model.num_draws", num_draws, "--data.batch_size", batch_size, "--model.flush_every", flush_every,
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.default_root_dir", "lightning"]
    for k, v in extra.items():
        args += [f"--model.{k}", v]
    return args


def run_fisher_inprocess(cwd, out, num_draws=T_DRAWS, batch_size=4, flush_every=1, **kw):
    """The same pass as `musicattr fisher`, in this process (no interpreter start-up)."""
    with chdir(cwd):
        m = FisherModule("theta0.ckpt", out, num_draws=num_draws, flush_every=flush_every, **kw)
        stage_trainer().predict(m, datamodule=StorePredictDataModule("store", batch_size))


def part_indices(parts: Path) -> dict[str, list[int]]:
    out = {}
    for p in finished_files(parts.glob("part-*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out[p.name] = json.loads(f.metadata()["indices"])
    return out


def brute_force_sq_grads(module, store, positions, seed, draws, names, use_mask=False, namespace=""):
    """sum over items and draws of (dL_t/dtheta)^2 with one plain autograd.grad per (item, draw);
    draw j of item i keyed ``namespace + id``."""
    params = dict(module.net.named_parameters())
    out = {k: torch.zeros_like(params[k], dtype=torch.float64) for k in names}
    for pos in positions:
        b = collate_items([store[pos]])
        with torch.no_grad():
            cond = module.conditioning_inputs(b)
        z, valid = b["latents"], int(b["valid_frames"][0])
        for j in draws:
            t, eps = make_draws(seed, [namespace + b["item_id"][0]], [j], tuple(z.shape[1:]))
            x_t, v = v_objective(z, t[:, 0], eps[:, 0])
            pred = module.net(x_t, t[:, 0], **cond, use_checkpointing=False)
            se = (pred - v).pow(2)  # [1, C, L]
            loss = se[..., :valid].mean() if use_mask else se.mean()
            grads = torch.autograd.grad(loss, [params[k] for k in names])
            for k, g in zip(names, grads):
                out[k] += g.double().pow(2)
    return out


def assert_close_rel(a: dict, b: dict, rel: float):
    assert set(a) == set(b)
    for k in a:
        x, y = a[k].double(), b[k].double()
        scale = float(y.abs().max())
        assert scale > 0, k
        err = float((x - y).abs().max())
        assert err <= rel * scale, f"{k}: max|diff| {err:.3e} > {rel} * {scale:.3e}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("fisher")
    make_store(d / "store", n=N_ITEMS)
    save_checkpoint(make_module(), d / "theta0.ckpt")
    cli(fisher_args("fisher.safetensors"), d)
    return d


@pytest.fixture(scope="module")
def theta0(work):
    return load_diffusion_module(str(work / "theta0.ckpt"))


@pytest.fixture(scope="module")
def task():
    return SATDiffusionTask()


# ---------------------------------------------------------------- per-sample squared gradients


@pytest.mark.parametrize("use_mask", [False, True])
def test_vmap_equals_loop_equals_brute_force(work, theta0, task, use_mask):
    store = LatentStore(work / "store")
    positions = [0, 6, 10]
    b = collate_items([store[p] for p in positions])
    params = task.select_parameters(theta0, "all")
    args = (task, theta0, params, b, 5, range(3))
    vm = squared_grads_vmap(*args, mask=use_mask, chunk_size=4)
    lp = squared_grads_loop(*args, mask=use_mask)
    bf = brute_force_sq_grads(theta0, store, positions, 5, range(3), list(params), use_mask, namespace="fisher/")
    assert all(v.dtype == torch.float64 for v in vm.values())
    assert_close_rel(vm, lp, 1e-5)
    assert_close_rel(lp, bf, 1e-5)
    assert_close_rel(vm, bf, 1e-5)
    # a sum of squares of per-sample gradients, never the square of a summed or mean gradient
    k0 = "model.transformer.layers.0.self_attn.to_qkv.weight"
    assert float(vm[k0].sum()) > 0
    # vmap without chunking agrees too
    assert_close_rel(squared_grads_vmap(*args, mask=use_mask, chunk_size=None), lp, 1e-5)


def test_squared_grads_of_subsets_add_up(work, theta0, task):
    store = LatentStore(work / "store")
    b = collate_items([store[p] for p in range(4)])
    params = task.select_parameters(theta0, "to_kv")
    whole = squared_grads_vmap(task, theta0, params, b, 0, range(4))
    b1 = collate_items([store[p] for p in range(2)])
    b2 = collate_items([store[p] for p in range(2, 4)])
    parts = []
    for bb in (b1, b2):
        for draws in (range(0, 1), range(1, 4)):
            parts.append(squared_grads_vmap(task, theta0, params, bb, 0, draws))
    total = {k: sum(p[k] for p in parts) for k in whole}
    assert_close_rel(whole, total, 1e-5)


# ---------------------------------------------------------------- the file written by `musicattr fisher`


def test_cli_fisher_equals_in_test_mean_of_squared_grads(work, theta0, task):
    """F = 1/(N T) sum_i sum_t (dL_t(z_i)/dtheta)^2, with draw t of item i keyed 'fisher/<id>'."""
    fisher, meta = load_fisher(str(work / "fisher.safetensors"))
    names = list(task.select_parameters(theta0, "all"))
    assert set(fisher) == set(names)
    store = LatentStore(work / "store")
    total = brute_force_sq_grads(theta0, store, range(N_ITEMS), 0, range(T_DRAWS), names, namespace="fisher/")
    ref = {k: v / (N_ITEMS * T_DRAWS) for k, v in total.items()}
    for k in names:
        assert fisher[k].dtype == torch.float32 and fisher[k].shape == ref[k].shape
        assert (fisher[k] >= 0).all()
    assert_close_rel(fisher, ref, 1e-5)
    # the comparison can tell a wrong divisor: sum / N alone is T = 3 times the file
    with pytest.raises(AssertionError):
        assert_close_rel(fisher, {k: v / N_ITEMS for k, v in total.items()}, 1e-2)


def test_fisher_draws_are_not_the_scoring_draws(work, theta0, task):
    """The Fisher has its own draw namespace: summed over the scoring draws (bare ids) it would differ."""
    fisher, _ = load_fisher(str(work / "fisher.safetensors"))
    names = list(task.select_parameters(theta0, "to_kv"))
    store = LatentStore(work / "store")
    scoring = brute_force_sq_grads(theta0, store, range(N_ITEMS), 0, range(T_DRAWS), names)
    scoring = {k: v / (N_ITEMS * T_DRAWS) for k, v in scoring.items()}
    for k in names:  # other (t, eps) draws: the estimates differ by far more than float error
        rel = float((fisher[k].double() - scoring[k]).abs().max() / scoring[k].abs().max())
        assert rel > 1e-2, (k, rel)


def test_cli_fisher_metadata(work, theta0, task):
    _, meta = load_fisher(str(work / "fisher.safetensors"))
    assert meta["num_items"] == N_ITEMS
    assert meta["num_draws"] == T_DRAWS
    assert meta["seed"] == 0 and meta["target"] == "all" and meta["use_mask"] is False
    assert meta["parameters"] == list(task.select_parameters(theta0, "all"))
    assert meta["checkpoint_fingerprint"] == file_fingerprint(str(work / "theta0.ckpt"))
    assert meta["checkpoint"] == "theta0.ckpt"
    assert meta["store_fingerprint"] == LatentStore(work / "store").fingerprint
    assert meta["task"] == "musicattr.models.sat_task.SATDiffusionTask"
    # every item summed exactly once across the parts
    idx = [i for v in part_indices(work / "fisher.safetensors.parts").values() for i in v]
    assert sorted(idx) == list(range(N_ITEMS))


def test_load_fisher_refuses_other_checkpoint(work):
    path = str(work / "fisher.safetensors")
    fp = file_fingerprint(str(work / "theta0.ckpt"))
    tensors, meta = load_fisher(path, fp)  # the right checkpoint loads
    assert meta["checkpoint_fingerprint"] == fp and tensors
    other = work / "other.ckpt"
    save_checkpoint(make_module(seed=1), other)
    with pytest.raises(FisherMismatchError) as e:
        load_fisher(path, file_fingerprint(str(other)))
    msg = str(e.value)
    assert fp in msg and file_fingerprint(str(other)) in msg and "musicattr fisher" in msg
    with pytest.raises(FileNotFoundError, match="musicattr fisher"):
        load_fisher(str(work / "missing.safetensors"))


def test_load_fisher_refuses_a_file_without_fingerprint(work, tmp_path):
    tensors, meta = load_fisher(str(work / "fisher.safetensors"))
    del meta["checkpoint_fingerprint"]
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), metadata={k: json.dumps(v) for k, v in meta.items()})
    with pytest.raises(FisherMismatchError, match="no checkpoint fingerprint") as e:
        load_fisher(str(bare), file_fingerprint(str(work / "theta0.ckpt")))
    assert str(bare) in str(e.value) and "musicattr fisher" in str(e.value)
    assert load_fisher(str(bare))[0].keys() == tensors.keys()  # no checkpoint to check against: readable


@pytest.mark.parametrize("changed", [{"num_draws": T_DRAWS + 1}, {"seed": 1}, {"target": "self"},
                                     {"use_mask": True}])
def test_parts_of_another_run_are_refused(work, tmp_path, changed):
    """Rerunning into an output whose parts were made with other settings must not mix them."""
    d = tmp_path / "w"
    _copy_inputs(work, d)
    shutil.copytree(work / "fisher.safetensors.parts", d / "fisher.safetensors.parts")
    before = part_indices(d / "fisher.safetensors.parts")
    with pytest.raises(FisherMismatchError, match="another Fisher run"):
        run_fisher_inprocess(d, "fisher.safetensors", **{"num_draws": T_DRAWS, **changed})
    assert part_indices(d / "fisher.safetensors.parts") == before  # nothing deleted or added


def test_rerun_with_other_draws_fails_clearly(work, tmp_path):
    d = tmp_path / "w"
    _copy_inputs(work, d)
    shutil.copytree(work / "fisher.safetensors.parts", d / "fisher.safetensors.parts")
    with pytest.raises(FisherMismatchError, match="another Fisher run"):
        run_fisher_inprocess(d, "fisher.safetensors", num_draws=T_DRAWS + 2)
    assert not (d / "fisher.safetensors").exists()
    # overwrite=True clears the stale parts and recomputes with the new settings
    run_fisher_inprocess(d, "fisher.safetensors", num_draws=T_DRAWS + 2, overwrite=True)
    _, meta = load_fisher(str(d / "fisher.safetensors"))
    assert meta["num_draws"] == T_DRAWS + 2 and meta["num_items"] == N_ITEMS
    assert sorted(i for v in part_indices(d / "fisher.safetensors.parts").values() for i in v) == list(range(N_ITEMS))


# ---------------------------------------------------------------- resume


def _copy_inputs(work, d):
    d.mkdir(parents=True, exist_ok=True)
    for f in ("store", "theta0.ckpt"):
        os.symlink(work / f, d / f)


def test_resume_after_losing_final_file_and_some_parts(work, tmp_path):
    d = tmp_path / "w"
    _copy_inputs(work, d)
    shutil.copytree(work / "fisher.safetensors.parts", d / "fisher.safetensors.parts")
    names = sorted(p.name for p in (d / "fisher.safetensors.parts").glob("part-*.safetensors"))
    assert len(names) == N_ITEMS // 4  # one part per batch (flush_every=1)
    kept = names[0]
    kept_idx = part_indices(d / "fisher.safetensors.parts")[kept]
    for n in names[1:]:
        (d / "fisher.safetensors.parts" / n).unlink()
    run_fisher_inprocess(d, "fisher.safetensors")
    got = part_indices(d / "fisher.safetensors.parts")
    assert got[kept] == kept_idx  # the surviving part was reused, not recomputed
    assert sorted(i for v in got.values() for i in v) == list(range(N_ITEMS))  # each item once
    a, b = load_file(str(d / "fisher.safetensors")), load_file(str(work / "fisher.safetensors"))
    assert_close_rel(a, b, 1e-6)
    with safe_open(str(d / "fisher.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["num_items"]) == N_ITEMS


def test_resume_with_every_part_present_only_merges(work, tmp_path):
    d = tmp_path / "w"
    _copy_inputs(work, d)
    shutil.copytree(work / "fisher.safetensors.parts", d / "fisher.safetensors.parts")
    before = part_indices(d / "fisher.safetensors.parts")
    run_fisher_inprocess(d, "fisher.safetensors")
    assert part_indices(d / "fisher.safetensors.parts") == before  # nothing recomputed
    a, b = load_file(str(d / "fisher.safetensors")), load_file(str(work / "fisher.safetensors"))
    for k in b:
        assert torch.equal(a[k], b[k])


@pytest.mark.paths
def test_inprocess_batching_does_not_change_the_fisher(work, tmp_path):
    d = tmp_path / "w"
    _copy_inputs(work, d)
    run_fisher_inprocess(d, "fisher.safetensors", batch_size=5, flush_every=2, vectorize=False)
    assert_close_rel(load_file(str(d / "fisher.safetensors")), load_file(str(work / "fisher.safetensors")), 1e-5)


@pytest.mark.slow
@pytest.mark.paths
def test_ddp_two_cpu_processes_match_one(work, tmp_path):
    d = tmp_path / "w"
    _copy_inputs(work, d)
    args = fisher_args("fisher.safetensors", batch_size=2)
    args[args.index("--trainer.devices") + 1] = "2"
    cli([*args, "--trainer.strategy", "ddp"], d)
    got = part_indices(d / "fisher.safetensors.parts")
    assert {n[:7] for n in got} == {"part-r0", "part-r1"}  # both ranks summed items
    assert sorted(i for v in got.values() for i in v) == list(range(N_ITEMS))  # each item on one rank only
    fisher, meta = load_fisher(str(d / "fisher.safetensors"))
    assert meta["num_items"] == N_ITEMS
    assert_close_rel(fisher, load_file(str(work / "fisher.safetensors")), 1e-5)


@pytest.mark.slow
def test_kill9_mid_run_then_rerun_equals_uninterrupted(work, tmp_path):
    d = tmp_path / "w"
    _copy_inputs(work, d)
    draws = 48  # slow enough (per-sample loop, one item a batch) to be killed mid-run
    args = fisher_args("fisher.safetensors", num_draws=draws, batch_size=1, flush_every=1, vectorize="false")
    proc = cli(args, d, start_new_session=True)
    parts = d / "fisher.safetensors.parts"
    kill_when_parts_appear(proc, parts, "part-*.safetensors", 120)
    assert not (d / "fisher.safetensors").exists()
    done_before = {i for v in part_indices(parts).values() for i in v}
    assert 0 < len(done_before) < N_ITEMS
    cli(args, d)  # rerun: resumes
    got = part_indices(parts)
    idx = [i for v in got.values() for i in v]
    assert sorted(idx) == list(range(N_ITEMS))
    # the uninterrupted reference, computed here with the same per-sample loop
    task = SATDiffusionTask()
    model = task.load(str(d / "theta0.ckpt"))
    store = LatentStore(d / "store")
    params = task.select_parameters(model, "all")
    ref = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for pos in range(N_ITEMS):
        sq = squared_grads_loop(task, model, params, collate_items([store[pos]]), 0, range(draws))
        for k in ref:
            ref[k] += sq[k]
    ref = {k: (v / (N_ITEMS * draws)).float() for k, v in ref.items()}
    fisher, meta = load_fisher(str(d / "fisher.safetensors"))
    assert meta["num_items"] == N_ITEMS and meta["num_draws"] == draws
    assert_close_rel(fisher, ref, 1e-6)
