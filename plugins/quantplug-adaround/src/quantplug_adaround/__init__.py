"""AdaRound: "Up or Down? Adaptive Rounding for Post-Training Quantization" (Nagel et al., ICML 2020).

W~ = s * clip(floor(W / s) + h(V) + z, qmin, qmax) - z), with the rectified sigmoid
h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1. V starts where
h(V) equals the fractional part of W / s (so the soft weight starts at W inside the grid). The
regularizer lambda * sum(1 - |2 h(V) - 1|^beta) is off for the first 20% of iterations, then beta
decays linearly from 20 to 2 (the official code's LinearTempDecay). Hard rounding: up where V >= 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from quantplug import hookimpl
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import from_rows, to_rows
from quantplug.recipes import RecipeSpec

__all__ = ["AdaRoundRounding", "AdaRounder", "ADAROUND", "beta_schedule", "rectified_sigmoid"]


def rectified_sigmoid(v: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def beta_schedule(progress: float, start: float, end: float, warmup: float) -> float | None:
    """The regularizer's exponent at ``progress`` in [0, 1]; None during the warm-up (no regularizer)."""
    if progress < warmup:
        return None
    rel = (progress - warmup) / max(1.0 - warmup, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - rel)


class AdaRounder(WeightRounder):
    """The per-layer AdaRound state: one learnable V per weight."""

    def __init__(self, layer: QuantLayer, config: AdaRoundRounding.Config) -> None:
        super().__init__()
        self.layer = [layer]  # not a child module: the layer owns this rounder
        self.config = config
        spec, q = layer.weight_spec, layer.weight_quantizer
        assert spec is not None and q is not None
        rows = to_rows(layer.weight.detach(), spec) / q.scale.detach()[:, None]
        floor = torch.floor(rows)
        self.register_buffer("floor", floor)
        rest = (rows - floor).clamp(0.0, 1.0)
        z, g = config.zeta, config.gamma
        # solve h(V) = rest for V: sigmoid(V) = (rest - gamma) / (zeta - gamma)
        p = ((rest - g) / (z - g)).clamp(1e-6, 1 - 1e-6)
        self.v = nn.Parameter(torch.log(p) - torch.log1p(-p))

    def soft(self) -> torch.Tensor:
        return rectified_sigmoid(self.v, self.config.zeta, self.config.gamma)

    def _dequant(self, offset: torch.Tensor) -> torch.Tensor:
        layer = self.layer[0]
        spec, q = layer.weight_spec, layer.weight_quantizer
        zp = q.zero_point[:, None]
        codes = torch.clamp(self.floor + offset + zp, spec.qmin, spec.qmax)
        return from_rows((codes - zp) * q.scale.detach()[:, None], layer.weight.shape, spec)

    def forward(self) -> torch.Tensor:
        return self._dequant(self.soft())

    def regularization(self, progress: float) -> torch.Tensor | None:
        c = self.config
        beta = beta_schedule(progress, c.beta_start, c.beta_end, c.warmup)
        if beta is None or c.reg_weight == 0:
            return None
        return c.reg_weight * (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    def hard_codes(self) -> torch.Tensor:
        layer = self.layer[0]
        spec, q = layer.weight_spec, layer.weight_quantizer
        codes = torch.clamp(self.floor + (self.v.detach() >= 0).to(self.floor.dtype) + q.zero_point[:, None],
                            spec.qmin, spec.qmax)
        return from_rows(codes, layer.weight.shape, spec)


class AdaRoundRounding(Rounding):
    """AdaRound (Nagel et al., ICML 2020): learned up/down rounding, rectified sigmoid, annealed regularizer."""

    name = "adaround"
    learnable = True

    @dataclass(frozen=True)
    class Config:
        zeta: float = 1.1
        gamma: float = -0.1
        reg_weight: float = 0.01  # lambda; 0.1 for MobileNetV2 in BRECQ / QDrop
        beta_start: float = 20.0
        beta_end: float = 2.0
        warmup: float = 0.2

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        assert isinstance(layer, QuantLayer)
        if not math.isfinite(self.config.reg_weight) or self.config.reg_weight < 0:
            from quantplug.errors import ConfigError

            raise ConfigError("adaround reg_weight must be a non-negative number")
        return AdaRounder(layer, self.config)


OFFICIAL = {"recon.iters": 20000, "recon.batch_size": 32, "calib.num_samples": 1024}

ADAROUND = RecipeSpec(
    name="adaround",
    extends="nearest",
    description="AdaRound: learned rounding, layer by layer, inputs from the model quantized so far",
    overrides={
        "rounding.name": "adaround",
        "scheduler.name": "layer",
        "loss.name": "mse",
        "activation_policy.name": "quantized",
        "recon.lr": 1e-3,
        **OFFICIAL,
    },
    presets={
        "official": OFFICIAL,
        "official-mobilenetv2": {**OFFICIAL, "rounding.options.reg_weight": 0.1},
        "cpu-fast": {"recon.iters": 2000, "calib.num_samples": 512},
    },
    source="Nagel et al., 'Up or Down? Adaptive Rounding for Post-Training Quantization', ICML 2020",
)


@hookimpl
def register_roundings(register) -> None:  # type: ignore[no-untyped-def]
    register(AdaRoundRounding)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(ADAROUND)
