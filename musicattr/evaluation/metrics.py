"""Evaluation metrics of the paper (Sections 3.2 and 3.3) on plain tensors.

* :func:`target_rank` -- R(z_tar), the rank of the unlearned item among all attribution scores.
* :func:`topk_bottomk_similarity` -- CLAP_topk / CLAP_botk: mean cosine similarity between the
  target's embedding and the embeddings of the k highest / k lowest scored items.
* :func:`frechet_distance` / :func:`frechet_distance_from_stats` -- Frechet distance between
  Gaussians fitted to two embedding sets (FD_openl3 in the paper, any encoder here).
* :func:`correlations` -- Pearson and Spearman correlation between two score vectors.
* :func:`minmax_normalize`, :func:`softmax_normalize` -- the normalisations of Figure 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "target_rank",
    "topk_bottomk_similarity",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "correlations",
    "minmax_normalize",
    "softmax_normalize",
]


def _as_1d(x) -> Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dim() != 1:
        raise ValueError(f"expected a 1-d score vector, got shape {tuple(t.shape)}")
    return t.double()


def target_rank(scores: Tensor, target_index: int) -> int:
    """Rank of ``scores[target_index]`` when sorted in descending order (1 = highest score).

    Ties are counted pessimistically for the target: rank = 1 + number of *other* items whose score
    is >= the target's score (an item tied with the target is ranked above it). NaN scores never
    rank above the target; a NaN target gets the worst rank N.
    """
    s = _as_1d(scores)
    n = s.numel()
    if not -n <= target_index < n:
        raise IndexError(f"target_index {target_index} out of range for {n} scores")
    target_index %= n
    t = s[target_index]
    if torch.isnan(t):
        return int(n)
    above = (s >= t)
    above[target_index] = False
    return int(above.sum().item()) + 1


def topk_bottomk_similarity(scores: Tensor, embeddings: Tensor, target_embedding: Tensor, k: int,
                            exclude_index: int | None = None) -> tuple[float, float]:
    """Mean cosine similarity between ``target_embedding`` and the embeddings of the ``k`` highest
    (first value) and ``k`` lowest (second value) scored items (the paper's CLAP_topk / CLAP_botk,
    k = 100). ``exclude_index`` (the target itself in train-to-train) is left out before choosing.
    ``k`` is clipped to the number of remaining items. Ties are broken by index (stable sort)."""
    s = _as_1d(scores)
    emb = torch.as_tensor(embeddings).detach().cpu().double()
    tgt = torch.as_tensor(target_embedding).detach().cpu().double().reshape(-1)
    if emb.dim() != 2 or emb.shape[0] != s.numel() or emb.shape[1] != tgt.numel():
        raise ValueError(f"shapes do not match: scores {tuple(s.shape)}, embeddings {tuple(emb.shape)}, "
                         f"target {tuple(tgt.shape)}")
    keep = torch.ones(s.numel(), dtype=torch.bool)
    if exclude_index is not None:
        keep[exclude_index] = False
    idx = torch.nonzero(keep).squeeze(1)
    k = min(int(k), idx.numel())
    if k <= 0:
        raise ValueError("k must be positive and at least one item must remain")
    sims = F.cosine_similarity(emb[idx], tgt[None, :], dim=1)
    order = torch.sort(s[idx], descending=True, stable=True).indices
    return float(sims[order[:k]].mean()), float(sims[order.flip(0)[:k]].mean())


def gaussian_stats(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of Tensor[n, D] as float64 numpy arrays."""
    a = torch.as_tensor(x).detach().cpu().double().numpy()
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"need a [n >= 2, D] embedding matrix, got shape {a.shape}")
    return a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    with np.errstate(all="ignore"):
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians.

    As in the standard FID code: if the product is singular (non-finite square root) an ``eps``
    offset is added to both covariance diagonals; a negligible imaginary part from numerical error is
    dropped (a large one raises ValueError)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError("mean / covariance shapes do not match")
    diff = mu1 - mu2
    covmean = _sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance(x: Tensor, y: Tensor, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to embeddings Tensor[n, D] and Tensor[m, D]."""
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps=eps)


def correlations(a: Tensor, b: Tensor) -> dict[str, float]:
    """Pearson and Spearman correlation of two score vectors (torchmetrics functional, float64)."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    x, y = _as_1d(a), _as_1d(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return {"pearson": float(pearson_corrcoef(x, y)), "spearman": float(spearman_corrcoef(x, y))}


def minmax_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """(x - min) / (max - min) along ``dim``; a constant vector maps to zeros."""
    x = torch.as_tensor(x).double()
    lo = x.amin(dim=dim, keepdim=True)
    rng = x.amax(dim=dim, keepdim=True) - lo
    return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))


def softmax_normalize(x: Tensor, dim: int = -1, temperature: float = 1.0) -> Tensor:
    """Softmax along ``dim`` (the scores of each method sum to 1)."""
    return torch.softmax(torch.as_tensor(x).double() / temperature, dim=dim)
