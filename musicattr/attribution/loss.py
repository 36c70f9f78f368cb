"""The draws and the loss shared by Fisher accumulation, unlearning and scoring.

The per-item loss of the contract (built by the attribution task, ``attribution/task.py``):

    L(z, theta; M) = 1/T * sum_{j<T} || M * (f_theta(z_t_j, t_j, c) - y_j) ||^2 / |M|

with (z_t, y) the task's forward process and target (the paper's v-objective lives with the SAT task,
``models/v_objective.py``), t_j from the task's timestep sampler (default t ~ U(0, 1)), eps ~ N(0, I) of the
latent's shape (any number of dimensions; the last is the frame axis). |M| counts latent frames x the other
dimensions: all frames (no mask) or only the non-padded ones (mask).

Draw j of item ``item_id`` is a pure function of (seed, item_id, j): it is generated on the
CPU from its own generator, so L(z_i, theta_unlearned) - L(z_i, theta0) compares the same
draws (common random numbers) whatever the batch, order, device or world size. Each purpose
draws from its own namespace: scoring keys draws by the bare item id, the Fisher by
``fisher/<id>``, unlearning by ``unlearn/<id>`` and the counterfactual query losses (losses of retrained
models) by ``counterfactual/<id>``, so no estimate reuses another's noise.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import torch

FISHER = "fisher/"    # draw namespace of the Fisher accumulation
UNLEARN = "unlearn/"  # draw namespace of the query loss that unlearning ascends
COUNTERFACTUAL = "counterfactual/"  # draw namespace of the query losses of retrained models (LDS, leave-K-out)


def draw_keys(namespace: str, item_ids: Sequence[str]) -> list[str]:
    """The keys ``namespace + id`` under which the draws of ``item_ids`` are made for one purpose."""
    return [namespace + str(i) for i in item_ids]


def draw_seed(seed: int, item_id: str, draw: int) -> int:
    """63-bit seed of draw ``draw`` of item ``item_id`` (blake2b; stable across runs and machines)."""
    digest = hashlib.blake2b(f"{seed}\x1f{item_id}\x1f{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class UniformTimesteps:
    """t_j = u_j ~ U(0, 1): the uniform draw of draw j itself."""

    def __call__(self, u: torch.Tensor, seed: int, key: str, j: int) -> torch.Tensor:
        return u

    def identity(self) -> dict:
        return {}  # the default: no key entry, so caches made before samplers existed stay valid


class DiscreteTimesteps:
    """t_j = (floor(u_j n) + 1) / (n + 1): one of n equally spaced timesteps in (0, 1), as DDPM-style models train."""

    def __init__(self, steps: int = 1000):
        self.steps = int(steps)

    def __call__(self, u: torch.Tensor, seed: int, key: str, j: int) -> torch.Tensor:
        return (torch.floor(u * self.steps).clamp_max(self.steps - 1) + 1) / (self.steps + 1)

    def identity(self) -> dict:
        return {"timesteps": f"discrete-{self.steps}"}


class StratifiedTimesteps:
    """t_j = (s_j + u_j) / S: draw j lies in stratum s_j of S equal strata of (0, 1). Within each block of S
    consecutive draws (b = j // S) the strata are a random permutation seeded by (seed, key, b), so each block
    covers (0, 1) once (T a multiple of S is exactly balanced) and draw j stays a pure function of (seed, key, j).
    Each t_j is still U(0, 1): the estimate stays unbiased; its variance loses the between-strata part."""

    def __init__(self, strata: int = 8):
        if strata < 1:
            raise ValueError(f"stratified timesteps need at least one stratum, got {strata}")
        self.strata = int(strata)

    def __call__(self, u: torch.Tensor, seed: int, key: str, j: int) -> torch.Tensor:
        block, r = divmod(int(j), self.strata)
        g = torch.Generator().manual_seed(draw_seed(seed, key + "\x1fstrata", block))
        return (torch.randperm(self.strata, generator=g)[r] + u) / self.strata

    def identity(self) -> dict:
        return {"timesteps": f"stratified-{self.strata}"}


def timesteps_from(spec: str | None):
    """A timestep sampler from its name: 'uniform', 'stratified-S' or 'discrete-N' (None: uniform)."""
    name, _, arg = (spec or "uniform").partition("-")
    try:
        if name == "uniform" and not arg:
            return UNIFORM
        if name == "stratified":
            return StratifiedTimesteps(int(arg or 8))
        if name == "discrete":
            return DiscreteTimesteps(int(arg or 1000))
    except ValueError:
        pass
    raise ValueError(f"unknown timesteps {spec!r}; fix: 'uniform', 'stratified-S' (S strata, e.g. stratified-8) "
                     "or 'discrete-N'")


def make_draws(seed: int, item_ids: Sequence[str], draws: Sequence[int], shape: tuple[int, ...],
               timesteps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t [B, D] and noise eps [B, D, *shape] for items x draw indices (CPU, float32).

    Draw j of an item takes u_j (then eps_j) from a generator seeded by (seed, item, j); ``timesteps`` maps
    u_j to t_j (default ``UniformTimesteps``: t_j = u_j)."""
    timesteps = timesteps or UNIFORM
    t = torch.empty(len(item_ids), len(draws))
    eps = torch.empty(len(item_ids), len(draws), *shape)
    g = torch.Generator()
    for b, item in enumerate(item_ids):
        for d, j in enumerate(draws):
            g.manual_seed(draw_seed(seed, str(item), int(j)))
            u = torch.rand((), generator=g)
            eps[b, d] = torch.randn(tuple(shape), generator=g)
            t[b, d] = timesteps(u, seed, str(item), int(j))
    return t, eps


UNIFORM = UniformTimesteps()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per row of [N, ..., L]; over all frames, or the frames where mask [N, L] is true."""
    se = (pred.float() - target.float()).pow(2)
    se = se.mean(tuple(range(1, se.dim() - 1))) if se.dim() > 2 else se  # [N, L]
    if frame_mask is None:
        return se.mean(-1)
    m = frame_mask.to(se.dtype)
    return (se * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def repeat_conditioning(cond: Mapping[str, object], repeats: int) -> dict:
    """Repeat each batched conditioning tensor ``repeats`` times along dim 0 (item-major)."""
    return {k: (v.repeat_interleave(repeats, 0) if torch.is_tensor(v) else v) for k, v in cond.items()}


def frame_mask_from_lengths(valid_frames: torch.Tensor, length: int) -> torch.Tensor:
    """Padding mask [B, L]: true on the first ``valid_frames`` latent frames of each item."""
    return torch.arange(length, device=valid_frames.device)[None, :] < valid_frames[:, None]
