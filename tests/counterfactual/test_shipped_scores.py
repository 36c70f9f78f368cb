"""The shipped scores' manifest: per-method provenance of every query column, kept through merged exports."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from musicattr.counterfactual.shipped_scores import (MANIFEST, UNRECORDED, describe_provenance, export_scores,
                                                     provenance, read_shipped)


@pytest.fixture
def bank(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"theta0'")
    table = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "fingerprint": ["a", "b", "c"]})
    return SimpleNamespace(root=tmp_path, model=tmp_path / "model.ckpt", item_ids=["i0", "i1", "i2", "i3"],
                           queries_table=lambda: table)


def _scores(rng, rows, nan=()):
    v = rng.random((rows, 4))
    for j in nan:
        v[j] = np.nan
    return v


def test_each_column_names_the_export_it_came_from(bank):
    rng = np.random.default_rng(0)
    qids = ["q0", "q1", "q2"]
    export_scores(bank, {"a": _scores(rng, 3, nan=[2]), "b": _scores(rng, 3)}, qids, "runs/first")
    later = _scores(rng, 3, nan=[0])
    export_scores(bank, {"a": later}, qids, "runs/second")     # q1 scored again, q2 added
    prov = provenance(bank.root / "scores")
    assert [(e["source"], e["queries"]) for e in prov["a"]] == [("runs/first", ["q0"]), ("runs/second", ["q1", "q2"])]
    assert [(e["source"], e["queries"]) for e in prov["b"]] == [("runs/first", qids)]
    got = read_shipped(bank, bank.root / "scores", ["a"], qids)["a"]
    np.testing.assert_array_equal(got[1:], later[1:])
    assert json.loads((bank.root / "scores" / MANIFEST).read_text())["format"] == 2
    lines = describe_provenance(bank.root / "scores", ["a"], ["q1", "q2"]).splitlines()
    assert len(lines) == 1 and lines[0].startswith("- a: 2 queries (q1 to q2) from runs/second, ")


def test_a_format_1_manifest_gains_a_provenance_that_says_it_was_not_recorded(bank):
    rng = np.random.default_rng(1)
    export_scores(bank, {"a": _scores(rng, 3), "b": _scores(rng, 3)}, ["q0", "q1", "q2"], "runs/old")
    path = bank.root / "scores" / MANIFEST
    m = json.loads(path.read_text())
    del m["provenance"]
    m["format"] = 1
    path.write_text(json.dumps(m))
    assert provenance(bank.root / "scores")["a"][0]["note"] == UNRECORDED
    export_scores(bank, {"b": _scores(rng, 1)}, ["q2"], "runs/new")
    prov = provenance(bank.root / "scores")
    assert prov["a"] == [{"source": "runs/old", "made": m["made"], "queries": ["q0", "q1", "q2"], "note": UNRECORDED}]
    assert [(e["source"], e["queries"]) for e in prov["b"]] == [("runs/old", ["q0", "q1"]), ("runs/new", ["q2"])]


def test_settings_are_kept_once_and_mixed_settings_are_flagged(bank):
    rng = np.random.default_rng(2)
    qids = ["q0", "q1", "q2"]
    k512, k2048 = {"peer": "trak", "proj_dim": 512}, {"peer": "trak", "proj_dim": 2048}
    export_scores(bank, {"trak": _scores(rng, 3)}, qids, "runs/a", settings={"trak": [k512, k512, k2048]})
    m = json.loads((bank.root / "scores" / MANIFEST).read_text())
    assert [len(e["queries"]) for e in m["provenance"]["trak"]] == [2, 1] and len(m["settings"]) == 2
    text = describe_provenance(bank.root / "scores", ["trak"], qids)
    assert "2 different settings** (differing: proj_dim)" in text
    assert "different settings" not in describe_provenance(bank.root / "scores", ["trak"], ["q0", "q1"])
    export_scores(bank, {"trak": _scores(rng, 1)}, ["q2"], "runs/b", settings={"trak": [k512]})   # rescored alike
    m = json.loads((bank.root / "scores" / MANIFEST).read_text())
    assert len(m["settings"]) == 1 and "different" not in describe_provenance(bank.root / "scores", ["trak"], qids)


def test_table_settings_drop_what_names_the_query():
    from musicattr.counterfactual.benchmark import _without_query

    a = {"query_id": "q001", "query_fingerprint": "x", "members": {"m0": {"table": "e/m0/queries/q001/s.parquet",
                                                                          "lr": 1e-6}}}
    b = {"query_id": "q002", "query_fingerprint": "y", "members": {"m0": {"table": "e/m0/queries/q002/s.parquet",
                                                                          "lr": 1e-6}}}
    assert _without_query(a, "q001") == _without_query(b, "q002") == {"members": {"m0": {
        "table": "e/m0/queries/{query_id}/s.parquet", "lr": 1e-6}}}
