"""The agreement measures of the index fidelity (musicattr/evaluation/fidelity.py)."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from musicattr.evaluation.fidelity import agreement, topk_overlap


def test_topk_overlap_counts_shared_items_of_the_two_top_k():
    exact = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    assert topk_overlap(exact, exact, 3) == 3
    assert topk_overlap(-exact, exact, 3) == 0
    assert topk_overlap(np.array([9.0, 1.0, 7.0, 8.0, 0.0, 0.0]), exact, 3) == 2  # {0, 3, 2} vs {0, 1, 2}
    assert topk_overlap(exact, exact, 100) == 6  # k beyond N: all of them


def test_agreement_is_spearman_and_overlaps():
    rng = np.random.default_rng(0)
    exact = rng.standard_normal(300)
    estimate = exact + 0.3 * rng.standard_normal(300)
    a = agreement(estimate, exact)
    assert a["spearman"] == pytest.approx(spearmanr(estimate, exact).statistic, abs=1e-6)
    assert set(a) == {"spearman", "top10", "top100"} and 0 <= a["top10"] <= 10 and a["top100"] <= 100
