import torch

from musicattr.evaluation.target_selection import kmeans, lloyd_step, select_targets



def _blobs(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, -10.0, 0]])
    labels = torch.arange(4).repeat_interleave(25)
    perm = torch.randperm(100, generator=g)
    labels = labels[perm]
    x = centers[labels] + 0.3 * torch.randn(100, 3, generator=g)
    return x, labels, centers


def test_one_target_per_cluster_nearest_centroid():
    x, labels, centers = _blobs()
    t = select_targets(x, k=4, seed=0, normalize=False)  # nearest to the centroid in Euclidean geometry
    assert len(t) == 4 and len(set(t)) == 4
    assert sorted(labels[t].tolist()) == [0, 1, 2, 3]
    for i in t:
        members = x[labels == labels[i]]
        d = (members - members.mean(0)).norm(dim=1)
        assert torch.isclose((x[i] - members.mean(0)).norm(), d.min())
    # clusters ordered by their smallest member index
    first = [int(torch.nonzero(labels == labels[i]).min()) for i in t]
    assert first == sorted(first)


def test_deterministic():
    x, _, _ = _blobs(1)
    assert select_targets(x, 4, seed=3) == select_targets(x, 4, seed=3)
    assert select_targets(x, 4, seed=3) == select_targets(x, 4, seed=7)  # well separated: same answer


def test_kmeans_k_equals_n_and_distinct():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    t = select_targets(x, 6, seed=0)
    assert sorted(t) == list(range(6))
    c, lab, inertia = kmeans(x, 6, seed=0)
    assert inertia < 1e-9


def test_lloyd_step_reseeds_an_empty_cluster_without_corrupting_the_others():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    c = torch.tensor([[1.0], [10.0], [100.0]], dtype=torch.float64)  # nothing is nearest to 100: empty
    new, labels = lloyd_step(x, c)
    assert torch.bincount(labels, minlength=3).min() >= 1
    for j in range(3):  # every centroid is the mean of its members
        assert torch.allclose(new[j], x[labels == j].mean(0)), (j, new[j], x[labels == j])
    assert labels.tolist() == [2, 0, 0, 1]  # the farthest point of the only cluster with two or more moved


def test_targets_follow_directions_not_norms():
    """Embeddings are L2-normalised: a direction with a few items is found even beside loud items."""
    g = torch.Generator().manual_seed(0)
    near_a = torch.tensor([1.0, 0.0]) + 0.02 * torch.randn(10, 2, generator=g)
    far_a = 100.0 * (torch.tensor([1.0, 0.0]) + 0.02 * torch.randn(10, 2, generator=g))
    b = torch.tensor([0.0, 1.0]) + 0.02 * torch.randn(3, 2, generator=g)
    x = torch.cat([near_a, far_a, b])
    direction = [0] * 20 + [1] * 3
    assert sorted(direction[i] for i in select_targets(x, 2, seed=0)) == [0, 1]
    # by Euclidean distance the norms dominate: both targets would lie along a
    assert sorted(direction[i] for i in select_targets(x, 2, seed=0, normalize=False)) == [0, 0]
