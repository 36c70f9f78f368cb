"""Credit shares: one query's attribution scores turned into shares that sum to 1.

The credited tracks are those measurably positively attributed, C = {i : tau_i > floor}, with
tau_i the Eq. 1 score and floor the noise floor of the scores (the float error of the two losses,
``noise.json``; 0 when unknown). With v_i the credit score (tau_i, or the relative score tau_i / s_i,
which has the same sign since s_i > 0), the share of track i in C is

* ``positive`` (positive part normalised): share_i = v_i / sum_{j in C} v_j;
* ``softmax`` (as the softmax panel of Figure 1): share_i = exp(v_i / (temperature * sigma)) /
  sum_{j in C} exp(v_j / (temperature * sigma)), sigma the standard deviation of v over all items
  (the shares do not depend on the scale of the scores; a lower temperature concentrates them).

Tracks outside C get share 0. Shares aggregate to any metadata column by summing them per value
(a missing value counts as ``(unknown)``). They are a model's estimate, not a measurement.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

RULES = ("positive", "softmax")
UNKNOWN = "(unknown)"


def rule_text(rule: str, column: str, temperature: float) -> str:
    """The rule in words, for the page and the CSV's readers."""
    if rule == "positive":
        return f"share = {column} / (sum of {column} over the credited tracks)"
    return (f"share = softmax({column} / ({temperature:g} x std of {column} over all tracks)) "
            "over the credited tracks")


def credit_shares(scores: pd.DataFrame, rule: str = "positive", column: str = "score", floor: float = 0.0,
                  temperature: float = 1.0) -> pd.Series:
    """Share of each row of ``scores`` (a ``scores.parquet`` table); 0 outside the credited set.

    The credited set is ``scores["score"] > floor`` (Eq. 1 above the noise floor); ``column`` holds the
    credit score v. The shares of the credited rows sum to 1; with none credited, all shares are 0."""
    if rule not in RULES:
        raise ValueError(f"unknown credit rule {rule!r}; fix: choose one of {', '.join(RULES)}")
    if column not in scores:
        raise ValueError(f"the scores have no column {column!r}; fix: use credit_score 'score', or attribute with "
                         "--model.relative true for 'relative_score'")
    if rule == "softmax" and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    tau = scores["score"].to_numpy(np.float64)
    v = scores[column].to_numpy(np.float64)
    credited = np.isfinite(tau) & np.isfinite(v) & (tau > max(float(floor), 0.0))
    share = np.zeros(len(scores))
    if credited.any():
        if rule == "positive":
            w = v[credited]
        else:
            sigma = float(np.nanstd(v)) or 1.0
            z = v[credited] / (temperature * sigma)
            w = np.exp(z - z.max())
        share[credited] = w / w.sum()
    return pd.Series(share, index=scores.index, name="share")


def aggregate_credits(credits: pd.DataFrame, column: str) -> pd.DataFrame:
    """Shares summed per value of ``column`` over the credited rows (share > 0), largest first:
    ``<column>, share, tracks, best_rank``."""
    if column not in credits:
        raise ValueError(f"no column {column!r} to aggregate credits by")
    c = credits[credits["share"] > 0]
    key = c[column].astype(object).where(c[column].notna() & (c[column].astype(str) != ""), UNKNOWN).astype(str)
    out = (c.assign(**{column: key}).groupby(column, sort=False)
           .agg(share=("share", "sum"), tracks=("share", "size"), best_rank=("rank", "min")).reset_index())
    return out.sort_values(["share", "best_rank"], ascending=[False, True], kind="mergesort").reset_index(drop=True)
