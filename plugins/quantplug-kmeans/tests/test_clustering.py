"""1-D k-means: initializations, nearest assignment, centroids equal to their cluster means, convergence."""

from __future__ import annotations

import pytest
import torch
from quantplug_kmeans import assign, cluster_means, initial_centroids, kmeans_1d

from quantplug.errors import ConfigError


def _weights(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.05 + 0.01 * torch.randn(n, generator=g).sign()  # a bimodal-ish layer


def test_linear_init_spans_min_to_max() -> None:
    w = _weights()
    c = initial_centroids(w, 16, "linear")
    assert torch.allclose(c, torch.linspace(float(w.min()), float(w.max()), 16))


def test_density_init_follows_the_cdf() -> None:
    w = _weights()
    c = initial_centroids(w, 8, "density")
    below = torch.tensor([(w <= v).float().mean() for v in c])
    assert torch.allclose(below, (torch.arange(8) + 0.5) / 8, atol=1e-3)


def test_random_init_picks_distinct_weights_with_the_generator() -> None:
    w = _weights()
    a = initial_centroids(w, 16, "random", torch.Generator().manual_seed(1))
    b = initial_centroids(w, 16, "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.isin(a, w).all() and a.unique().numel() == 16
    with pytest.raises(ConfigError, match="unknown k-means init"):
        initial_centroids(w, 4, "kmeans++")


def test_assign_is_the_nearest_centroid_even_unsorted() -> None:
    w = _weights(2000)
    c = torch.tensor([0.05, -0.1, 0.0, 0.2, -0.02])
    brute = (w[:, None] - c[None, :]).abs().argmin(dim=1)
    assert torch.equal(assign(w, c), brute)


def test_empty_cluster_keeps_its_centroid() -> None:
    values = torch.tensor([0.0, 0.1, 1.0, 1.2])
    indices = torch.tensor([0, 0, 2, 2])
    means = cluster_means(values, indices, torch.tensor([9.0, 5.0, 9.0]))
    assert torch.allclose(means, torch.tensor([0.05, 5.0, 1.1]))


@pytest.mark.parametrize("init", ["linear", "density", "random"])
@pytest.mark.parametrize("k", [2, 4, 16])
def test_converged_centroids_are_their_cluster_means_and_assignment_is_nearest(init: str, k: int) -> None:
    w = _weights().reshape(100, 200)  # any shape: indices come back in it
    result = kmeans_1d(w, k, init=init, generator=torch.Generator().manual_seed(0))
    assert result.converged and result.indices.shape == w.shape
    flat, idx = w.reshape(-1).double(), result.indices.reshape(-1)
    for j in idx.unique().tolist():
        assert float(result.centroids[j]) == pytest.approx(float(flat[idx == j].mean()), abs=1e-7)
    brute = (w.reshape(-1, 1) - result.centroids.reshape(1, -1)).abs().argmin(dim=1)
    distances = (w.reshape(-1) - result.centroids[idx]).abs()
    assert torch.allclose(distances, (w.reshape(-1) - result.centroids[brute]).abs())


def test_lloyd_lowers_the_within_cluster_error_below_the_initial_assignment() -> None:
    w = _weights()
    start = initial_centroids(w, 8, "linear")
    before = float(((w - start[assign(w, start)]) ** 2).sum())
    result = kmeans_1d(w, 8)
    after = float(((w - result.centroids[result.indices]) ** 2).sum())
    assert after < 0.8 * before


def test_finds_well_separated_clusters_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-1.0, 0.0, 2.0])
    w = torch.cat([c + 0.01 * torch.randn(300, generator=g) for c in centers])
    result = kmeans_1d(w, 3)
    assert torch.allclose(result.centroids.sort().values, centers, atol=0.005)


def test_not_converged_still_returns_cluster_means() -> None:
    w = _weights()
    result = kmeans_1d(w, 64, max_iter=1)
    assert not result.converged and result.iterations == 1
    flat, idx = w.double(), result.indices
    for j in idx.unique().tolist()[:10]:
        assert float(result.centroids[j]) == pytest.approx(float(flat[idx == j].mean()), abs=1e-7)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="k >= 1"):
        kmeans_1d(torch.randn(10), 0)
    with pytest.raises(ConfigError, match="max_iter"):
        kmeans_1d(torch.randn(10), 2, max_iter=0)
    with pytest.raises(ConfigError, match="at least one value"):
        kmeans_1d(torch.empty(0), 2)
