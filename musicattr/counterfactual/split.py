"""The bank's queries in two fixed halves: ``tuning`` (methods and their settings may be chosen on it) and
``report`` (held back: only final numbers are read from it).

Within each query kind (generated, planted, training) the queries are ordered by a hash of (query id, latent
fingerprint), queries already used to choose something first (``used_for_tuning``), and the first floor(n/2)
form the tuning half. ``queries/split.csv`` ships it and is what the benchmark reads; a later batch of queries
is split the same way among its own queries and added, so no query ever changes half.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

HALVES = ("tuning", "report")
USED_FOR_TUNING = ("q003",)  # the draw design of README "Reproducible credit" was chosen on the bank's q003


def _order(query_id: str, fingerprint: str) -> str:
    return hashlib.blake2b(f"{query_id}{fingerprint}".encode(), digest_size=8).hexdigest()


def split_queries(table: pd.DataFrame, used_for_tuning=USED_FOR_TUNING) -> pd.DataFrame:
    """query_id, kind, half (``tuning`` or ``report``) for every row of the bank's query table."""
    rows = []
    for kind, g in table.groupby("kind", sort=True):
        fingerprint = dict(zip(g["query_id"], g["fingerprint"].astype(str)))
        ids = sorted(fingerprint, key=lambda q: (q not in used_for_tuning, _order(q, fingerprint[q])))
        n = len(ids) // 2
        rows += [{"query_id": q, "kind": kind, "half": HALVES[0] if i < n else HALVES[1]} for i, q in enumerate(ids)]
    return pd.DataFrame(rows).sort_values("query_id").reset_index(drop=True)


def grown_split(shipped: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """``shipped`` (the split as it stands) and the queries it does not name split among themselves: a later
    batch of queries is halved on its own, and no query ever changes half (one used for tuning stays there)."""
    named = set() if shipped is None else set(shipped["query_id"])
    new = table[~table["query_id"].isin(named)]
    parts = [p for p in (shipped, split_queries(new) if len(new) else None) if p is not None]
    return pd.concat(parts, ignore_index=True).sort_values("query_id").reset_index(drop=True)


def current_split(bank_root: str | Path, table: pd.DataFrame) -> pd.DataFrame:
    """query_id, kind, half of every query of ``table``: ``queries/split.csv`` where the bank ships it, with the
    queries it does not name (a later batch) split among themselves; else ``split_queries`` of the table."""
    path = Path(bank_root) / "queries" / "split.csv"
    return grown_split(pd.read_csv(path, dtype={"query_id": str}) if path.exists() else None, table)


def read_split(bank_root: str | Path, table: pd.DataFrame) -> pd.Series:
    """The half of each query (indexed by query id), as ``current_split``."""
    return current_split(bank_root, table).set_index("query_id")["half"]


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write BANK_DIR/queries/split.csv (the tuning / report halves)")
    ap.add_argument("bank_dir")
    a = ap.parse_args(argv)
    path = Path(a.bank_dir) / "queries" / "split.csv"
    split = current_split(a.bank_dir, pd.read_csv(Path(a.bank_dir) / "queries" / "queries.csv", dtype={"query_id": str}))
    split.to_csv(path, index=False)
    print(f"written: {path} ({(split['half'] == 'tuning').sum()} tuning, {(split['half'] == 'report').sum()} report)")


if __name__ == "__main__":
    main()
