"""Train-to-train target selection (Section 3.1): k-means over training-set audio embeddings,
one target per cluster (the item nearest the centroid)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kmeans", "lloyd_step", "select_targets"]


def _sqdist(x: Tensor, c: Tensor) -> Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.T + c.pow(2).sum(1)[None, :]).clamp_min(0.0)


def lloyd_step(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """One Lloyd iteration: (new centroids [k, D], labels [N]); each centroid is the mean of its members.

    An empty cluster takes the point farthest from its centroid among clusters with more than one member;
    the point leaves its old cluster (whose mean is then taken without it)."""
    k = centroids.shape[0]
    d = _sqdist(x, centroids)
    labels = d.argmin(1)
    dist = d.gather(1, labels[:, None]).squeeze(1)
    for j in range(k):
        counts = torch.bincount(labels, minlength=k)
        if counts[j] > 0:
            continue
        movable = counts[labels] > 1
        if not movable.any():
            break
        far = int(torch.where(movable, dist, torch.full_like(dist, -1.0)).argmax())
        labels[far], dist[far] = j, 0.0
    counts = torch.bincount(labels, minlength=k)
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), centroids)
    return new, labels


def kmeans(x: Tensor, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 100,
           tol: float = 1e-8) -> tuple[Tensor, Tensor, float]:
    """Deterministic k-means (Lloyd, k-means++ initialisation with a seeded torch.Generator).

    Returns (centroids Tensor[k, D], labels Tensor[N], inertia); the best of ``n_init`` runs.
    Empty clusters are re-seeded as in :func:`lloyd_step`."""
    x = torch.as_tensor(x).detach().cpu().double()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(max(1, n_init)):
        # k-means++
        first = int(torch.randint(n, (1,), generator=gen))
        cent = [x[first]]
        d2 = _sqdist(x, x[first:first + 1]).squeeze(1)
        for _j in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
            nxt = int(torch.multinomial(p, 1, generator=gen))
            cent.append(x[nxt])
            d2 = torch.minimum(d2, _sqdist(x, x[nxt:nxt + 1]).squeeze(1))
        c = torch.stack(cent)
        prev = None
        for _it in range(max_iter):
            new_c, labels = lloyd_step(x, c)
            shift = (new_c - c).pow(2).sum().item()
            c = new_c
            inertia = _sqdist(x, c).gather(1, labels[:, None]).sum().item()
            if prev is not None and shift <= tol:
                break
            prev = inertia
        labels = _sqdist(x, c).argmin(1)
        inertia = _sqdist(x, c).gather(1, labels[:, None]).sum().item()
        if best is None or inertia < best[2] - 1e-12:
            best = (c, labels, inertia)
    return best[0], best[1], float(best[2])


def select_targets(embeddings: Tensor, k: int, seed: int = 0, n_init: int = 4, normalize: bool = True) -> list[int]:
    """Indices of ``k`` diverse training items: k-means over ``embeddings`` (Tensor[N, D]), L2-normalised
    first (cosine geometry, as the similarities are cosines) unless ``normalize`` is false, then per
    cluster the item nearest its centroid.

    Clusters are ordered by their smallest member index (deterministic, independent of the
    initialisation order); indices are distinct (if the nearest item was already taken by another
    cluster the next-nearest unused item is chosen)."""
    x = torch.as_tensor(embeddings).detach().cpu().double()
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    cent, labels, _ = kmeans(x, k, seed=seed, n_init=n_init)
    first_member = [int(torch.nonzero(labels == j).min()) if (labels == j).any() else x.shape[0] + j
                    for j in range(k)]
    order = sorted(range(k), key=lambda j: first_member[j])
    d = _sqdist(x, cent)
    chosen: list[int] = []
    for j in order:
        col = d[:, j].clone()
        in_cluster = labels == j
        col[~in_cluster] += col.max() + 1.0  # prefer members of the cluster
        for i in torch.argsort(col, stable=True).tolist():
            if i not in chosen:
                chosen.append(int(i))
                break
    return chosen
