"""One-dimensional k-means (Lloyd's algorithm) over a layer's weights, as in Deep Compression.

Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and
Huffman Coding", ICLR 2016, sec. 3.1-3.2: the weights of a layer are partitioned into ``k = 2^b`` clusters
minimizing the within-cluster sum of squares ``sum_i sum_{w in c_i} |w - c_i|^2``. Centroid initialization
(sec. 3.2): *linear* (centroids evenly spaced between the layer's min and max weight; the paper's best, because
it keeps the few large weights represented), *density* (evenly spaced in the weights' CDF), *random* (Forgy:
``k`` distinct weights drawn at random).

In one dimension the nearest centroid is found by binary search over the midpoints of the sorted centroids.
A cluster that loses every member keeps its centroid (it is then simply unused).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quantplug.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["INITS", "KMeansResult", "assign", "cluster_means", "initial_centroids", "kmeans_1d"]

INITS = ("linear", "density", "random")


@dataclass
class KMeansResult:
    """Centroids ``[k]``, the index of each value's centroid (long, shape of the input), and Lloyd's iterations."""

    centroids: torch.Tensor
    indices: torch.Tensor
    iterations: int
    converged: bool


def initial_centroids(values: torch.Tensor, k: int, init: str, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """``k`` starting centroids for the 1-D ``values`` (sorted ascending)."""
    flat = values.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ConfigError("k-means needs at least one value")
    if init == "linear":
        return torch.linspace(float(flat.min()), float(flat.max()), k, device=flat.device)
    if init == "density":
        probs = (torch.arange(k, device=flat.device, dtype=torch.float32) + 0.5) / k
        sorted_values = flat.sort().values
        positions = (probs * (flat.numel() - 1)).round().long()
        return sorted_values[positions]
    if init == "random":
        perm = torch.randperm(flat.numel(), generator=generator)[:k].to(flat.device)
        picked = flat[perm]
        if picked.numel() < k:  # fewer values than clusters: repeat the last one (those clusters stay empty)
            picked = torch.cat([picked, picked[-1:].expand(k - picked.numel())])
        return picked.sort().values
    raise ConfigError(f"unknown k-means init {init!r}; use one of {', '.join(INITS)}")


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value (ties go to the smaller centroid), shape of ``values``."""
    order = torch.argsort(centroids, stable=True)
    ordered = centroids[order]
    midpoints = (ordered[1:] + ordered[:-1]) / 2
    position = torch.bucketize(values.reshape(-1).float(), midpoints)
    return order[position].reshape(values.shape)


def cluster_means(values: torch.Tensor, indices: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of the values of each cluster; an empty cluster keeps its ``previous`` centroid."""
    flat, idx = values.reshape(-1).double(), indices.reshape(-1)
    k = previous.numel()
    sums = torch.zeros(k, dtype=torch.float64, device=flat.device).index_add_(0, idx, flat)
    counts = torch.bincount(idx, minlength=k).to(torch.float64)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), previous.double())
    return means.to(previous.dtype)


def kmeans_1d(values: torch.Tensor, k: int, *, init: str = "linear", max_iter: int = 300,
              generator: torch.Generator | None = None) -> KMeansResult:
    """Lloyd's algorithm until no assignment changes (or ``max_iter`` updates).

    On return the centroids are the means of their clusters (empty clusters excepted); when ``converged`` every
    value's index is also its nearest centroid.
    """
    if k < 1:
        raise ConfigError(f"k-means needs k >= 1 clusters, got {k}")
    if max_iter < 1:
        raise ConfigError(f"k-means needs max_iter >= 1, got {max_iter}")
    flat = values.detach().reshape(-1).float()
    centroids = initial_centroids(flat, k, init, generator)
    indices = assign(flat, centroids)
    converged = False
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        centroids = cluster_means(flat, indices, centroids)
        new_indices = assign(flat, centroids)
        if torch.equal(new_indices, indices):
            converged = True
            break
        indices = new_indices
    if not converged:
        centroids = cluster_means(flat, indices, centroids)  # keep "centroid = mean of its cluster"
        logger.warning("k-means (k=%d, %d values) did not converge in %d iterations", k, flat.numel(), max_iter)
    return KMeansResult(centroids, indices.reshape(values.shape), iterations, converged)
