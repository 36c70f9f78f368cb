"""Adaptive draws where the ranking is decided (racing, as in successive elimination).

After the first pass every item i has n_i = T draws of d_ij = L_j(z_i, theta_u) - L_j(z_i, theta0) (the same
draws on both sides), its score tau_i = mean_j d_ij and standard error SE_i = sd_j(d_ij) / sqrt(n_i). The top k
is decided at the boundary b = (tau_(k) + tau_(k+1)) / 2 between ranks k and k + 1: an item is undecided while

    |tau_i - b| <= z SE_i

Each round gives every undecided item ``step`` more draws (indices n_i .. n_i + step - 1: the draws a longer
first pass would have made, so the result is the plain estimate at n_i draws), recomputes b, and stops when
no item is undecided or the budget (extra item-draws, a fraction of the first pass's N T) is spent. Each
round is written to ``<out_dir>/adaptive/round-<r>.parquet`` as it finishes and read back on a rerun, so an
interrupted refinement resumes. Stopping depends on the data, so an item's final mean carries a small
selection bias (the usual price of racing); the table says how many draws each item got (``num_draws``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from musicattr.atomic import atomic_path

log = logging.getLogger(__name__)
# (item indices, first draw index, draws) -> per-draw losses (theta_u, theta0), each [m, draws]
ExtraDraws = Callable[[list[int], int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class DrawSums:
    """Per item: draws n, and the sums of d, d^2, L(theta_u) and L(theta0) over them (index-aligned arrays)."""

    index: np.ndarray
    n: np.ndarray
    sum_d: np.ndarray
    sumsq_d: np.ndarray
    sum_u: np.ndarray
    sum_0: np.ndarray

    @classmethod
    def from_table(cls, rows: pd.DataFrame, num_draws: int) -> "DrawSums":
        """From a first pass's rows (index, score, score_se, unlearned_loss, baseline_loss), T draws each."""
        t = float(num_draws)
        tau, se = rows["score"].to_numpy(np.float64), rows["score_se"].to_numpy(np.float64)
        var = (se * np.sqrt(t)) ** 2  # sd_j(d)^2 with T - 1 in the denominator
        return cls(rows["index"].to_numpy(np.int64), np.full(len(rows), t), tau * t, var * (t - 1) + t * tau ** 2,
                   rows["unlearned_loss"].to_numpy(np.float64) * t, rows["baseline_loss"].to_numpy(np.float64) * t)

    def add(self, pos: np.ndarray, lu: np.ndarray, l0: np.ndarray) -> None:
        d = lu - l0
        self.n[pos] += d.shape[1]
        self.sum_d[pos] += d.sum(1)
        self.sumsq_d[pos] += (d ** 2).sum(1)
        self.sum_u[pos] += lu.sum(1)
        self.sum_0[pos] += l0.sum(1)

    @property
    def tau(self) -> np.ndarray:
        return self.sum_d / self.n

    @property
    def se(self) -> np.ndarray:
        var = np.maximum(self.sumsq_d - self.n * self.tau ** 2, 0.0) / np.maximum(self.n - 1, 1)
        return np.sqrt(var / self.n)


def undecided(tau: np.ndarray, se: np.ndarray, k: int, z: float) -> np.ndarray:
    """Positions of the items whose interval tau_i +- z SE_i contains the rank-k / rank-(k+1) boundary."""
    if len(tau) <= k or k <= 0:
        return np.array([], dtype=np.int64)
    order = np.argsort(-tau, kind="stable")
    b = 0.5 * (tau[order[k - 1]] + tau[order[k]])
    return np.flatnonzero(np.abs(tau - b) <= z * se)


def refine(sums: DrawSums, extra: ExtraDraws, folder: Path, k: int, z: float = 2.0, step: int = 16,
           budget: float = 1.0) -> list[dict]:
    """Race the top k (see the module doc); ``budget`` extra item-draws as a fraction of sum(n) at the start.
    Returns one record per round (undecided items, draws added)."""
    folder.mkdir(parents=True, exist_ok=True)
    pos_of = {int(i): p for p, i in enumerate(sums.index)}
    allowed = budget * float(sums.n.sum())
    spent, rounds = 0.0, []
    r = 0
    while True:
        path = folder / f"round-{r:03d}.parquet"
        if path.exists():  # resume: a finished round of an earlier run
            done = pd.read_parquet(path)
            pos = np.array([pos_of[int(i)] for i in done["index"]])
            lu, l0 = np.stack(done["unlearned_draws"].to_numpy()), np.stack(done["baseline_draws"].to_numpy())
        else:
            pos = undecided(sums.tau, sums.se, k, z)
            if len(pos) == 0 or spent + len(pos) * step > allowed:
                break
            lu, l0 = np.zeros((len(pos), step)), np.zeros((len(pos), step))
            for first in np.unique(sums.n[pos]):  # items that joined in different rounds start at other draws
                sel = np.flatnonzero(sums.n[pos] == first)
                lu[sel], l0[sel] = extra([int(sums.index[p]) for p in pos[sel]], int(first), step)
            with atomic_path(path) as tmp:
                pd.DataFrame({"index": sums.index[pos], "first_draw": sums.n[pos].astype(np.int64),
                              "unlearned_draws": list(lu), "baseline_draws": list(l0)}).to_parquet(tmp, index=False)
        sums.add(pos, lu, l0)
        spent += lu.size
        rounds.append({"round": r, "undecided": int(len(pos)), "draws_added": int(lu.size)})
        log.info("adaptive draws, round %d: %d items near the top-%d boundary got %d more draws each",
                 r, len(pos), k, lu.shape[1])
        r += 1
    return rounds
