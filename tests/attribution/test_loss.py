"""The per-item loss contract (attribution/loss.py, built by AttributionTask in attribution/task.py): draws
are a pure function of (seed, item id, draw index), the loss of an item does not depend on its batch, masking
averages valid frames only, and the v-objective formulas of Salimans & Ho (2022)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import BareNetTask, make_module, make_store
from musicattr.attribution.loss import draw_seed, frame_mask_from_lengths, make_draws, masked_mse
from musicattr.models.v_objective import v_objective
from musicattr.attribution.task import AttributionTask
from musicattr.data.datamodules import collate_items
from musicattr.models.sat_task import SATDiffusionTask



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("loss") / "store", n=6)
    return (SATDiffusionTask(), make_module()), store


def _batch(store, positions):
    return collate_items([store[p] for p in positions])


# ---------------------------------------------------------------- draws


def test_draws_independent_of_batch_composition_and_order():
    shape = (4, 16)
    ids = ["a/x.wav", "b/y.wav", "c/z.wav"]
    t, eps = make_draws(7, ids, range(5), shape)
    assert t.shape == (3, 5) and eps.shape == (3, 5, 4, 16)
    assert t.dtype == torch.float32 and eps.dtype == torch.float32
    # each item alone, each draw alone, and reversed orders give bit-identical draws
    for b, item in enumerate(ids):
        t1, e1 = make_draws(7, [item], range(5), shape)
        assert torch.equal(t1[0], t[b]) and torch.equal(e1[0], eps[b])
        for j in range(5):
            tj, ej = make_draws(7, [item], [j], shape)
            assert torch.equal(tj[0, 0], t[b, j]) and torch.equal(ej[0, 0], eps[b, j])
    tr, er = make_draws(7, ids[::-1], [4, 3, 2, 1, 0], shape)
    assert torch.equal(tr, t.flip(0).flip(1)) and torch.equal(er, eps.flip(0).flip(1))
    # repeated calls (global RNG state in between) are identical
    torch.manual_seed(123)
    torch.rand(10)
    t2, e2 = make_draws(7, ids, range(5), shape)
    assert torch.equal(t2, t) and torch.equal(e2, eps)


def test_draws_differ_by_seed_item_and_index():
    shape = (2, 8)
    t, eps = make_draws(0, ["a", "b"], [0, 1], shape)
    assert not torch.equal(eps[0, 0], eps[1, 0])   # another item
    assert not torch.equal(eps[0, 0], eps[0, 1])   # another draw
    t_s, eps_s = make_draws(1, ["a", "b"], [0, 1], shape)
    assert not torch.equal(eps_s, eps)             # another seed
    assert ((t >= 0) & (t < 1)).all()
    # unlearning draws of a query are keyed by 'unlearn/<id>', distinct from its scoring draws
    assert draw_seed(0, "unlearn/a", 0) != draw_seed(0, "a", 0)
    # the seed fits in 63 bits (torch.Generator.manual_seed accepts it) and is stable across processes
    s = draw_seed(0, "audio/track000.wav", 3)
    assert 0 <= s < 2 ** 63
    assert s == draw_seed(0, "audio/track000.wav", 3)


def test_draw_seed_is_not_item_id_collision_prone():
    # the separator keeps ("1", 23) and ("12", 3) apart
    assert draw_seed(0, "1", 23) != draw_seed(0, "12", 3)
    assert draw_seed(1, "2", 3) != draw_seed(12, "", 3)


# ---------------------------------------------------------------- item_loss independence of batching


@pytest.mark.paths
@pytest.mark.parametrize("use_mask", [False, True])
def test_item_loss_same_alone_or_in_batch(setup, use_mask):
    (task, model), store = setup
    positions = list(range(6))
    b = _batch(store, positions)
    with torch.no_grad():
        ref = task.item_loss(model, b, 3, 6, mask=use_mask, draws_per_forward=6)
        assert ref.dtype == torch.float64 and ref.shape == (6,)
        # other chunkings of the draws
        for dpf in (1, 4, 8):
            other = task.item_loss(model, b, 3, 6, mask=use_mask, draws_per_forward=dpf)
            np.testing.assert_allclose(other.numpy(), ref.numpy(), rtol=1e-6)
        # each item alone
        for p in positions:
            alone = task.item_loss(model, _batch(store, [p]), 3, 6, mask=use_mask, draws_per_forward=4)
            np.testing.assert_allclose(alone.numpy(), ref[p:p + 1].numpy(), rtol=1e-6)
        # another batch composition and order
        perm = [4, 1, 5]
        sub = task.item_loss(model, _batch(store, perm), 3, 6, mask=use_mask, draws_per_forward=2)
        np.testing.assert_allclose(sub.numpy(), ref[perm].numpy(), rtol=1e-6)
        # another seed, or another draw namespace, gives other losses
        other_seed = task.item_loss(model, b, 4, 6, mask=use_mask, draws_per_forward=6)
        assert not torch.allclose(other_seed, ref, rtol=1e-3)
        other_namespace = task.item_loss(model, b, 3, 6, namespace="fisher/", mask=use_mask, draws_per_forward=6)
        assert not torch.allclose(other_namespace, ref, rtol=1e-3)


def test_item_loss_is_mean_of_draw_losses_and_draw_offset(setup):
    (task, model), store = setup
    b = _batch(store, [0, 2])
    with torch.no_grad():
        cond = task.conditioning(model, b)
        t, eps = make_draws(5, b["item_id"], range(2, 6), (4, 16))
        per = torch.stack([task.draw_loss(model, b["latents"], t[:, j], eps[:, j], cond) for j in range(4)], 1)
        assert per.shape == (2, 4)
        off = task.item_loss(model, b, 5, 4, draws_per_forward=3, draw_offset=2)
    np.testing.assert_allclose(off.numpy(), per.double().mean(1).numpy(), rtol=1e-6)


def test_item_loss_is_differentiable(setup):
    (task, model), store = setup
    w = task.net(model).model.transformer.layers[0].self_attn.to_qkv.weight
    loss = task.item_loss(model, _batch(store, [1]), 0, 3, draws_per_forward=2)
    (g,) = torch.autograd.grad(loss.sum(), [w])
    assert g.abs().sum() > 0


# ---------------------------------------------------------------- masking, by hand on a toy net


class ZeroTask(BareNetTask, AttributionTask):
    """The v-objective with a network that predicts zeros: the loss is the mean of v^2 (checked by hand)."""

    def noise(self, z, t, eps):
        return v_objective(z, t, eps)

    def predict(self, model, z_t, t, cond, params=None):
        return torch.zeros_like(z_t)


def _hand_loss(z, valid, item_id, seed, num_draws, use_mask):
    """1/T sum_j mean over (channels x counted frames) of v_j^2, with plain python/numpy math."""
    c, length = z.shape
    total = 0.0
    for j in range(num_draws):
        g = torch.Generator()
        g.manual_seed(draw_seed(seed, item_id, j))
        t = float(torch.rand((), generator=g))
        eps = torch.randn((c, length), generator=g).double().numpy()
        v = math.cos(math.pi * t / 2) * eps - math.sin(math.pi * t / 2) * z.double().numpy()
        frames = valid if use_mask else length
        total += float((v[:, :frames] ** 2).sum()) / (c * frames)
    return total / num_draws


@pytest.mark.parametrize("use_mask", [False, True])
def test_masked_loss_averages_valid_frames_only(use_mask):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 10, generator=g)
    valid = torch.tensor([3, 10, 6])
    ids = ["q0", "q1", "q2"]
    task, model = ZeroTask(), None
    loss = task.item_loss(model, {"latents": z, "valid_frames": valid, "item_id": ids}, 11, 5, mask=use_mask,
                          draws_per_forward=2)
    hand = [_hand_loss(z[i], int(valid[i]), ids[i], 11, 5, use_mask) for i in range(3)]
    np.testing.assert_allclose(loss.numpy(), hand, rtol=1e-6)
    if use_mask:  # the padded frames of z do not count at all
        z2 = z.clone()
        z2[0, :, 3:] = 1e3
        z2[2, :, 6:] = -7.0
        again = task.item_loss(model, {"latents": z2, "valid_frames": valid, "item_id": ids}, 11, 5, mask=True)
        np.testing.assert_allclose(again.numpy(), loss.numpy(), rtol=1e-6)


def test_masked_mse_by_hand():
    pred = torch.zeros(2, 2, 4)
    target = torch.tensor([[[1., 2., 3., 4.], [1., 2., 3., 4.]],
                           [[2., 2., 2., 2.], [0., 0., 0., 0.]]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    np.testing.assert_allclose(masked_mse(pred, target, None).numpy(), [7.5, 2.0])
    np.testing.assert_allclose(masked_mse(pred, target, mask).numpy(), [2.5, 2.0])
    # an empty mask does not divide by zero
    assert torch.isfinite(masked_mse(pred, target, torch.zeros(2, 4, dtype=torch.bool))).all()


def test_frame_mask_from_lengths():
    m = frame_mask_from_lengths(torch.tensor([0, 2, 5]), 5)
    assert m.dtype == torch.bool
    assert m.tolist() == [[False] * 5, [True, True, False, False, False], [True] * 5]


# ---------------------------------------------------------------- v-objective


def test_v_objective_formulas():
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(5, 3, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, 7, generator=g,
                                                                                dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t, v = v_objective(z, t, eps)
    for i, ti in enumerate(t.tolist()):
        a, s = math.cos(math.pi * ti / 2), math.sin(math.pi * ti / 2)
        torch.testing.assert_close(x_t[i], a * z[i] + s * eps[i])
        torch.testing.assert_close(v[i], a * eps[i] - s * z[i])
    # endpoints: t=0 is clean data with v = eps; t=1 is pure noise with v = -z
    torch.testing.assert_close(x_t[0], z[0])
    torch.testing.assert_close(v[0], eps[0])
    torch.testing.assert_close(x_t[4], eps[4], atol=1e-12, rtol=0)
    torch.testing.assert_close(v[4], -z[4], atol=1e-12, rtol=0)
    # inversion: z = alpha x_t - sigma v, eps = sigma x_t + alpha v
    a = torch.cos(t * math.pi / 2)[:, None, None]
    s = torch.sin(t * math.pi / 2)[:, None, None]
    torch.testing.assert_close(a * x_t - s * v, z)
    torch.testing.assert_close(s * x_t + a * v, eps)


# ---------------------------------------------------------------- timestep samplers (the draw design)


def test_stratified_timesteps_cover_every_stratum_once_per_block_and_stay_pure():
    from musicattr.attribution.loss import StratifiedTimesteps, timesteps_from

    s = StratifiedTimesteps(8)
    t, eps = make_draws(3, ["a", "b"], range(32), (2, 5), s)
    for item in range(2):
        for block in range(4):
            strata = sorted((t[item, 8 * block:8 * block + 8] * 8).floor().int().tolist())
            assert strata == list(range(8))  # one draw per stratum in every block of 8
    for j in (0, 7, 13, 31):  # draw j alone is the same draw: a pure function of (seed, key, j)
        tj, ej = make_draws(3, ["b"], [j], (2, 5), s)
        assert torch.equal(tj[0, 0], t[1, j]) and torch.equal(ej[0, 0], eps[1, j])
    _, eps_u = make_draws(3, ["a", "b"], range(32), (2, 5))
    assert torch.equal(eps, eps_u)  # the noise is the uniform design's: only t is stratified
    many, _ = make_draws(0, [f"k{i}" for i in range(50)], range(16), (1, 1), s)
    assert abs(float(many.mean()) - 0.5) < 0.02 and float(many.min()) > 0 and float(many.max()) < 1  # U(0, 1)
    assert timesteps_from("stratified-16").identity() == {"timesteps": "stratified-16"}
    with pytest.raises(ValueError, match="stratified-S"):
        timesteps_from("sobol")


def test_the_task_takes_its_draw_design_from_the_config():
    from musicattr.attribution.task import resolve_task

    task = SATDiffusionTask(timesteps="stratified-8")
    assert task.identity()["timesteps"] == "stratified-8"  # part of every cache and run key
    assert "timesteps" not in resolve_task(None).identity()  # the default (uniform) keeps the old keys
    t, _ = task.draws(0, ["x"], range(8), (4, 16))
    assert sorted((t[0] * 8).floor().int().tolist()) == list(range(8))
