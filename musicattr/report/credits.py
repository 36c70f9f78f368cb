"""Credit shares: one query's attribution scores turned into shares that sum to 1.

The credited tracks are those measurably positively attributed,

    C = {i : tau_i > max(floor, z SE_i)}

with tau_i the Eq. 1 score, SE_i its standard error from its own draws (``score_se``; z = 2 by default: a
track is credited when its score is above zero by more than twice its error, about 97.5% one-sided) and floor
the float error of the two losses (``noise.json``; 0 when unknown), kept as a separate check. With v_i the
credit score (tau_i, or the relative score tau_i / s_i, which has the same sign since s_i > 0), the share of
track i in C is

* ``positive`` (positive part normalised): share_i = v_i / sum_{j in C} v_j;
* ``softmax`` (as the softmax panel of Figure 1): share_i = exp(v_i / (temperature * sigma)) /
  sum_{j in C} exp(v_j / (temperature * sigma)), sigma the standard deviation of v over all items
  (the shares do not depend on the scale of the scores; a lower temperature concentrates them).

Tracks outside C get share 0. Each share gets an interval (``share_intervals``): a parametric bootstrap over
the draws, tau_i* ~ N(tau_i, SE_i^2) independently (the CLT form of resampling each item's T draws), the
credited set and the shares recomputed for each resample, the 2.5% and 97.5% quantiles kept. Shares aggregate
to any metadata column by summing them per value (a missing value counts as ``(unknown)``). They are a model's
estimate, not a measurement.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

RULES = ("positive", "softmax")
UNKNOWN = "(unknown)"
CREDIT_Z = 2.0  # credited: score > CREDIT_Z x its standard error


def rule_text(rule: str, column: str, temperature: float, z: float = CREDIT_Z) -> str:
    """The rule in words, for the page and the CSV's readers."""
    who = f"credited: score > {z:g} x its standard error (and above the float-error floor); "
    if rule == "positive":
        return who + f"share = {column} / (sum of {column} over the credited tracks)"
    return who + (f"share = softmax({column} / ({temperature:g} x std of {column} over all tracks)) "
                  "over the credited tracks")


def _credit_values(scores: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tau = scores["score"].to_numpy(np.float64)
    v = scores[column].to_numpy(np.float64)
    se = scores["score_se"].to_numpy(np.float64) if "score_se" in scores else np.full(len(scores), np.nan)
    return tau, v, se


def _shares(tau, v, se, rule, floor, temperature, z, sigma) -> np.ndarray:
    bar = np.maximum(max(float(floor), 0.0), np.where(np.isfinite(se), z * se, 0.0))
    credited = np.isfinite(tau) & np.isfinite(v) & (tau > bar)
    share = np.zeros(len(tau))
    if credited.any():
        if rule == "positive":
            w = v[credited]
        else:
            zv = v[credited] / (temperature * sigma)
            w = np.exp(zv - zv.max())
        share[credited] = w / w.sum()
    return share


def _check(scores: pd.DataFrame, rule: str, column: str, temperature: float) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown credit rule {rule!r}; fix: choose one of {', '.join(RULES)}")
    if column not in scores:
        raise ValueError(f"the scores have no column {column!r}; fix: use credit_score 'score', or attribute with "
                         "--model.relative true for 'relative_score'")
    if rule == "softmax" and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def credit_shares(scores: pd.DataFrame, rule: str = "positive", column: str = "score", floor: float = 0.0,
                  temperature: float = 1.0, z: float = CREDIT_Z) -> pd.Series:
    """Share of each row of ``scores`` (a ``scores.parquet`` table); 0 outside the credited set.

    The credited set is ``score > max(floor, z * score_se)`` (a table without ``score_se``, or with NaN there,
    is held to the floor only); ``column`` holds the credit score v. The shares of the credited rows sum to 1;
    with none credited, all shares are 0."""
    _check(scores, rule, column, temperature)
    tau, v, se = _credit_values(scores, column)
    sigma = float(np.nanstd(v)) or 1.0
    return pd.Series(_shares(tau, v, se, rule, floor, temperature, z, sigma), index=scores.index, name="share")


def share_intervals(scores: pd.DataFrame, rule: str = "positive", column: str = "score", floor: float = 0.0,
                    temperature: float = 1.0, z: float = CREDIT_Z, resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> pd.DataFrame:
    """``share_lo``, ``share_hi``: the central ``level`` interval of each row's share over parametric bootstrap
    resamples of the scores, tau_i* ~ N(tau_i, SE_i^2) (v* = tau* v / tau: the relative score keeps its s_i);
    rows without a finite ``score_se`` keep their score. Seeded: the same table gives the same intervals."""
    _check(scores, rule, column, temperature)
    tau, v, se = _credit_values(scores, column)
    sigma = float(np.nanstd(v)) or 1.0
    ratio = np.divide(v, tau, out=np.ones_like(v), where=tau != 0)
    noise_sd = np.where(np.isfinite(se), se, 0.0)
    rng = np.random.default_rng(seed)
    draws = np.empty((resamples, len(tau)))
    for b in range(resamples):
        t = tau + noise_sd * rng.standard_normal(len(tau))
        draws[b] = _shares(t, t * ratio, se, rule, floor, temperature, z, sigma)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return pd.DataFrame({"share_lo": lo, "share_hi": hi}, index=scores.index)


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
