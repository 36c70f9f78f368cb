"""Is test-to-train attribution above chance? Rank percentiles of the tracks that share the prompt's attributes.

For a query generated from a prompt that names, say, a composer or collection and an instrument, the
training tracks with the same value of that metadata column are the ones a listener expects credited.
For one method's ranking of the N training tracks (rank 1 = most attributed):

    percentile(column) = mean over the tracks i with meta_i[column] == prompt[column] of (rank_i - 1) / (N - 1)

0% means those tracks fill the top of the ranking; a ranking that ignores the attribute gives 50% in
expectation (chance), 100% puts them last. The percentile weighs the whole ranking; what a listener
reads is its head, so the share of the top 10 that match is reported too, against the base rate (the
share of the whole training set that matches: what a random top 10 holds in expectation).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

CHANCE = 0.5


def rank_percentile(table: pd.DataFrame, meta: dict[str, dict], column: str, value) -> float | None:
    """Mean rank percentile of the tracks of ``table`` (file_name, rank) whose ``column`` is ``value``;
    None when no track has that value."""
    n = len(table)
    if n < 2 or value is None:
        return None
    ranks = [r for f, r in zip(table["file_name"], table["rank"]) if str(meta.get(f, {}).get(column)) == str(value)]
    return float(np.mean([(r - 1) / (n - 1) for r in ranks])) if ranks else None


def top_share(table: pd.DataFrame, meta: dict[str, dict], column: str, value, k: int = 10) -> float:
    """Share of the ``k`` best-ranked tracks whose ``column`` is ``value``."""
    top = table.sort_values("rank")["file_name"].head(k)
    return float(np.mean([str(meta.get(f, {}).get(column)) == str(value) for f in top]))


def query_percentiles(tables: dict[str, pd.DataFrame], meta: dict[str, dict], attributes: dict) -> dict[str, float]:
    """``{"pct[<method>|<column>]": percentile, "top10[<method>|<column>]": share of the top 10 that match,
    "base[<column>]": share of all tracks that match}`` for every method and attribute the query names."""
    out = {}
    for method, table in tables.items():
        for column, value in attributes.items():
            p = rank_percentile(table, meta, column, value)
            if p is not None:
                out[f"pct[{method}|{column}]"] = p
                out[f"top10[{method}|{column}]"] = top_share(table, meta, column, value)
                out[f"base[{column}]"] = top_share(table, meta, column, value, k=len(table))
    return out


def match_markdown(per_query: pd.DataFrame, methods: list[str], columns: list[str]) -> str:
    """A table with one row per method: per column the mean rank percentile (chance 50%) and the share of
    the top 10 that match (chance: the base rate, last row), and planted recall."""
    head = ["method", *[h for c in columns for h in (f"{c} pct", f"{c} top-10")], "recall@1", "recall@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    planted = per_query[per_query["planted_group"].notna()] if "planted_group" in per_query else per_query.iloc[:0]
    for m in methods:
        cells = [m]
        for c in columns:
            col = f"pct[{m}|{c}]"
            vals = per_query[col].dropna() if col in per_query else pd.Series(dtype=float)
            cells.append(f"{100 * vals.mean():.1f}% (n={len(vals)})" if len(vals) else "-")
            share = per_query[f"top10[{m}|{c}]"].dropna() if f"top10[{m}|{c}]" in per_query else pd.Series(dtype=float)
            cells.append(f"{100 * share.mean():.0f}%" if len(share) else "-")
        for k in (1, 10):
            col = f"{m}@{k}"
            cells.append(f"{planted[col].mean():.2f}" if col in planted and len(planted) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    base = ["chance"] + [x for c in columns for x in (
        "50%", f"{100 * per_query[f'base[{c}]'].dropna().mean():.0f}%" if f"base[{c}]" in per_query else "-")]
    lines.append("| " + " | ".join(base + ["", ""]) + " |")
    return "\n".join(lines) + "\n"
