"""The settings that every stage passes on as a group: how a query is unlearned, how the store is scored.

``UnlearnSettings`` is Eq. 2 for one query,

    theta' = theta0 + lr (1/N) (F + lambda)^-1 grad_theta L(query; theta0, K draws, M_U),   ``steps`` times,

over the tensors of the ``target`` layer group, lambda = damping * mean(F), M_U from the masking
``strategy``. ``ScoreSettings`` is Eq. 1 over the store,

    tau_i = L(z_i, theta') - L(z_i, theta0),   T = ``draws`` (t, eps) draws per item, ``batch_size`` items a step,

with the relative score tau_i / s_i where ``relative``. In a config they are the keys ``unlearning:`` and
``scoring:`` of ``musicattr compare`` and ``musicattr evaluate``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class UnlearnSettings:
    """Eq. 2. Args: lr (the paper: 1e-6), steps, num_draws (K query draws; the paper: 2048), target (layer
    group: all, self, cross, to_kv or a regex), strategy (masks: mixed, both, none), damping (lambda / mean F)."""

    lr: float = 1e-6
    steps: int = 1
    num_draws: int = 128
    target: str = "all"
    strategy: str = "mixed"
    damping: float = 1e-3

    def kwargs(self) -> dict:
        """The keyword arguments of ``run_unlearn``."""
        return asdict(self)


@dataclass(frozen=True)
class ScoreSettings:
    """Eq. 1. Args: draws (T per item; the paper: 16), batch_size (items per prediction step), relative
    (also tau_i / s_i, RelatIF)."""

    draws: int = 32
    batch_size: int = 16
    relative: bool = True
