import math

import numpy as np
import pytest
import scipy.stats
import torch

from musicattr.evaluation.metrics import (correlations, frechet_distance, frechet_distance_from_stats,
                                          minmax_normalize, softmax_normalize, target_rank,
                                          topk_bottomk_similarity)



def test_target_rank_basic_and_ties():
    s = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert target_rank(s, 1) == 1
    assert target_rank(s, 2) == 2
    assert target_rank(s, 0) == 4
    tied = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.1])
    # pessimistic: the two other items tied with the target count as above it
    assert target_rank(tied, 0) == 4
    assert target_rank(tied, 3) == 4
    assert target_rank(torch.tensor([2.0, 2.0]), 0) == 2
    assert target_rank(torch.tensor([float("nan"), 1.0, 0.0]), 1) == 1
    assert target_rank(torch.tensor([float("nan"), 1.0, 0.0]), 0) == 3
    with pytest.raises(IndexError):
        target_rank(s, 4)


def test_topk_bottomk_similarity():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([2.0, 0.0])
    scores = torch.tensor([10.0, 5.0, 1.0, 0.0, 3.0])  # item 0 is the target
    top, bot = topk_bottomk_similarity(scores, emb, target, k=2, exclude_index=0)
    # top-2 of the rest: items 1 (cos 1) and 4 (cos 1/sqrt 2); bottom-2: items 3 (-1) and 2 (0)
    assert top == pytest.approx((1.0 + 1 / math.sqrt(2)) / 2)
    assert bot == pytest.approx(-0.5)
    top_all, _ = topk_bottomk_similarity(scores, emb, target, k=1)
    assert top_all == pytest.approx(1.0)
    top_big, bot_big = topk_bottomk_similarity(scores, emb, target, k=100, exclude_index=0)
    assert top_big == pytest.approx(bot_big)


def test_frechet_equal_covariance_is_squared_mean_distance():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    a = np.random.default_rng(0).normal(size=(3, 3))
    cov = a @ a.T + np.eye(3)
    assert frechet_distance_from_stats(mu1, cov, mu2, cov) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-6)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 0.0]), np.array([3.0, 4.0])
    d1, d2 = np.array([1.0, 4.0]), np.array([9.0, 0.25])
    expected = 25.0 + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-8)


def test_frechet_from_samples_and_singular():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=g)
    y = torch.randn(4000, 4, generator=g) * 2.0 + 1.0
    # closed form for N(0, I) vs N(1, 4I) in 4-d: 4 * 1 + 4 * (1 - 2)^2 = 8
    assert frechet_distance(x, y) == pytest.approx(8.0, rel=0.1)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions -> singular covariances: the closed form below, not only a finite number
    z = torch.randn(5, 16, generator=g)
    w = torch.randn(6, 16, generator=g)
    assert frechet_distance(z, w) == pytest.approx(frechet_by_eigenvalues(z, w), rel=1e-4)


def frechet_by_eigenvalues(x, y) -> float:
    """||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 sum_i sqrt(lambda_i(S1^1/2 S2 S1^1/2)), with symmetric
    eigen-decompositions only (valid for singular, positive semi-definite covariances)."""
    a, b = x.double().numpy(), y.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * cross)


def test_frechet_of_singular_covariances_matches_the_closed_form():
    g = torch.Generator().manual_seed(3)
    for n, m, dim in ((3, 4, 8), (5, 6, 16), (20, 30, 4)):
        x = torch.randn(n, dim, generator=g)
        y = 0.5 * torch.randn(m, dim, generator=g) + 1.0
        assert frechet_distance(x, y) == pytest.approx(frechet_by_eigenvalues(x, y), rel=1e-4)


def test_correlations_match_scipy():
    g = np.random.default_rng(1)
    a = g.normal(size=200)
    b = 0.5 * a + g.normal(size=200)
    c = correlations(torch.from_numpy(a), torch.from_numpy(b))
    assert c["pearson"] == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-6)
    assert c["spearman"] == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-6)


def test_normalizations():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    assert torch.allclose(minmax_normalize(x, dim=1), torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64))
    p = softmax_normalize(x, dim=1)
    assert torch.allclose(p.sum(1), torch.ones(2, dtype=torch.float64))
    assert p[0, 1] > p[0, 2] > p[0, 0]
