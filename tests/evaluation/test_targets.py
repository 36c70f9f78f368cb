import torch

from musicattr.evaluation.targets import kmeans, select_targets

torch.set_num_threads(1)


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
    t = select_targets(x, k=4, seed=0)
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
