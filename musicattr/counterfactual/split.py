"""The bank's queries in two fixed halves: ``tuning`` (methods and their settings may be chosen on it) and
``report`` (held back: only final numbers are read from it).

Within each query kind (generated, planted, training) the queries are ordered by a hash of (query id, latent
fingerprint), queries already used to choose something first (``used_for_tuning``), and the first floor(n/2)
form the tuning half. The split is a pure function of the bank's query table, so it stays the same as the bank
grows; ``queries/split.csv`` ships it and is what the benchmark reads.
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


def read_split(bank_root: str | Path, table: pd.DataFrame) -> pd.Series:
    """The half of each query (indexed by query id): ``queries/split.csv`` where the bank ships it (a query it
    does not name is refused), else ``split_queries`` of the table."""
    path = Path(bank_root) / "queries" / "split.csv"
    split = pd.read_csv(path, dtype={"query_id": str}) if path.exists() else split_queries(table)
    half = split.set_index("query_id")["half"]
    missing = sorted(set(table["query_id"]) - set(half.index))
    if missing:
        raise ValueError(f"{path} does not name the queries {missing[:5]}; fix: regenerate it with "
                         "`python -m musicattr.counterfactual.split BANK_DIR` (the split of the new queries only "
                         "depends on their ids and latents)")
    return half


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write BANK_DIR/queries/split.csv (the tuning / report halves)")
    ap.add_argument("bank_dir")
    a = ap.parse_args(argv)
    path = Path(a.bank_dir) / "queries" / "split.csv"
    split = split_queries(pd.read_csv(Path(a.bank_dir) / "queries" / "queries.csv", dtype={"query_id": str}))
    split.to_csv(path, index=False)
    print(f"written: {path} ({(split['half'] == 'tuning').sum()} tuning, {(split['half'] == 'report').sum()} report)")


if __name__ == "__main__":
    main()
