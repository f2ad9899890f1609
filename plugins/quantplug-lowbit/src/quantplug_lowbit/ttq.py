"""TTQ: "Trained Ternary Quantization" (Zhu, Han, Mao, Dally, ICLR 2017; code ``czhu95/ternarynet``).

Each layer's weights become ``{-W_n, 0, +W_p}`` with two learned scales per layer::

    Delta = t * max |W~|            t = 0.05 (paper sec. 3; ``tw_ternarize(x, thre)`` with ``--t 0.05``)
    w_t   = +W_p  where W~ >  Delta
            0     where |W~| <= Delta
            -W_n  where W~ < -Delta

``W~`` are latent full-precision weights, normalized by their maximum as in the paper ("we normalize the
full-precision weights to the range [-1, +1] by dividing each weight by the maximum weight"); quantplug stores
the scales in those units too and multiplies by the layer's ``max |W|`` (a constant) to get real weights, so the
network's function is kept (quantplug folds BatchNorm, which would otherwise absorb the normalization).

Gradients (paper eq. 2 and 3)::

    dL/dW_p  =  sum_{i in I_p} dL/dw_t(i)            dL/dW_n  = -sum_{i in I_n} dL/dw_t(i)
    dL/dW~_i =  W_p dL/dw_t(i)  (i in I_p),   1 * dL/dw_t(i)  (|W~_i| <= Delta),   W_n dL/dw_t(i)  (i in I_n)

(eq. 2 prints no minus sign for ``W_n``; ``w_t = -W_n`` there, and the released code's autograd gives the
minus, which is what a gradient step needs.) The scales' gradients are the pooled gradients of the ternary
weights, exactly as the ``lookup-table`` form ``w_t = table[index]``, ``table = [-W_n, 0, +W_p]``, computes them.

In quantplug this is a ``quantized``-stage model pass: after the run's ordinary calibration, it ternarizes every
layer whose weights have the recipe's ``weight.bits`` (2 in the ``ttq`` recipe), fine-tunes ``W_p``, ``W_n``
(and, with ``learn_assignments``, the latent weights) with the task loss on the calibration batches (Adam), and
hardens each layer to a lookup table
(``QuantLayer.set_codebook``): three fp32 values and a uint8 index per weight, which ``quantplug.load`` and the
``int`` exporter (2-bit indices) reproduce exactly. An affine grid cannot hold ``W_p != W_n``. Layers the bit
policy gives another width (``bits.first_layer_bits=8``, ``bits.overrides``) keep the run's rounding at that
width (nearest in the recipe) and take no part in the fine-tuning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.finetune import finetune_task_loss
from quantplug.interfaces import ModelPass, PassContext, WeightRounder
from quantplug.modules import QuantLayer, quant_layers
from quantplug.quantizer import EPS

logger = logging.getLogger(__name__)

__all__ = ["TTQ_THRESHOLD", "TTQPass", "TTQWeights", "ttq_indices"]

#: t of the paper and of the released code (``--t 0.05``)
TTQ_THRESHOLD = 0.05
#: table order: index 0 = -W_n, 1 = 0, 2 = +W_p
NEGATIVE, ZERO, POSITIVE = 0, 1, 2


def ttq_indices(latent: torch.Tensor, threshold: float) -> torch.Tensor:
    """Table index per weight: 2 where ``W~ > t max|W~|``, 0 where ``W~ < -t max|W~|``, else 1 (long)."""
    delta = threshold * latent.abs().max()
    return (ZERO + (latent > delta).long() - (latent < -delta).long()).long()


class TTQWeights(WeightRounder):
    """A layer's TTQ state while it is fine-tuned: latent weights (in units of ``max |W|``) and ``W_p``, ``W_n``."""

    def __init__(self, layer: QuantLayer, config: TTQPass.Config) -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children
        weight = layer.weight.detach()
        self.threshold = config.threshold
        self.register_buffer("unit", weight.abs().max().clamp_min(EPS))
        self.latent = nn.Parameter(weight / self.unit, requires_grad=config.learn_assignments)
        index = ttq_indices(self.latent.detach(), self.threshold)
        if config.init == "mean":  # the least-squares W_p, W_n of the initial assignment
            v = self.latent.detach()
            positive = v[index == POSITIVE].mean() if (index == POSITIVE).any() else torch.tensor(self.threshold)
            negative = (-v[index == NEGATIVE]).mean() if (index == NEGATIVE).any() else torch.tensor(self.threshold)
        else:  # "max": the released code's initial 1.0, here in units of max |W| (the paper's normalization)
            positive = negative = torch.tensor(1.0)
        self.positive = nn.Parameter(positive.to(weight.dtype).reshape(()))
        self.negative = nn.Parameter(negative.to(weight.dtype).reshape(()))

    def indices(self) -> torch.Tensor:
        """The current ternary assignment (from the latent weights), shape of the weight."""
        return ttq_indices(self.latent.detach(), self.threshold)

    def table(self) -> torch.Tensor:
        """``[-W_n, 0, +W_p]`` in the layer's weight units (differentiable in ``W_p``, ``W_n``)."""
        zero = torch.zeros((), dtype=self.positive.dtype, device=self.positive.device)
        return self.unit * torch.stack([-self.negative, zero, self.positive])

    def forward(self) -> torch.Tensor:
        index = self.indices()
        weight = self.table()[index]
        if self.latent.requires_grad:  # gradient 1 of the paper: W_p, 1 or W_n times dL/dw_t, straight through
            coef = torch.stack([self.negative, torch.ones_like(self.positive), self.positive]).detach()[index]
            weight = weight + self.unit * coef * (self.latent - self.latent.detach())
        return weight

    @torch.no_grad()
    def codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The hardened lookup table (3 values) and indices (uint8)."""
        return self.table().detach().clone(), self.indices().to(torch.uint8)

    def hard_codes(self) -> torch.Tensor:
        raise ConfigError("TTQ weights are a lookup table, not affine codes: harden with codebook()")


class TTQPass(ModelPass):
    """TTQ (Zhu et al., ICLR 2017): ternary {-W_n, 0, +W_p}, Delta = 0.05 max|W|, scales learned with the task loss."""

    name = "ttq"
    stage = "quantized"

    @dataclass(frozen=True)
    class Config:
        threshold: float = TTQ_THRESHOLD  # t: Delta = t * max |W~| per layer (paper, released code)
        #: "mean": W_p, W_n start at the mean of the kept positive / negative (normalized) weights (ours, the
        #: least-squares fit of the initial assignment); "max": at 1.0 on the normalized weights, i.e. max |W|.
        #: "max" combines the paper's normalization by the maximum with the released code's initial 1.0: the code
        #: (``tw_ternarize``) ternarizes the raw weights with W_p = W_n = 1.0 and a BatchNorm after the
        #: convolutions absorbs the scale; quantplug folds BatchNorm, so it keeps the normalization
        init: str = "mean"
        learn_assignments: bool = True  # train the latent weights too (the paper's gradient 1)
        epochs: int = 8  # passes over the calibration batches
        lr: float = 1e-3  # Adam learning rate of W_p, W_n (units of max |W|)
        latent_lr: float = 1e-4  # Adam learning rate of the latent weights (units of max |W|)

        def __post_init__(self) -> None:
            if self.init not in ("mean", "max"):
                raise ConfigError(f"ttq init must be 'mean' or 'max', got {self.init!r}")
            if not 0.0 <= self.threshold < 1.0:
                raise ConfigError(f"ttq threshold must lie in [0, 1), got {self.threshold}")
            if self.epochs < 0 or self.lr < 0 or self.latent_lr < 0:
                raise ConfigError("ttq epochs and learning rates must be >= 0")

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        quantized = [(name, layer) for name, layer in quant_layers(model) if layer.quantizes_weight]
        low_bits = ctx.recipe.weight.bits
        layers = [(name, layer) for name, layer in quantized if layer.weight_spec.bits == low_bits]
        other_widths = {name: layer.weight_spec.bits for name, layer in quantized if layer.weight_spec.bits != low_bits}
        if not quantized:
            raise ConfigError("ttq found no layer with quantized weights: the bit policy keeps every layer in "
                              "full precision (check bits.first_layer_bits / bits.overrides)")
        if not layers:
            widths = sorted(set(other_widths.values()))
            raise ConfigError(f"ttq ternarizes layers with the recipe's weight.bits={low_bits} and the bit policy "
                              f"gives every quantized layer another width ({widths}): check bits.overrides / "
                              "bits.first_layer_bits, or set weight.bits")
        if other_widths:
            logger.info("ttq: %d layers keep the run's rounding at their own width (not %d bits): %s",
                        len(other_widths), low_bits, ", ".join(f"{n} ({b})" for n, b in other_widths.items()))
        weights: dict[str, TTQWeights] = {}
        for name, layer in layers:
            weights[name] = TTQWeights(layer, self.config)
            layer.rounder = weights[name]
            layer.invalidate_cache()
        scales = [p for w in weights.values() for p in (w.positive, w.negative)]
        latents = [w.latent for w in weights.values() if w.latent.requires_grad]
        summary = finetune_task_loss(model, ctx, [{"params": scales, "lr": self.config.lr},
                                                  {"params": latents, "lr": self.config.latent_lr}],
                                     epochs=self.config.epochs, desc="ttq fine-tune")
        per_layer: dict[str, dict[str, float]] = {}
        for name, layer in layers:
            table, index = weights[name].codebook()
            layer.set_codebook(table, index)
            per_layer[name] = {"w_p": float(table[POSITIVE]), "w_n": float(-table[NEGATIVE]),
                               "zeros": float((index == ZERO).float().mean())}
        logger.info("ttq: %d layers ternarized; calibration task loss %.4g -> %.4g", len(layers),
                    summary.loss_before, summary.loss_after)
        return {**summary.to_dict(), "layers": per_layer, "other_widths": other_widths}
