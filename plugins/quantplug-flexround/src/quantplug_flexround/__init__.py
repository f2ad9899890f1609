"""FlexRound: "Learnable Rounding based on Element-wise Division for Post-Training Quantization".

Lee, Kim, Kwon, Lee, ICML 2023 (arXiv 2306.00317); released code onliwad101/FlexRound_LRQ (LLaMA only).

    W^ = s1 * (clip(round(W / (s1 * S2 * s3 * s4)) + z, qmin, qmax) - z)

* ``s1``: the quantization grid size, one per quantization row of the layer's weight quantizer (one for
  per-tensor, one per output channel for per-channel), initialized from the quantizer's scale (the
  observer's Lp-search result) and learned;
* ``S2``: one scale per weight element; ``s3``: one per output channel; ``s4``: one per input channel
  (convolutions only); all initialized to 1;
* every scale is learned in log space (``s = exp(d)``; ``s1 = scale0 * exp(d1)``, the same
  parametrization shifted so that it starts exactly at the quantizer's scale), so it stays positive;
  the rounding is straight-through, so gradients reach all four through the division and ``s1`` also
  through the multiplication (the "reciprocal rule" of the paper);
* ``z`` (zero point) is kept from the quantizer, as in the released code;
* no rounding regularizer: the hard codes are the forward pass's own codes, and ``final_qparams``
  hands the learned ``s1`` to the layer as its new scale, so hardening is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from quantplug import hookimpl
from quantplug.errors import ConfigError
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import broadcast_rows, clamp_codes, round_ste
from quantplug.recipes import RecipeSpec

__all__ = ["FlexRounding", "FlexRounder", "FLEXROUND"]

logger = logging.getLogger(__name__)


class FlexRounder(WeightRounder):
    """The per-layer FlexRound state: log-space ``d1`` (grid, per row), ``d2`` (element), ``d3`` (output
    channel), ``d4`` (input channel, convolutions)."""

    def __init__(self, layer: QuantLayer, config: FlexRounding.Config) -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children
        spec, q = layer.weight_spec, layer.weight_quantizer
        if spec is None or q is None or not q.active:
            raise ConfigError("flexround needs a calibrated weight quantizer; run weight calibration first")
        weight = layer.weight.detach()
        self.spec = spec
        self.register_buffer("scale0", q.scale.detach().clone().reshape(-1).float())
        self.register_buffer("zero_point", q.zero_point.detach().clone().reshape(-1).float())
        self.register_buffer("zero_full", broadcast_rows(self.zero_point, weight, spec).clone())
        zeros = {"device": weight.device, "dtype": weight.dtype}
        # log s1 = log scale0 + d1: d1 starts at 0, so s1 starts exactly at the quantizer's scale
        self.d1 = nn.Parameter(torch.zeros(self.scale0.shape, **zeros), requires_grad=config.learn_grid)
        self.d2 = nn.Parameter(torch.zeros(weight.shape, **zeros)) if config.element_scale else None
        out_shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        self.d3 = nn.Parameter(torch.zeros(out_shape, **zeros)) if config.out_channel_scale else None
        # s4 only for convolutions with more than one input channel per group (a depthwise kernel has one:
        # its s4 would be a single number, redundant with s3)
        use_s4 = config.in_channel_scale and weight.dim() == 4 and weight.shape[1] > 1
        in_shape = (1, weight.shape[1]) + (1,) * (weight.dim() - 2)
        self.d4 = nn.Parameter(torch.zeros(in_shape, **zeros)) if use_s4 else None

    # ------------------------------------------------------------------ scales
    def grid(self) -> torch.Tensor:
        """``s1`` per quantization row, ``[rows]``."""
        return self.scale0 * torch.exp(self.d1)

    def scales(self) -> dict[str, torch.Tensor]:
        """Every learned scale (``s1`` per row and those of ``S2``, ``s3``, ``s4`` that exist), for inspection."""
        out = {"s1": self.grid()}
        for key, d in (("S2", self.d2), ("s3", self.d3), ("s4", self.d4)):
            if d is not None:
                out[key] = torch.exp(d)
        return out

    def _codes(self, straight_through: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (float tensor, weight shape) and ``s1`` broadcast to the weight's shape."""
        weight = self.layer[0].weight.detach()
        s1 = broadcast_rows(self.grid(), weight, self.spec)
        logs = [d for d in (self.d2, self.d3, self.d4) if d is not None]
        divisor = s1
        if logs:
            total = logs[0]
            for d in logs[1:]:
                total = total + d
            divisor = s1 * torch.exp(total)
        scaled = weight / divisor
        rounded = round_ste(scaled) if straight_through else torch.round(scaled)
        # the grid's edge codes keep their gradient, as in FlexRound's released code (``clamp_codes``)
        codes = clamp_codes(rounded + self.zero_full, self.spec.qmin, self.spec.qmax)
        return codes, s1

    # ------------------------------------------------------------------ WeightRounder
    def forward(self) -> torch.Tensor:
        codes, s1 = self._codes(straight_through=True)
        return (codes - self.zero_full) * s1

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        codes, _ = self._codes(straight_through=False)
        return codes

    @torch.no_grad()
    def final_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grid().detach().clone(), self.zero_point.clone()


class FlexRounding(Rounding):
    """FlexRound (Lee et al., ICML 2023): rounding by element-wise division, W / (s1 * S2 * s3 * s4), scales learned."""

    name = "flexround"
    learnable = True

    @dataclass(frozen=True)
    class Config:
        learn_grid: bool = True  # learn s1 (the grid size per quantization row)
        element_scale: bool = True  # S2, one scale per weight
        out_channel_scale: bool = True  # s3, one per output channel
        in_channel_scale: bool = True  # s4, one per input channel (convolutions only)

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        if not isinstance(layer, QuantLayer):
            raise ConfigError(f"flexround attaches to quantized Conv2d / Linear layers, not {type(layer).__name__}")
        return FlexRounder(layer, self.config)


#: values of the released code (scripts/FlexRound/Llama-2-*-FlexRound-w4a16.sh, quant/REM_fast.py):
#: 5 000 iterations per block, lr 3e-3 for W4 (2.5e-3 for W3), batch max(batch, 2) = 2, 512 samples
OFFICIAL = {"recon.iters": 5000, "recon.lr": 3e-3, "recon.batch_size": 2, "calib.num_samples": 512}

FLEXROUND = RecipeSpec(
    name="flexround",
    extends="qdrop",
    description="FlexRound: learnable division-based rounding, block reconstruction, QDrop-style input mixing, "
    "per-tensor weights",
    overrides={
        "rounding": {"name": "flexround", "options": {}},
        "weight.granularity": "per_tensor",
        "scheduler.name": "block",
        "loss.name": "mse",
        "activation_policy.name": "drop",
        "activation_policy.options.prob": 0.5,
        "recon.order": "joint",
        "recon.iters": 5000,
        "recon.lr": 3e-3,
        "recon.lr_schedule": "cosine",  # the released code decays the scale lr to 0 with a cosine schedule
        "recon.batch_size": 32,
        "calib.num_samples": 1024,
    },
    presets={
        "official": OFFICIAL,
        "per-channel": {"weight.granularity": "per_channel"},
        "cpu-fast": {"recon.iters": 1000, "calib.num_samples": 512, "recon.act_lr": 1e-4},
    },
    source="Lee et al., 'FlexRound: Learnable Rounding based on Element-wise Division for Post-Training "
    "Quantization', ICML 2023 (code: onliwad101/FlexRound_LRQ)",
)


@hookimpl
def register_roundings(register) -> None:  # type: ignore[no-untyped-def]
    register(FlexRounding)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(FLEXROUND)
