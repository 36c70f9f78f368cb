"""scripts/benchmark_seed_overlap.py (the draw-seed stability of every benchmark method): the query rule, the pairing of
two tables by item id, the top-k overlap, the bootstrap interval and the seconds of a rerun from the runner's log."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def so():
    return load_script("benchmark_seed_overlap")


def test_rule_takes_the_first_generated_queries_of_the_report_half(so):
    split = pd.DataFrame({"query_id": ["q000", "q001", "q002", "q003", "q004", "q040", "t000"],
                          "kind": ["generated"] * 5 + ["planted", "training"],
                          "half": ["report", "tuning", "report", "report", "report", "report", "report"]})
    assert so.rule_queries(split, 3) == ["q000", "q002", "q003"]
    assert so.rule_queries(split, 10) == ["q000", "q002", "q003", "q004"]


def test_paired_matches_items_by_id(so):
    a = pd.DataFrame({"item_id": ["a", "b", "c"], "score": [3.0, 2.0, 1.0]})
    b = pd.DataFrame({"item_id": ["c", "a", "b"], "score": [10.0, 30.0, 20.0]})
    x, y = so.paired(a, b, "score")
    np.testing.assert_array_equal(x, [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(y, [30.0, 20.0, 10.0])
    assert so.agreement(x, y, k=2) == {"spearman": 1.0, "top2_overlap": 2}
    with pytest.raises(ValueError, match="different items"):
        so.paired(a, b.assign(item_id=["c", "a", "d"]), "score")


def test_agreement_top_overlap(so):
    a = np.arange(20, dtype=float)          # top 10: items 10..19
    assert so.agreement(a, a)["top10_overlap"] == 10
    assert so.agreement(a, -a)["top10_overlap"] == 0        # reversed: the top 10 become the bottom 10
    b = a.copy()
    b[[19, 0]] = b[[0, 19]]                  # item 19 falls out of the top 10, item 0 enters it
    assert so.agreement(a, b)["top10_overlap"] == 9
    assert so.agreement(a, b, k=20)["top20_overlap"] == 20


def test_interval_is_seeded_and_brackets_the_mean(so):
    v = [6, 7, 8, 9, 5, 7, 8, 6]
    m, lo, hi = so.interval(v, seed=0, resamples=2000)
    assert m == pytest.approx(np.mean(v)) and lo <= m <= hi
    assert so.interval(v, seed=0, resamples=2000) == (m, lo, hi)
    assert so.interval([7, 7, 7]) == (7.0, 7.0, 7.0)
    assert np.isnan(so.interval([7])[1])


def test_rerun_seconds_sums_the_last_successful_run_of_each_command(so, tmp_path):
    p = tmp_path / "times.tsv"
    p.write_text("unlearn-q000\t10.5\t0\tx\nattribute-q000\t40.0\t1\tx\nattribute-q000\t50.0\t0\tx\n"
                 "attribute-scoring-only-q000\t30.0\t0\tx\npeers-ekfac\t700.0\t0\tx\n"
                 "index-query\t15.0\t0\tx\nindex-query-build-only\t14.0\t0\tx\n")
    t = so.read_times(p)
    assert so.rerun_seconds(t, [r"unlearn-q\d+", r"attribute-q\d+"]) == pytest.approx(60.5)
    assert so.rerun_seconds(t, [r"attribute-scoring-only-q\d+"]) == pytest.approx(30.0)
    assert so.rerun_seconds(t, ["index-query"]) == pytest.approx(15.0)  # the whole name, not a prefix
    assert so.rerun_seconds(t, ["peers-trak"]) is None
    assert so.rerun_seconds(so.read_times(None), ["x"]) is None


def test_main_on_two_tiny_roots(so, tmp_path):
    items = [f"i{j}" for j in range(12)]
    rng = np.random.default_rng(0)
    base = rng.normal(size=12)
    for root, noise in (("s0", 0.0), ("s1", 0.01)):
        for q in ("q000", "q001"):
            d = tmp_path / root / "queries" / q / "ekfac"
            d.mkdir(parents=True)
            pd.DataFrame({"item_id": items, "score": base + noise * rng.normal(size=12)}).to_parquet(d / "scores.parquet")
    out = tmp_path / "o.json"
    res = so.main(["--seed0", str(tmp_path / "s0"), "--seed1", str(tmp_path / "s1"), "--queries", "q000", "q001",
                   "q002", "--methods", "ekfac", "trak", "--resamples", "200", "--out", str(out)])
    ekfac, trak = res["methods"]
    assert ekfac["queries"] == 2 and ekfac["missing"] == ["q002"]
    assert ekfac["spearman"]["mean"] > 0.9 and ekfac["top10_overlap"]["mean"] >= 9
    assert trak["queries"] == 0 and "spearman" not in trak
    saved = json.loads(out.read_text())
    assert saved["queries"] == ["q000", "q001", "q002"]
    assert saved["chance_topk_overlap"] == {"12": pytest.approx(100 / 12)}
