"""Shared weights of one layer while its centroids are fine-tuned (Deep Compression, Han et al. 2016, sec. 3.3).

The layer's weights are ``W = C[I]``: a codebook ``C`` (``k`` centroids) and a fixed index per weight ``I``. The
gradient of a centroid is the sum of the gradients of the weights that share it (paper eq. 3)::

    dL/dC_k = sum_{i, j} dL/dW_ij * 1(I_ij = k)

which is what autograd computes for the lookup ``C[I]`` (indexing backpropagates by a scatter-add). The indices
are not trained (the paper fine-tunes the centroids only). ``C`` is stored in units of the layer's ``max |W|``
so that one learning rate suits every layer; ``centroids()`` gives it in the weight's own units.
"""

from __future__ import annotations

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import EPS

__all__ = ["SharedWeights"]


class SharedWeights(WeightRounder):
    """``W = C[I]`` for one layer, ``C`` learnable (normalized by ``max |W|``), ``I`` fixed."""

    def __init__(self, layer: QuantLayer, centroids: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children
        weight = layer.weight.detach()
        if tuple(indices.shape) != tuple(weight.shape):
            raise ConfigError(f"indices of shape {tuple(indices.shape)} do not match the weight {tuple(weight.shape)}")
        self.register_buffer("unit", weight.abs().max().clamp_min(EPS))
        self.register_buffer("indices", indices.detach().long().to(weight.device))
        self.normalized = nn.Parameter(centroids.detach().to(weight.device, weight.dtype) / self.unit)

    def centroids(self) -> torch.Tensor:
        """The codebook in the weight's units (differentiable)."""
        return self.normalized * self.unit

    def forward(self) -> torch.Tensor:
        return self.centroids()[self.indices]

    @torch.no_grad()
    def codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The hardened lookup table and indices (uint8)."""
        return self.centroids().detach().clone(), self.indices.to(torch.uint8)

    def hard_codes(self) -> torch.Tensor:
        raise ConfigError("shared weights are a lookup table, not affine codes: harden with codebook()")
