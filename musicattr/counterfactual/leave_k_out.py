"""Leave-K-out (as AbU, Wang et al. 2024): retrain without a method's top-K items for a query, and without K
random items, and compare the query's loss increase.

For query q, method m and training seed s, with R_m(q) the top-K of m's scores for q (for ``random``: K
items drawn with seed s, the same for every query) and theta0'^s the full store retrained with the same
recipe and seed:

    increase(q, m, s) = L(z_q, theta_{-R_m(q)}^s) - L(z_q, theta0'^s)

A method whose top-K are the items the query relies on raises the loss more than random removal:

    ratio_m = mean_{q,s} increase(q, m, s) / mean_{q,s} increase(q, random, s)
    wins_m  = the fraction of (q, s) with increase(q, m, s) > increase(q, random, s)

with the spread over seeds: the std over s of mean_q increase(q, m, s). For planted prompts, whether the
tune is still generated: the chroma similarity of a generation of theta_{-R} to the planted track, next
to that of theta0'^s.
"""
from __future__ import annotations

import pandas as pd

from musicattr.counterfactual.methods import RANDOM


def with_increase(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (query, method, seed) rows with ``loss`` and ``reference_loss``: add increase and increase_pct."""
    out = rows.copy()
    out["increase"] = out["loss"] - out["reference_loss"]
    out["increase_pct"] = 100.0 * out["increase"] / out["reference_loss"]
    return out


def summarize(per: pd.DataFrame) -> pd.DataFrame:
    """One row per method: mean increase, its spread over seeds, the ratio to random-K, the excess over random-K
    and the win rate.

    ratio = mean increase / mean random-K increase, defined only when random-K's mean increase is positive (a
    ratio to a loss that removal did not raise, or lowered, says nothing); excess = mean over (query, seed) of
    increase - random-K's increase, paired."""
    random = per[per["method"] == RANDOM].set_index(["query_id", "seed"])["increase"]
    random_mean = float(random.mean()) if len(random) else float("nan")
    rows = []
    for method, g in per.groupby("method", sort=False):
        by_seed = g.groupby("seed")["increase"].mean()
        paired = g.set_index(["query_id", "seed"])["increase"]
        common = paired.index.intersection(random.index)
        row = {"method": method, "queries": g["query_id"].nunique(), "seeds": g["seed"].nunique(),
               "increase": float(g["increase"].mean()), "increase_pct": float(g["increase_pct"].mean()),
               "increase_seed_std": float(by_seed.std(ddof=1)) if len(by_seed) > 1 else float("nan"),
               "ratio_to_random": (float(g["increase"].mean()) / random_mean if random_mean > 0
                                   else float("nan")),
               "excess_over_random": (float((paired.loc[common] - random.loc[common]).mean())
                                      if len(common) else float("nan")),
               "wins_over_random": (float((paired.loc[common] > random.loc[common]).mean())
                                    if len(common) and method != RANDOM else float("nan"))}
        if "chroma" in g and g["chroma"].notna().any():
            row["planted_chroma"] = float(g["chroma"].mean())
            row["planted_chroma_reference"] = float(g["chroma_reference"].mean())
        rows.append(row)
    return pd.DataFrame(rows)

