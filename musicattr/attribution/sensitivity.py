"""Relative influence: Eq. 1 scores divided by each item's sensitivity (RelatIF, Barshan et al., 2020).

    s_i = sqrt( g_i^T (F + lambda)^-1 g_i ),   g_i = grad_theta L(z_i, theta0; M_L)  (unlearned tensors only)
    tau_rel_i = tau_i / s_i

To first order tau_i = lr/N * g_i^T (F + lambda)^-1 g_q, so tau_rel_i is proportional to the cosine
of g_i and g_q in the (F + lambda)^-1 metric: a track whose loss moves under any update (a "hub"
with a large ||g_i||) no longer outranks the tracks the query specifically shares directions with.
g_i uses the scoring draws of item i (the same T draws, seed and mask M_L as tau_i), and lambda the
unlearning run's damping, so s_i depends on (checkpoint, Fisher, unlearned tensors, damping, T,
seed, M_L) only: it is computed once and cached in ``<store>/sensitivity/`` for every later query
(``ScoringModule.sensitivity_key``); ``musicattr index`` computes the same s_i and fills that cache.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from musicattr.attribution.gradients import preconditioned_gradients
from musicattr.attribution.preconditioner import Preconditioner
from musicattr.attribution.task import AttributionTask


def item_sensitivity(task: AttributionTask, model, params: Mapping[str, torch.nn.Parameter],
                     precond: Preconditioner, batch: Mapping[str, Any], seed: int, num_draws: int, *,
                     mask: bool = False, draws_per_forward: int = 16) -> torch.Tensor:
    """s_i = ||phi_i|| for each item of ``batch`` as float64 [B], phi_i = P^1/2 g_i (P = (F + lambda)^-1 for
    the diagonal Fisher) from one backward pass per item of the task's scoring loss (bare-id draws; ``mask`` M_L),
    taken tensor by tensor (``musicattr.attribution.gradients``)."""
    sq = torch.zeros(len(batch["item_id"]), dtype=torch.float64)

    def add(j: int, name: str, phi: torch.Tensor) -> None:
        sq[j] += float(phi.double().pow(2).sum())

    preconditioned_gradients(task, model, params, precond, batch, seed, num_draws, add, mask=mask,
                             draws_per_forward=draws_per_forward)
    return sq.sqrt()
