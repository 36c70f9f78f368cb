"""scripts/bank_headline.py: the README's headline rows and the evidence file, from benchmark.json dicts."""
from __future__ import annotations

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bh():
    return load_script("bank_headline")


def _res(queries: int, lds: dict, pairs: dict) -> dict:
    return {"lds_queries": queries, "lds": {m: {"lds": v, "ci": [v - 0.05, v + 0.05]} for m, v in lds.items()},
            "pairs": {k: {"diff": d, "ci": ci} for k, (d, ci) in pairs.items()}}


def test_headline_rows_read_pairs_in_either_order_and_star_the_resolved(bh):
    lds = {"unlearning": 0.25, "unlearning-ekfac": 0.33, "all-against-all[aisfx]": 0.01}
    res_all = _res(204, lds, {"unlearning - unlearning-ekfac": (-0.07, [-0.09, -0.05]),
                              "unlearning - all-against-all[aisfx]": (0.24, [0.19, 0.30])})
    res_rep = _res(102, lds, {"unlearning-ekfac - unlearning": (0.02, [-0.01, 0.05]),      # stored the other way
                              "unlearning - all-against-all[aisfx]": (0.23, [0.16, 0.29])})
    rows = bh.headline_rows(res_all, res_rep)
    assert rows[0].startswith("| method | LDS, 204 queries [95% CI] | report half, 102 queries (held back) |")
    assert len(rows) == 2 + 3                                  # header, rule, one row per method present
    abu = next(r for r in rows if r.startswith("| AbU+"))
    assert "| 0.330 [0.280, 0.380] |" in abu
    assert "-0.070* [-0.090, -0.050]" in abu                   # Eq. 1 minus AbU+: resolved
    assert "-0.020 [-0.050, +0.010]" in abu                    # sign flipped from 'AbU+ - Eq. 1', not resolved
    eq1 = next(r for r in rows if r.startswith("| Eq. 1"))
    assert eq1.endswith("|  |  |")                             # no difference with itself
    sim = next(r for r in rows if r.startswith("| similarity"))
    assert "+0.240* [+0.190, +0.300]" in sim and "+0.230* [+0.160, +0.290]" in sim


def test_evidence_text_holds_both_tables_and_every_seed(bh):
    width = {"seeds": [{"seed": 0, "diff": 0.24, "ci": [0.19, 0.29], "half_width": 0.0501, "queries_alone": 0.02,
                        "subsets_alone": 0.045},
                       {"seed": 1, "diff": 0.24, "ci": [0.192, 0.29], "half_width": 0.049, "queries_alone": 0.021,
                        "subsets_alone": 0.044}],
             "mean": 0.04955, "sd": 0.0008, "max": 0.0501, "target": 0.05, "every_seed_meets_target": False}
    text = bh.evidence_text("`cmd`", "ALL TABLE\n", "REPORT TABLE\n", width)
    assert text.startswith("Made by: `cmd`\n\nALL TABLE\n\n# Report half (held back)\n\nREPORT TABLE\n")
    assert "| 0 | +0.240 [+0.190, +0.290] | 0.0501 | 0.020 | 0.045 |" in text
    assert "largest 0.0501; <= 0.05 for every seed: False." in text
