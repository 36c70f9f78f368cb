"""The seams of the attribution core: it imports without stable-audio-tools or any model code, and a task with
another latent shape (2-D latents [C, H, L]) and another timestep sampler (discrete) runs through the Fisher,
unlearning (Eq. 2), scoring (Eq. 1) and the index's per-item gradients with no change to those modules; each
result is checked against the same quantity computed by hand from the bare network."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from conftest import BareNetTask
from musicattr.attribution.fisher import squared_grads_loop, squared_grads_vmap
from musicattr.attribution.gradients import preconditioned_gradients
from musicattr.attribution.loss import UNLEARN, DiscreteTimesteps, make_draws
from musicattr.attribution.preconditioner import DiagonalFisher
from musicattr.attribution.task import AttributionTask
from musicattr.attribution.unlearn import loss_gradient, unlearn_query

ROOT = Path(__file__).resolve().parents[2]


def test_attribution_core_imports_without_stable_audio_tools_or_model_code():
    """Block stable-audio-tools (and k-diffusion, which SAT's model modules need) and import every module of
    musicattr.attribution in a fresh interpreter: none may import musicattr.models, evaluation or report."""
    code = """
import importlib, pkgutil, sys
for blocked in ("stable_audio_tools", "k_diffusion"):
    sys.modules[blocked] = None  # `import stable_audio_tools` now raises ImportError
import musicattr.attribution as core
names = [m.name for m in pkgutil.iter_modules(core.__path__, "musicattr.attribution.")]
for name in names:
    importlib.import_module(name)
leaks = sorted(m for m in sys.modules if m.split(".")[:2] in (["musicattr", "models"], ["musicattr", "evaluation"],
                                                               ["musicattr", "report"]))
print(len(names), "modules", "leaks:", leaks)
assert not leaks, leaks
try:
    import stable_audio_tools  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the block did not hold")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                            "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "leaks: []" in r.stdout and int(r.stdout.split()[0]) >= 10


# ---------------------------------------------------------------- a task with 2-D latents and discrete timesteps


class Denoiser2d(nn.Module):
    """eps_theta(z_t, t): two 2-d convolutions over latents [N, C, H, L], time added after the first."""

    def __init__(self, channels: int = 2, width: int = 6):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z_t, t):
        return self.out(torch.tanh(self.inp(z_t) + self.time(t[:, None])[:, :, None, None]))


class Task2d(BareNetTask, AttributionTask):
    """Epsilon prediction, z_t = sqrt(1 - t) z + sqrt(t) eps, t one of 50 discrete timesteps; the frame axis is
    the last of [C, H, L] (the mask covers it)."""

    parameter_groups = {"all": r"^(inp|out)\.", "out": r"^out\."}
    timesteps = DiscreteTimesteps(50)

    def noise(self, z, t, eps):
        a, s = (1 - t).sqrt().view(-1, 1, 1, 1), t.sqrt().view(-1, 1, 1, 1)
        return a * z + s * eps, eps

    def predict(self, model, z_t, t, cond, params=None):
        if params is None:
            return model(z_t, t)
        return torch.func.functional_call(model, dict(params), (z_t, t))


def _setup():
    torch.manual_seed(0)
    model = Denoiser2d().double().float()
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(3, 2, 4, 8, generator=g), "valid_frames": torch.tensor([8, 5, 3]),
             "item_id": ["a", "b", "c"]}
    return Task2d(), model, batch


def hand_loss(model, z, valid, key, seed, draws, mask=False):
    """1/T sum_j mean over (C x H x counted frames) of (eps_theta(z_t, t) - eps)^2, t = (floor(50 u) + 1) / 51."""
    total = 0.0
    for j in draws:
        u, eps = make_draws(seed, [key], [j], tuple(z.shape))
        t, eps = (torch.floor(u[:, 0] * 50) + 1) / 51, eps[:, 0]
        z_t = (1 - t).sqrt() * z[None] + t.sqrt() * eps
        se = (model(z_t, t) - eps).pow(2)[0]  # [C, H, L]
        total = total + (se[..., :valid].mean() if mask else se.mean())
    return total / len(draws)


def test_the_2d_task_draws_its_own_shape_and_timesteps():
    task, _, _ = _setup()
    t, eps = task.draws(0, ["a", "b"], range(40), (2, 4, 8))
    assert eps.shape == (2, 40, 2, 4, 8)
    levels = (t * 51).round()
    assert torch.allclose(t * 51, levels, atol=1e-4) and levels.min() >= 1 and levels.max() <= 50  # discrete
    assert task.identity() == {"task": f"{__name__}.Task2d", "timesteps": "discrete-50"}


def test_the_2d_task_through_loss_fisher_unlearning_scoring_and_index():
    task, model, batch = _setup()
    params = task.select_parameters(model, "all")
    names = list(params)
    z, valid, ids = batch["latents"], batch["valid_frames"], batch["item_id"]
    # the loss of the contract (scoring draws: bare ids)
    with torch.no_grad():
        loss = task.item_loss(model, batch, 0, 5, mask=True, draws_per_forward=2)
        hand = torch.stack([hand_loss(model, z[i], int(valid[i]), ids[i], 0, range(5), mask=True) for i in range(3)])
    torch.testing.assert_close(loss.float(), hand, rtol=1e-5, atol=0)
    # Fisher: sum over items and draws of squared per-sample gradients, vmap = loop = by hand
    vm = squared_grads_vmap(task, model, params, batch, 0, range(3), chunk_size=4)
    lp = squared_grads_loop(task, model, params, batch, 0, range(3))
    ref = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for i in range(3):
        for j in range(3):
            g = torch.autograd.grad(hand_loss(model, z[i], 8, "fisher/" + ids[i], 0, [j]), list(params.values()))
            for k, gk in zip(names, g):
                ref[k] += gk.double().pow(2)
    for k in names:
        torch.testing.assert_close(vm[k], ref[k], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(lp[k], ref[k], rtol=1e-4, atol=1e-9)
    fisher = {k: (v / 9).float() for k, v in ref.items()}
    precond = DiagonalFisher(fisher, names, 1e-2)
    # Eq. 2 on the query (item 'b', unlearning draws, M_U on), by hand
    query = {k: v[1:2] for k, v in batch.items()}
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    gq = torch.autograd.grad(hand_loss(model, z[1], 5, "unlearn/b", 0, range(4), mask=True), list(params.values()))
    lam = 1e-2 * float(torch.cat([fisher[k].double().flatten() for k in names]).mean())
    expected = {k: theta0[k].double() + 0.5 / 3 * g.double() / (fisher[k].double() + lam) for k, g in zip(names, gq)}
    new = unlearn_query(task, model, query, precond, 3, "all", lr=0.5, steps=1, num_draws=4, seed=0, mask=True,
                        draws_per_forward=3)
    for k in names:
        step = float((expected[k] - theta0[k].double()).abs().max())
        assert step > 0
        torch.testing.assert_close(new[k].double(), expected[k], rtol=0, atol=1e-4 * step)
    # Eq. 1: tau_i = L(z_i, theta_u) - L(z_i, theta0), the same draws on both sides; and at a small step
    # theta0 + h (theta_u - theta0), tau_i / h against its first order <g_i, theta_u - theta0>
    h = 1e-3
    with torch.no_grad():
        unlearned = task.item_loss(model, batch, 0, 6)
        for k, p in params.items():
            p.copy_(theta0[k] + h * (new[k] - theta0[k]))
        small = task.item_loss(model, batch, 0, 6)
        for k, p in params.items():
            p.copy_(theta0[k])
        base = task.item_loss(model, batch, 0, 6)
    assert float(unlearned[1] - base[1]) > 0  # unlearning raised the query's own loss
    # the index's per-item gradients: <phi_i, psi> with phi = P^1/2 g_i (the hook, tensor by tensor) and
    # psi = P^-1/2 (theta_u - theta0) is <g_i, theta_u - theta0>, the first order of tau_i
    phi = {i: {} for i in range(3)}
    preconditioned_gradients(task, model, params, precond, batch, 0, 6, lambda j, n, v: phi[j].__setitem__(n, v))
    psi = precond.apply_root({k: new[k].double() - theta0[k].double() for k in names})
    dots = torch.tensor([sum(float((phi[i][k].double() * psi[k]).sum()) for k in names) for i in range(3)],
                        dtype=torch.float64)
    first = []
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        g = loss_gradient(task, model, params, one, 0, 6)
        first.append(sum(float((g[k] * (new[k].double() - theta0[k].double())).sum()) for k in names))
    first = torch.tensor(first, dtype=torch.float64)
    torch.testing.assert_close(dots, first, rtol=1e-4, atol=1e-9)
    slope = (small - base) / h
    print("tau / h:", slope.tolist(), "first order:", first.tolist())
    torch.testing.assert_close(slope, first, rtol=0.05, atol=0.01 * float(first.abs().max()))


def test_shared_draws_give_every_item_the_same_draws_and_key_their_caches():
    """Common random numbers: with shared_draws draw j is one (t_j, eps_j) for every item, in every purpose that
    asks the task for its keys (scoring, the Fisher); the default stays per item, and the identity says which."""
    from musicattr.attribution.fisher import squared_grads_loop

    _, model, batch = _setup()
    shared, own = Task2d(shared_draws=True), Task2d()
    assert shared.identity() == {**own.identity(), "draws": "shared"} and "draws" not in own.identity()
    assert shared.draw_keys("score/", ["a", "b"]) == ["score/*", "score/*"]
    t, eps = shared.draws(0, shared.draw_keys("", ["a", "b", "c"]), range(4), (2, 4, 8))
    assert torch.equal(t[0], t[1]) and torch.equal(eps[0], eps[2])
    t_own, _ = own.draws(0, own.draw_keys("", ["a", "b"]), range(4), (2, 4, 8))
    assert not torch.equal(t_own[0], t_own[1])
    # the per-draw losses of two identical items agree only when their draws are shared
    twin = {**batch, "latents": batch["latents"][[0, 0]], "valid_frames": batch["valid_frames"][[0, 0]],
            "item_id": ["a", "b"]}
    with torch.no_grad():
        ls, lo = shared.draw_losses(model, twin, 3, 4), own.draw_losses(model, twin, 3, 4)
    # two rows of one batched forward: equal up to float rounding (kernels may differ by row on other CPUs)
    assert torch.allclose(ls[0], ls[1], rtol=1e-6, atol=0) and not torch.allclose(lo[0], lo[1])
    # the Fisher takes its draws from the task too: under shared draws the twins' sum is twice one of them
    params = shared.select_parameters(model, "all")
    one = {k: v[:1] if torch.is_tensor(v) else ["z"] for k, v in twin.items()}
    sq_twin = squared_grads_loop(shared, model, params, twin, 0, range(2))
    sq_one = squared_grads_loop(shared, model, params, one, 0, range(2))
    for k in sq_one:
        assert torch.allclose(sq_twin[k], 2 * sq_one[k], rtol=1e-6, atol=1e-15)
