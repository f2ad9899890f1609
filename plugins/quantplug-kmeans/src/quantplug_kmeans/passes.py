"""The ``kmeans`` model pass: cluster each layer's weights, fine-tune the centroids, store lookup tables.

Deep Compression (Han, Mao, Dally, ICLR 2016), "trained quantization" (sec. 3), without the pruning and Huffman
stages: per layer, ``k = 2^b`` centroids (``b`` = the layer's weight bit width from the recipe's bit policy) by
k-means with linear initialization; then the centroids are fine-tuned with the task loss, each centroid's
gradient being the sum of the gradients of its weights; finally each layer is hardened to a lookup table
(``QuantLayer.set_codebook``: ``k`` fp32 centroids and a uint8 index per weight), which ``quantplug.load``
and the ``int`` exporter (``b``-bit packed indices) reproduce exactly.

The paper retrains with the network's SGD on the whole training set; here the fine-tuning uses the calibration
batches and Adam (``quantplug.finetune``), with the rest of the network frozen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.finetune import finetune_task_loss
from quantplug.interfaces import ModelPass, PassContext
from quantplug.modules import QuantLayer, quant_layers
from quantplug_kmeans.clustering import INITS, kmeans_1d
from quantplug_kmeans.sharing import LR_UNITS, SharedWeights

logger = logging.getLogger(__name__)

__all__ = ["KMeansPass", "cluster_layer"]


def cluster_layer(layer: QuantLayer, *, init: str, max_iter: int, generator: torch.Generator | None,
                  lr_unit: str = "max") -> tuple[SharedWeights, dict[str, Any]]:
    """k-means of the layer's full-precision weights into ``2^bits`` centroids; the shared-weight state (centroids
    learned in units of ``lr_unit``, see ``centroid_unit``) and a summary of the clustering."""
    assert layer.weight_spec is not None
    k = 2**layer.weight_spec.bits
    result = kmeans_1d(layer.weight.detach(), k, init=init, max_iter=max_iter, generator=generator)
    shared = SharedWeights(layer, result.centroids, result.indices, lr_unit)
    used = int(torch.unique(result.indices).numel())
    return shared, {"bits": layer.weight_spec.bits, "clusters_used": used, "iterations": result.iterations,
                    "converged": result.converged, "centroid_unit": float(shared.unit)}


class KMeansPass(ModelPass):
    """Deep Compression's trained quantization (Han et al., ICLR 2016): k-means codebooks, centroids fine-tuned."""

    name = "kmeans"
    stage = "quantized"

    @dataclass(frozen=True)
    class Config:
        init: str = "linear"  # centroid initialization: linear (the paper's best), density, random (Forgy)
        max_iter: int = 300  # Lloyd iterations per layer (stops earlier when no assignment changes)
        epochs: int = 4  # centroid fine-tuning passes over the calibration batches (0: k-means only)
        lr: float = 1e-3  # Adam learning rate of the centroids, in units of ``lr_unit``
        #: "max": the layer's max |W| (the default, with which the README results were measured);
        #: "spacing": (max W - min W) / (k - 1) of the layer, the same fraction of the distance between
        #: neighbouring centroids for every codebook size (better for 8-bit codebooks on held-out data, see README)
        lr_unit: str = "max"

        def __post_init__(self) -> None:
            if self.init not in INITS:
                raise ConfigError(f"kmeans init must be one of {', '.join(INITS)}; got {self.init!r}")
            if self.lr_unit not in LR_UNITS:
                raise ConfigError(f"kmeans lr_unit must be one of {', '.join(LR_UNITS)}; got {self.lr_unit!r}")
            if self.max_iter < 1 or self.epochs < 0 or self.lr < 0:
                raise ConfigError("kmeans needs max_iter >= 1, epochs >= 0 and lr >= 0")

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        layers = [(name, layer) for name, layer in quant_layers(model) if layer.quantizes_weight]
        if not layers:
            raise ConfigError("kmeans found no layer with quantized weights: the bit policy keeps every layer in "
                              "full precision (check bits.first_layer_bits / bits.overrides)")
        generator = torch.Generator().manual_seed(ctx.seed)
        shared: dict[str, SharedWeights] = {}
        per_layer: dict[str, dict[str, Any]] = {}
        for name, layer in layers:
            shared[name], per_layer[name] = cluster_layer(layer, init=self.config.init,
                                                          max_iter=self.config.max_iter, generator=generator,
                                                          lr_unit=self.config.lr_unit)
            layer.rounder = shared[name]
            layer.invalidate_cache()
        params = [s.normalized for s in shared.values()]
        summary = finetune_task_loss(model, ctx, [{"params": params, "lr": self.config.lr}],
                                     epochs=self.config.epochs, desc="kmeans centroid fine-tune")
        for name, layer in layers:
            layer.set_codebook(*shared[name].codebook())
        logger.info("kmeans: %d layers shared; calibration task loss %.4g -> %.4g", len(layers),
                    summary.loss_before, summary.loss_after)
        return {**summary.to_dict(), "layers": per_layer}
