"""Fidelity of the attribution index to exact unlearning (``scripts/index_fidelity.py``, ``make index-fidelity``).

For each query, an estimate of the scores (the index at some k, or the unprojected first-order product
<phi_i, psi>) is compared with the exact Eq. 1 scores of ``musicattr attribute``, and its relative score
estimate / s_i with the exact relative score:

    spearman    rank correlation over all N training items
    top10       |top-10 of the estimate  and  top-10 of the exact scores|   (0..10)
    top100      the same for the top 100 (min(100, N))

The unprojected first-order row separates the two errors: first order vs Eq. 1 (the step is not
infinitesimal, the unlearned weights are cast to float32, the losses carry float noise) and projection
(the index at k vs the unprojected product).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from musicattr.evaluation.metrics import correlations


def topk_overlap(estimate: np.ndarray, exact: np.ndarray, k: int) -> int:
    """How many of the k highest exact scores are among the k highest estimates (ties broken by position)."""
    k = min(k, len(exact))
    top = lambda v: set(np.argsort(-np.asarray(v, dtype=np.float64), kind="stable")[:k].tolist())  # noqa: E731
    return len(top(estimate) & top(exact))


def agreement(estimate: np.ndarray, exact: np.ndarray, ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """Spearman correlation and top-k overlaps of one query's estimated scores with its exact scores."""
    out = {"spearman": correlations(torch.as_tensor(estimate), torch.as_tensor(exact))["spearman"]}
    out.update({f"top{k}": float(topk_overlap(estimate, exact, k)) for k in ks})
    return out


def first_order_scores(task, model, params: Mapping[str, torch.nn.Parameter], precond,
                       store, psis: Sequence[Mapping[str, torch.Tensor]], seed: int, num_draws: int, *,
                       mask: bool = False, draws_per_forward: int = 32, batch_size: int = 8,
                       progress=None) -> tuple[np.ndarray, np.ndarray]:
    """The unprojected first-order scores <phi_i, psi_q> [N, Q] and s_i [N] for every item of ``store``
    (positions in store order): one pass of per-item gradients with the index's draws, nothing stored per item."""
    from musicattr.attribution.gradients import preconditioned_gradients
    from musicattr.data.datamodules import collate_items

    n, q = len(store), len(psis)
    dots, sq = np.zeros((n, q)), np.zeros(n)
    device = next(iter(params.values())).device
    psis = [{k: v.to(device, torch.float64) for k, v in psi.items()} for psi in psis]
    for start in range(0, n, batch_size):
        batch = collate_items([store[p] for p in range(start, min(n, start + batch_size))])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

        def take(j: int, name: str, phi: torch.Tensor) -> None:
            phi = phi.double()
            sq[start + j] += float(phi.pow(2).sum())
            for c, psi in enumerate(psis):
                if name in psi:
                    dots[start + j, c] += float((phi * psi[name]).sum())

        preconditioned_gradients(task, model, params, precond, batch, seed, num_draws, take, mask=mask,
                                 draws_per_forward=draws_per_forward)
        if progress:
            progress(min(n, start + batch_size), n)
    return dots, np.sqrt(sq)
