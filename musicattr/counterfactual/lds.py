"""The linear datamodeling score (LDS; Park et al. 2023, TRAK; Zheng et al. 2024, D-TRAK) and its noise floor.

M random subsets S_j of the training set D keep floor(alpha N) items each; theta_{S_j} is the model
retrained on S_j (its query loss averaged over the LDS seeds). A method with scores tau(q, i) predicts

    g_m(q, S_j) = sum_{i in S_j} tau_m(q, i)                         (the subset's summed scores)

and its LDS is the rank correlation of that prediction with what retraining did, averaged over queries:

    LDS_m = 1/Q sum_q Spearman_j( g_m(q, S_j), -L(z_q, theta_{S_j}) )

Scores rank the items that help the query (high tau: removing the item raises the query's loss), so a
subset with a high summed score should fit the query well: the loss enters with a minus sign, and an LDS
of 1 means the method orders the subsets exactly as retraining does; 0 is chance (the method ``random``).

The seed-noise floor: the same subset retrained with two seeds a, b gives losses L_a, L_b. Over the noise
subsets J (per query, then averaged over queries):

    seed_std     sqrt(mean_{j in J} (L_a - L_b)^2 / 2)   the loss's std over retraining seeds
    subset_std   the std of L(z_q, theta_{S_j}) over the M subsets: the spread LDS has to explain
    seed_lds     Spearman_{j in J}(L_a, L_b): the LDS of a perfect single-seed prediction, i.e. the
                 ceiling that retraining noise leaves to any method (needs |J| >= 3)
"""
from __future__ import annotations

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson of average ranks); NaN when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def subset_sums(scores: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """g(q, S_j) = sum_{i in S_j} tau(q, i): scores [Q, N], kept [M, N] boolean -> [Q, M]."""
    return np.asarray(scores, dtype=np.float64) @ np.asarray(kept, dtype=np.float64).T


def lds_per_query(scores: np.ndarray, kept: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Spearman_j(g(q, S_j), -L(z_q, theta_{S_j})) for each query: scores [Q, N], kept [M, N], losses [Q, M]."""
    sums = subset_sums(scores, kept)
    return np.array([spearman(sums[q], -np.asarray(losses[q])) for q in range(len(sums))])


def seed_noise(loss_a: np.ndarray, loss_b: np.ndarray, losses: np.ndarray) -> dict[str, np.ndarray]:
    """Per query: seed_std, subset_std and seed_lds from the noise subsets' losses under two seeds
    (loss_a, loss_b [Q, J]) and every subset's loss (losses [Q, M])."""
    a, b = np.asarray(loss_a, dtype=np.float64), np.asarray(loss_b, dtype=np.float64)
    seed_std = np.sqrt(((a - b) ** 2).mean(axis=1) / 2)
    subset_std = np.asarray(losses, dtype=np.float64).std(axis=1, ddof=1)
    seed_lds = np.array([spearman(a[q], b[q]) if a.shape[1] >= 3 else np.nan for q in range(len(a))])
    return {"seed_std": seed_std, "subset_std": subset_std, "seed_lds": seed_lds}
