"""The bank's queries in a tuning half and a held-back report half (musicattr.counterfactual.split)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from musicattr.counterfactual.split import grown_split, read_split, split_queries

ROOT = Path(__file__).resolve().parents[2]


def _table(n_gen=40, n_planted=4, n_train=2) -> pd.DataFrame:
    rows = [{"query_id": f"q{i:03d}", "kind": "generated", "fingerprint": f"{i * 7919:016x}"} for i in range(n_gen)]
    rows += [{"query_id": f"q{n_gen + i:03d}", "kind": "planted", "fingerprint": f"{i:016x}"} for i in range(n_planted)]
    rows += [{"query_id": f"t{i:03d}", "kind": "training", "fingerprint": f"{i + 99:016x}"} for i in range(n_train)]
    return pd.DataFrame(rows)


def test_halves_per_kind_and_forced_tuning_queries():
    table = _table()
    split = split_queries(table)
    counts = split.groupby(["kind", "half"]).size().to_dict()
    assert counts == {("generated", "report"): 20, ("generated", "tuning"): 20, ("planted", "report"): 2,
                      ("planted", "tuning"): 2, ("training", "report"): 1, ("training", "tuning"): 1}
    assert split.set_index("query_id").at["q003", "half"] == "tuning"  # used to choose the draw design
    assert split.equals(split_queries(table.sample(frac=1, random_state=0)))  # order of the table: irrelevant
    grown = grown_split(split, _table(n_gen=42))  # a later batch is halved on its own: no query changes half
    assert (grown.set_index("query_id")["half"].reindex(split["query_id"]).to_numpy() == split["half"].to_numpy()).all()
    assert len(grown) == len(split) + 2


def test_shipped_split_is_the_rule_applied_batch_by_batch():
    from musicattr.counterfactual.bank_queries import query_batch_ends

    bank = ROOT / "assets" / "bank" / "demo"
    table = pd.read_csv(bank / "queries" / "queries.csv", dtype={"query_id": str})
    shipped = pd.read_csv(bank / "queries" / "split.csv", dtype={"query_id": str})
    ends = query_batch_ends(bank, table)
    expect = None
    for a, b in zip([0, *ends[:-1]], ends):
        expect = grown_split(expect, table.iloc[:b]) if a else split_queries(table.iloc[:b])
    assert shipped.equals(expect)
    assert (read_split(bank, table).reindex(table["query_id"]).to_numpy() == shipped.set_index("query_id")
            .reindex(table["query_id"])["half"].to_numpy()).all()


def test_queries_missing_from_the_split_file_are_split_among_themselves(tmp_path):
    (tmp_path / "queries").mkdir()
    table = _table(8, 0, 0)
    first = split_queries(table.iloc[:4])
    first.to_csv(tmp_path / "queries" / "split.csv", index=False)
    half = read_split(tmp_path, table)
    assert (half.reindex(first["query_id"]).to_numpy() == first["half"].to_numpy()).all()
    later = half.reindex([f"q{i:03d}" for i in range(4, 8)])
    assert sorted(later) == ["report", "report", "tuning", "tuning"]
