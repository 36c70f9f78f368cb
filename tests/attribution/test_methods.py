"""The scores-table schema and the method registry: a new method is one registered class and one config entry."""
import numpy as np
import pandas as pd
import pytest

from musicattr.attribution import methods as registry
from musicattr.attribution.methods import Method, default_methods, register_method, resolve_methods
from musicattr.attribution.scores_table import (COLUMNS, ScoresTableError, check_scores_table, read_scores_table,
                                                scores_table)
from musicattr.attribution.similarity import similarity_table
from musicattr.counterfactual.methods import method_scores, parse_methods


def items(n=5):
    return pd.DataFrame({"index": np.arange(n), "item_id": [f"audio/t{i}.wav" for i in range(n)],
                         "caption": [f"c{i}" for i in range(n)], "file_name": [f"audio/t{i}.wav" for i in range(n)],
                         "duration_s": np.full(n, 4.0), "valid_frames": np.full(n, 10)})


def test_scores_table_ranks_by_score_ties_by_index_and_keeps_the_schema():
    t = scores_table(items(), [0.1, 0.3, 0.3, -1.0, 0.2], "peer", "q000", score_se=np.full(5, 0.01),
                     extra={"sensitivity": [1.0, 2.0, 1.0, 1.0, 4.0]}, relative=True)
    assert list(t.columns[:len(COLUMNS)]) == COLUMNS
    assert list(t["index"]) == [1, 2, 4, 0, 3] and list(t["rank"]) == [1, 2, 3, 4, 5]
    rel = t.sort_values("relative_rank")
    assert list(rel["index"]) == [2, 1, 0, 4, 3]
    assert np.allclose(t["relative_score_se"], t["score_se"] / t["sensitivity"])
    assert t["baseline_loss"].isna().all() and (t["method"] == "peer").all() and (t["query_id"] == "q000").all()
    with pytest.raises(ValueError, match="one value per item"):
        scores_table(items(), [0.1, 0.2], "peer")


def test_every_writer_follows_one_schema(tmp_path):
    sim = similarity_table(np.array([0.2, 0.9, 0.2, -0.1, 0.0]), items().to_dict("records"), "similarity/x", "q")
    assert list(sim.columns) == COLUMNS and (sim["score_se"] == 0).all()
    path = tmp_path / "s.parquet"
    sim.drop(columns=["rank"]).to_parquet(path)
    with pytest.raises(ScoresTableError, match=r"s\.parquet lacks the columns \['rank'\].*fix"):
        read_scores_table(path)
    with pytest.raises(ScoresTableError, match="exactly once"):
        check_scores_table(sim, path, item_ids=list(items()["item_id"])[:4])


def test_a_method_registered_in_a_test_is_found_by_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))

    @register_method
    class Peer(Method):
        name = "test-peer"
        table = "queries/{query_id}/test-peer/scores.parquet"
        column = "score"
        optional = True
        description = "a method registered from a test"

    ids = list(items()["item_id"])
    rng = np.random.default_rng(0)
    truth = {}
    for qid in ("q000", "q001"):
        truth[qid] = rng.standard_normal(len(ids))
        p = tmp_path / "queries" / qid / "test-peer" / "scores.parquet"
        p.parent.mkdir(parents=True)
        scores_table(items(), truth[qid], "test-peer", qid).to_parquet(p)
    methods = parse_methods(["test-peer", "random"])      # the config entry: its name
    assert isinstance(methods[0], Peer) and methods[0].optional
    got = method_scores(methods, tmp_path, ["q000", "q001"], ids, random_seed=3)
    assert np.array_equal(got["test-peer"], np.stack([truth["q000"], truth["q001"]]))
    assert got["random"].shape == (2, len(ids))
    # optional: a query without its table leaves the method out instead of stopping
    assert "test-peer" not in method_scores(methods, tmp_path, ["q000", "q002"], ids)
    part = method_scores(methods, tmp_path, ["q000", "q002"], ids, partial=True)["test-peer"]   # still scoring q002
    assert np.array_equal(part[0], truth["q000"]) and np.isnan(part[1]).all()
    assert "test-peer" not in method_scores(methods, tmp_path, ["q002"], ids, partial=True)
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type("Other", (Method,), {"name": "test-peer", "table": "x/{query_id}.parquet"}))


def test_names_resolve_through_the_registry_and_unknown_names_say_the_fix():
    m = resolve_methods(["unlearning-relative", "all-against-all[clap]", {"name": "index", "optional": False}])
    assert m[0].column == "relative_score" and m[0].table == "queries/{query_id}/unlearning/scores.parquet"
    assert m[1].name == "all-against-all[clap]" and m[1].table.endswith("all-against-all.parquet")
    assert m[2].optional is False
    with pytest.raises(ValueError, match="not registered and names no table; fix"):
        resolve_methods(["no-such-method"])
    with pytest.raises(ValueError, match="repeat"):
        resolve_methods(["unlearning", "unlearning"])
    names = [x.name for x in default_methods("aisfx")]
    assert names[:2] == ["unlearning", "unlearning-relative"] and "average[aisfx]" in names and "random" in names
