"""Unlearning by the Fisher-preconditioned update (attribution/unlearn.py, paper Eq. 2) and masking strategies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_module, make_store, save_checkpoint
from musicattr.attribution.fisher import FisherMismatchError
from musicattr.attribution.loss import UNLEARN
from musicattr.attribution.masks import STRATEGIES, resolve_masks
from musicattr.attribution.preconditioner import DiagonalFisher
from musicattr.attribution.unlearn import eq2_update, load_unlearned, loss_gradient, run_unlearn, unlearn_query
from musicattr.data.queries import query_batch
from musicattr.models.diffusion_module import load_diffusion_module
from musicattr.fingerprint import file_fingerprint
from musicattr.models.sat_task import SATDiffusionTask


ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Store, theta0 and a synthetic Fisher file (positive entries, some exact zeros) over all blocks."""
    d = tmp_path_factory.mktemp("unlearn")
    make_store(d / "store", n=N_ITEMS)
    module = make_module()
    ckpt = save_checkpoint(module, d / "theta0.ckpt")
    names = list(SATDiffusionTask().select_parameters(module, "all"))
    g = torch.Generator().manual_seed(3)
    fisher = {}
    for k in names:
        p = dict(module.net.named_parameters())[k]
        f = torch.rand(p.shape, generator=g) * 1e-2
        f.view(-1)[::7] = 0.0
        fisher[k] = f
    meta = {"num_items": N_ITEMS, "num_draws": 3, "seed": 0, "target": "all", "use_mask": False,
            "parameters": names, "checkpoint": ckpt, "checkpoint_fingerprint": file_fingerprint(ckpt)}
    save_file(fisher, str(d / "fisher.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()})
    return d


def _query(work, item="audio/track004.wav"):
    """The task, a fresh theta0 and the one-item batch of a training item."""
    task = SATDiffusionTask()
    return task, task.load(str(work / "theta0.ckpt")), query_batch(query_item=item, store=str(work / "store"))


def diag(fisher, names, damping):
    return DiagonalFisher(fisher, list(names), damping)


def hand_eq2(theta, grad, fisher, lr, n, damping):
    lam = damping * sum(float(fisher[k].double().sum()) for k in grad) / sum(fisher[k].numel() for k in grad)
    return {k: (theta[k].double() + lr / n * grad[k].double() / (fisher[k].double() + lam)).to(theta[k].dtype)
            for k in grad}


# ---------------------------------------------------------------- Eq. 2


def test_eq2_update_by_hand(work):
    module = make_module()
    params = SATDiffusionTask().select_parameters(module, "cross")
    g = torch.Generator().manual_seed(0)
    theta = {k: p.detach().clone() for k, p in params.items()}
    grad = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    fisher = {k: torch.rand(p.shape, generator=g) for k, p in params.items()}
    for f in fisher.values():
        f.view(-1)[:3] = 0.0
    fisher["unrelated.weight"] = torch.full((5,), 1e6)  # outside the target: must not enter lambda
    lr, n, damping = 0.3, 7, 0.05
    new = eq2_update(theta, grad, diag(fisher, grad, damping), lr, n)
    assert set(new) == set(params)
    lam = damping * torch.cat([fisher[k].double().flatten() for k in params]).mean()
    for k in params:
        exp = theta[k].double() + lr / n * grad[k] / (fisher[k].double() + lam)
        assert new[k].dtype == theta[k].dtype
        torch.testing.assert_close(new[k], exp.float(), rtol=1e-6, atol=0)
        # the zero-Fisher entries moved by lr/N * g / lambda, finite
        assert torch.isfinite(new[k]).all()
    # inputs untouched
    for k in params:
        assert torch.equal(theta[k], params[k].detach())


def test_eq2_update_with_zero_damping_and_missing_fisher_entry():
    theta = {"a": torch.ones(3)}
    grad = {"a": torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)}
    fisher = {"a": torch.tensor([1.0, 2.0, 4.0])}
    new = eq2_update(theta, grad, diag(fisher, grad, 0.0), lr=2.0, num_items=4)
    torch.testing.assert_close(new["a"], torch.tensor([1.5, 0.5, 1.5]))
    with pytest.raises(KeyError, match="Fisher has no entry"):
        diag(fisher, ["b"], 0.0)


def test_loss_gradient_equals_autograd_of_item_loss(work):
    task, model, batch = _query(work)
    params = task.select_parameters(model, "self")
    loss = task.item_loss(model, batch, 2, 7, namespace=UNLEARN, mask=True, draws_per_forward=7)
    ref = torch.autograd.grad(loss.sum(), list(params.values()))
    for dpf in (7, 3, 1):
        g = loss_gradient(task, model, params, batch, 2, 7, namespace=UNLEARN, mask=True, draws_per_forward=dpf)
        assert set(g) == set(params)
        for (k, v), r in zip(g.items(), ref):
            assert v.dtype == torch.float64
            torch.testing.assert_close(v, r.double(), rtol=1e-5, atol=1e-6 * float(r.abs().max()))


def test_unlearn_query_changes_only_target_group(work):
    fisher = load_file(str(work / "fisher.safetensors"))
    for target in ("cross", "to_kv"):
        task, module, batch = _query(work)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        chosen = set(task.select_parameters(module, target))
        new = unlearn_query(task, module, batch, diag(fisher, chosen, 1e-3), N_ITEMS, target, lr=1e-3, steps=1,
                            num_draws=4, seed=0, mask=False, draws_per_forward=4)
        assert set(new) == chosen
        after = module.state_dict()
        net_prefix = "diffusion.model."
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {net_prefix + k for k in chosen}, changed ^ {net_prefix + k for k in chosen}
        for k in chosen:
            assert torch.equal(new[k], after[net_prefix + k])
            assert new[k].data_ptr() != after[net_prefix + k].data_ptr()  # a copy: the model can be reset after


def test_unlearn_query_one_and_two_steps_by_hand(work):
    fisher = load_file(str(work / "fisher.safetensors"))
    kw = dict(target="self", lr=0.05, num_draws=4, seed=1, draws_per_forward=2)
    damping = 1.0
    # by hand: two updates, the second at the updated weights (draws keyed 'unlearn/<id>', M_U on)
    task, model, batch = _query(work)
    params = task.select_parameters(model, "self")
    precond = diag(fisher, params, damping)
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    grad = dict(namespace=UNLEARN, mask=True, draws_per_forward=2)
    g0 = loss_gradient(task, model, params, batch, 1, 4, **grad)
    theta1 = hand_eq2(theta0, g0, fisher, kw["lr"], N_ITEMS, damping)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(theta1[k])
    g1 = loss_gradient(task, model, params, batch, 1, 4, **grad)
    theta2 = hand_eq2(theta1, g1, fisher, kw["lr"], N_ITEMS, damping)
    stale = hand_eq2(theta1, g0, fisher, kw["lr"], N_ITEMS, damping)  # wrong: reuses the first gradient

    t1, m1, b1 = _query(work)
    one = unlearn_query(t1, m1, b1, precond, N_ITEMS, steps=1, mask=True, **kw)
    t2, m2, b2 = _query(work)
    two = unlearn_query(t2, m2, b2, precond, N_ITEMS, steps=2, mask=True, **kw)
    for k in params:
        d1 = float((theta1[k] - theta0[k]).abs().max())
        torch.testing.assert_close(one[k], theta1[k], rtol=0, atol=1e-4 * d1)
        torch.testing.assert_close(two[k], theta2[k], rtol=0, atol=1e-4 * d1)
    # the test can tell the two apart: the stale-gradient update is far from the true second step
    gap = max(float((theta2[k] - stale[k]).abs().max()) for k in params)
    step = max(float((theta1[k] - theta0[k]).abs().max()) for k in params)
    assert gap > 0.1 * step  # measured: gap ~ 1.9 x step (lr 0.05, damping 1)
    # and the unlearning ascends the query loss
    t0, m0, _ = _query(work)
    with torch.no_grad():
        l0 = t0.item_loss(m0, b1, 9, 8, namespace="s/")
        l1 = t1.item_loss(m1, b1, 9, 8, namespace="s/")
    assert float(l1) > float(l0)


# ---------------------------------------------------------------- run_unlearn (the `musicattr unlearn` function)


def test_run_unlearn_writes_only_changed_tensors_with_metadata(work, tmp_path):
    out = tmp_path / "sub" / "q.safetensors"
    meta = run_unlearn(str(work / "theta0.ckpt"), str(work / "fisher.safetensors"), str(out),
                       query_item="audio/track004.wav", store=str(work / "store"), lr=1e-3, steps=1, num_draws=6,
                       target="cross", strategy="mixed", damping=1e-3, seed=0, draws_per_forward=4)
    tensors, saved = load_unlearned(str(out))
    task, model, batch = _query(work)
    chosen = task.select_parameters(model, "cross")
    assert set(tensors) == set(chosen)
    assert saved == json.loads(json.dumps(meta))
    assert saved["query_id"] == "audio/track004.wav" and saved["query_item"] == "audio/track004.wav"
    assert saved["lr"] == 1e-3 and saved["steps"] == 1 and saved["target"] == "cross"
    assert saved["strategy"] == "mixed" and saved["mask_unlearn"] is True and saved["mask_loss"] is False
    assert saved["checkpoint_fingerprint"] == file_fingerprint(str(work / "theta0.ckpt"))
    assert saved["num_items"] == N_ITEMS and saved["num_draws"] == 6 and saved["damping"] == 1e-3
    assert saved["fisher_fingerprint"] == file_fingerprint(str(work / "fisher.safetensors"))
    # the values: Eq. 2 with the masked query loss over draws keyed 'unlearn/<id>'
    g = loss_gradient(task, model, chosen, batch, 0, 6, namespace=UNLEARN, mask=True, draws_per_forward=6)
    exp = hand_eq2({k: p.detach() for k, p in chosen.items()}, g, load_file(str(work / "fisher.safetensors")),
                   1e-3, N_ITEMS, 1e-3)
    for k in chosen:
        d = float((exp[k] - chosen[k].detach()).abs().max())
        assert d > 0
        torch.testing.assert_close(tensors[k], exp[k], rtol=0, atol=1e-4 * d)
    # M_U matters on a padded item: strategy 'none' (no mask) gives another update
    out2 = tmp_path / "q_none.safetensors"
    run_unlearn(str(work / "theta0.ckpt"), str(work / "fisher.safetensors"), str(out2),
                query_item="4", store=str(work / "store"), lr=1e-3, num_draws=6, target="cross", strategy="none",
                draws_per_forward=4)
    t2, m2 = load_unlearned(str(out2))
    assert m2["mask_unlearn"] is False and m2["query_id"] == "audio/track004.wav"  # the index names the same item
    assert any(not torch.equal(t2[k], tensors[k]) for k in tensors)


def test_run_unlearn_refuses_fisher_of_another_checkpoint(work, tmp_path):
    other = save_checkpoint(make_module(seed=5), tmp_path / "other.ckpt")
    with pytest.raises(FisherMismatchError, match="rerun `musicattr fisher`"):
        run_unlearn(other, str(work / "fisher.safetensors"), str(tmp_path / "q.safetensors"),
                    query_item="audio/track004.wav", store=str(work / "store"), num_draws=2)
    assert not (tmp_path / "q.safetensors").exists()


def test_query_batch_arguments(work):
    with pytest.raises(ValueError, match="exactly one"):
        query_batch()
    with pytest.raises(ValueError, match="exactly one"):
        query_batch(query="x.safetensors", query_item="1", store=str(work / "store"))
    with pytest.raises(ValueError, match="store"):
        query_batch(query_item="1")
    a = query_batch(query_item="3", store=str(work / "store"))
    b = query_batch(query_item="audio/track003.wav", store=str(work / "store"))
    assert a["item_id"] == b["item_id"] == ["audio/track003.wav"]
    assert torch.equal(a["latents"], b["latents"]) and a["latents"].shape == (1, 4, 16)
    with pytest.raises(KeyError):
        query_batch(query_item="nope", store=str(work / "store"))


def test_query_item_with_a_digit_only_id_is_that_item(tmp_path):
    ids = [f"{1000 + i}" for i in range(5)]
    make_store(tmp_path / "s", n=5, item_ids=ids)
    b = query_batch(query_item="1003", store=str(tmp_path / "s"))
    assert b["item_id"] == ["1003"]
    assert query_batch(query_item="3", store=str(tmp_path / "s"))["item_id"] == ["1003"]  # index 3


@pytest.mark.slow
@pytest.mark.paths
def test_unlearn_cli_matches_function(work, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the tests' thread count (conftest)
    args = ["--checkpoint", work / "theta0.ckpt", "--fisher", work / "fisher.safetensors", "--out",
            tmp_path / "cli.safetensors", "--query_item", "audio/track002.wav", "--store", work / "store",
            "--lr", "0.002", "--steps", "2", "--num_draws", "5", "--target", "to_kv", "--strategy", "mixed"]
    r = subprocess.run([sys.executable, "-m", "musicattr.cli", "unlearn", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    run_unlearn(str(work / "theta0.ckpt"), str(work / "fisher.safetensors"), str(tmp_path / "fn.safetensors"),
                query_item="audio/track002.wav", store=str(work / "store"), lr=0.002, steps=2, num_draws=5,
                target="to_kv", strategy="mixed")
    a, ma = load_unlearned(str(tmp_path / "cli.safetensors"))
    b, mb = load_unlearned(str(tmp_path / "fn.safetensors"))
    assert set(a) == set(b) == {f"model.transformer.layers.{i}.cross_attn.to_kv.weight" for i in range(2)}
    for k in a:  # a CLI process against this one: to float32 rounding of the query gradient
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert {k: v for k, v in ma.items() if k != "out"} == {k: v for k, v in mb.items() if k != "out"}
    assert ma["steps"] == 2 and ma["target"] == "to_kv"
    with safe_open(str(tmp_path / "cli.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["strategy"]) == "mixed"


# ---------------------------------------------------------------- masking strategies


def test_masking_strategies():
    assert resolve_masks("mixed") == (True, False)
    assert resolve_masks("both") == (True, True)
    assert resolve_masks("none") == (False, False)
    assert resolve_masks(None) == (True, False)  # the paper's choice is the default
    assert resolve_masks("mixed", mask_loss=True) == (True, True)
    assert resolve_masks("both", mask_unlearn=False) == (False, True)
    assert set(STRATEGIES) == {"none", "both", "mixed"}
    with pytest.raises(ValueError, match="unknown masking strategy"):
        resolve_masks("half")


def test_all_zero_fisher_is_refused_not_nan():
    theta = {"w": torch.ones(3)}
    grad = {"w": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="Fisher is zero on every target tensor"):
        diag({"w": torch.zeros(3)}, grad, 1e-3)


# ---------------------------------------------------------------- updates below float32 resolution


def test_vanished_updates_are_counted_and_warned(work, tmp_path, caplog):
    """An update below float32 resolution leaves theta unchanged: the file says how many elements moved."""
    kw = dict(query_item="audio/track004.wav", store=str(work / "store"), num_draws=4, target="cross",
              draws_per_forward=4)
    module = load_diffusion_module(str(work / "theta0.ckpt"))
    theta0 = {k: p.detach() for k, p in SATDiffusionTask().select_parameters(module, "cross").items()}
    total = sum(v.numel() for v in theta0.values())
    with caplog.at_level("INFO", logger="musicattr"):
        meta = run_unlearn(str(work / "theta0.ckpt"), str(work / "fisher.safetensors"), str(tmp_path / "tiny.st"),
                           lr=1e-14, **kw)
    tensors, saved = load_unlearned(str(tmp_path / "tiny.st"))
    moved = sum(int((tensors[k] != theta0[k]).sum()) for k in theta0)
    assert saved["changed_elements"] == meta["changed_elements"] == moved < 0.5 * total
    assert saved["target_elements"] == total
    assert any(r.levelname == "WARNING" and "below the resolution" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="musicattr"):
        meta = run_unlearn(str(work / "theta0.ckpt"), str(work / "fisher.safetensors"), str(tmp_path / "big.st"),
                           lr=1e-3, **kw)
    tensors, _ = load_unlearned(str(tmp_path / "big.st"))
    assert meta["changed_elements"] == sum(int((tensors[k] != theta0[k]).sum()) for k in theta0) > 0.5 * total
    assert not any(r.levelname == "WARNING" for r in caplog.records)


def test_reuse_keeps_only_a_file_made_with_the_same_settings(work, tmp_path):
    """reuse=True: the same settings keep the file; any other setting, checkpoint or Fisher recomputes it."""
    out = str(tmp_path / "q.safetensors")
    kw = dict(query_item="audio/track004.wav", store=str(work / "store"), lr=1e-3, num_draws=4, target="to_kv",
              draws_per_forward=4, reuse=True)
    ckpt, fisher = str(work / "theta0.ckpt"), str(work / "fisher.safetensors")
    first = run_unlearn(ckpt, fisher, out, **kw)
    mtime = os.stat(out).st_mtime_ns
    assert run_unlearn(ckpt, fisher, out, **kw) == first and os.stat(out).st_mtime_ns == mtime  # reused
    for change in ({"lr": 2e-3}, {"steps": 2}, {"num_draws": 5}, {"target": "self"}, {"strategy": "none"},
                   {"damping": 1e-2}, {"seed": 1}, {"query_item": "audio/track005.wav"}):
        meta = run_unlearn(ckpt, fisher, out, **{**kw, **change})
        key = next(iter(change))
        saved = load_unlearned(out)[1]
        assert saved[key if key != "query_item" else "query_id"] == change[key], change
        assert meta == saved
    other = save_checkpoint(make_module(seed=7), tmp_path / "other.ckpt")
    fisher_other = tmp_path / "fisher-other.safetensors"
    tensors, fmeta = load_file(fisher), json.loads(json.dumps(load_unlearned(fisher)[1]))
    save_file({k: v * 2 for k, v in tensors.items()}, str(fisher_other), metadata={k: json.dumps(v) for k, v in
                                                                                     fmeta.items()})
    run_unlearn(ckpt, fisher, out, **kw)
    assert load_unlearned(out)[1]["fisher_fingerprint"] == file_fingerprint(fisher)
    run_unlearn(ckpt, str(fisher_other), out, **kw)
    assert load_unlearned(out)[1]["fisher_fingerprint"] == file_fingerprint(str(fisher_other))
    with pytest.raises(FisherMismatchError):  # another checkpoint: its Fisher is refused, the file kept
        run_unlearn(other, fisher, out, **kw)
