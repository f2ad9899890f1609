"""Shared weights of one layer while its centroids are fine-tuned (Deep Compression, Han et al. 2016, sec. 3.3).

The layer's weights are ``W = C[I]``: a codebook ``C`` (``k`` centroids) and a fixed index per weight ``I``. The
gradient of a centroid is the sum of the gradients of the weights that share it (paper eq. 3)::

    dL/dC_k = sum_{i, j} dL/dW_ij * 1(I_ij = k)

which is what autograd computes for the lookup ``C[I]`` (indexing backpropagates by a scatter-add). The indices
are not trained (the paper fine-tunes the centroids only). ``C`` is stored divided by a per-layer ``unit`` (the
layer's ``max |W|`` by default, or the spacing of a linear codebook, see ``centroid_unit``) so that one Adam
learning rate suits every layer; ``centroids()`` gives it in the weight's own units. Adam's first step moves
every centroid that has a gradient by about ``lr * unit`` in the weight's units.
"""

from __future__ import annotations

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import EPS

__all__ = ["LR_UNITS", "SharedWeights", "centroid_unit"]

#: what one unit of a centroid's learned value is: the spacing of a linear codebook, or the layer's max |W|
LR_UNITS = ("spacing", "max")


def centroid_unit(weight: torch.Tensor, k: int, lr_unit: str = "max") -> torch.Tensor:
    """``(max W - min W) / (k - 1)`` (``spacing``: an Adam step is then the same fraction of the distance between
    neighbouring centroids whatever ``k``) or ``max |W|`` (``max``); never below ``EPS``."""
    if lr_unit == "spacing":
        return ((weight.max() - weight.min()) / max(k - 1, 1)).clamp_min(EPS)
    if lr_unit == "max":
        return weight.abs().max().clamp_min(EPS)
    raise ConfigError(f"lr_unit must be one of {', '.join(LR_UNITS)}; got {lr_unit!r}")


class SharedWeights(WeightRounder):
    """``W = C[I]`` for one layer, ``C`` learnable (stored divided by a per-layer unit), ``I`` fixed."""

    def __init__(self, layer: QuantLayer, centroids: torch.Tensor, indices: torch.Tensor,
                 lr_unit: str = "max") -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children
        weight = layer.weight.detach()
        if tuple(indices.shape) != tuple(weight.shape):
            raise ConfigError(f"indices of shape {tuple(indices.shape)} do not match the weight {tuple(weight.shape)}")
        self.register_buffer("unit", centroid_unit(weight, centroids.numel(), lr_unit))
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
