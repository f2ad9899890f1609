"""Ternary weights: TWN (Li, Zhang & Liu, "Ternary Weight Networks", arXiv 1605.04711, 2016).

Per quantization row (the paper and its released code ``fengfu-chris/caffe-twns`` use one per layer)::

    Delta = 0.7 * mean |W|                                   (the paper's approximate optimal threshold)
    T_i   = sign(W_i) if |W_i| > Delta else 0
    a     = sum_{|W_i| > Delta} |W_i| / |{i : |W_i| > Delta}|   (the mean |W| of the kept weights)
    W    ~ a * T

The released code computes ``Delta = 0.7 * asum(W) / count(W)`` (``Blob::set_delta``, ``TERNARY_DELTA = 7``) and
``a = <T, W> / <T, T>`` (``Blob::ternarize_data``), which is the same mean over the kept weights.

With ``learn_latent`` the rounding trains a latent copy ``V`` of the weights with the reconstruction loss (TWN's
training rule, applied block by block): ``Delta`` and ``a`` are recomputed from ``V`` at every step, the gradient
reaches ``V`` straight through the threshold (and through ``a``).

Only layers whose weight grid has ``bits`` bits (the recipes' ``weight.bits``, 2) are ternarized; a layer the bit
policy gives another width (e.g. ``bits.first_layer_bits=8``) is rounded to nearest on its own grid at that width.
A threshold that keeps no weight of a quantization row (``threshold_factor`` >= the row's ``max |W| / mean |W|``)
zeroes that row: this is allowed (a factor has no upper bound that suits every layer) but logged as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantplug.builtins.roundings import NearestRounder
from quantplug.errors import ConfigError
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import from_rows
from quantplug_lowbit.grid import MIN_CODE_BITS, at_low_bit_width, check_low_bits, layer_rows, safe_scale
from quantplug_lowbit.rounder import SignCodeRounder
from quantplug_lowbit.ste import ternary_ste

__all__ = ["TWN_THRESHOLD_FACTOR", "TernaryRounder", "TernaryRounding", "twn_codes", "twn_scale", "twn_threshold"]

#: the paper's threshold factor and the released code's ``TERNARY_DELTA = 7`` (tenths)
TWN_THRESHOLD_FACTOR = 0.7


def twn_threshold(rows: torch.Tensor, factor: float = TWN_THRESHOLD_FACTOR) -> torch.Tensor:
    """``Delta = factor * mean |W|`` per row (``[rows]``)."""
    return factor * rows.abs().mean(dim=1)


def twn_codes(rows: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Ternary codes: ``sign(W)`` where ``|W| > Delta`` (strictly), else 0."""
    return (torch.sign(rows) * (rows.abs() > threshold[:, None])).to(rows.dtype)


def twn_scale(rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``a = <T, W> / <T, T>``: the mean |W| of the kept weights per row (0 where no weight is kept)."""
    kept = codes.abs().sum(dim=1)
    return (codes * rows).sum(dim=1) / kept.clamp_min(1.0)


class TernaryRounder(SignCodeRounder):
    """Per-layer ternary state: fixed codes and scales, or a learned latent weight ``V`` (``learn_latent``)."""

    def __init__(self, layer: QuantLayer, config: TernaryRounding.Config) -> None:
        rows, spec = layer_rows(layer, "ternary rounding")
        super().__init__(layer, spec)
        self.factor = config.threshold_factor
        codes = twn_codes(rows, twn_threshold(rows, self.factor))
        self.register_buffer("codes", codes)
        self.register_buffer("scale", safe_scale(twn_scale(rows, codes)))
        if config.learn_latent:
            self.learn_latent(rows, safe_scale(rows.abs().mean(dim=1)))  # |V| ~ 1 in these units

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (``[rows, n]`` in {-1, 0, 1}) and scales (``[rows]``) the layer would be hardened to now."""
        if self.latent is None:
            return self.codes, self.scale
        v = self._latent_rows().detach()
        codes = twn_codes(v, twn_threshold(v, self.factor))
        return codes, safe_scale(twn_scale(v, codes))

    def forward(self) -> torch.Tensor:
        weight = self.layer[0].weight
        if self.latent is None:
            rows = self.codes * self.scale[:, None]
        else:
            v = self._latent_rows()
            codes = ternary_ste(v, twn_threshold(v.detach(), self.factor)[:, None])
            rows = codes * twn_scale(v, codes.detach())[:, None]
        return from_rows(rows, weight.shape, self.spec)


class TernaryRounding(Rounding):
    """Ternary weights a * T, Delta = 0.7 mean |W|, a = mean |W| over |W| > Delta (TWN, Li et al. 2016)."""

    name = "ternary"

    @dataclass(frozen=True)
    class Config:
        threshold_factor: float = TWN_THRESHOLD_FACTOR  # Delta = factor * mean |W| (paper: 0.7)
        learn_latent: bool = False  # train a latent weight through the threshold with the reconstruction loss
        #: the weight width of the layers to ternarize (the recipe's weight.bits); other widths: nearest rounding
        bits: int = MIN_CODE_BITS

        def __post_init__(self) -> None:
            if not 0.0 <= self.threshold_factor:
                raise ConfigError(f"threshold_factor must be >= 0, got {self.threshold_factor}")
            check_low_bits(self.bits, "ternary")

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        if not at_low_bit_width(layer, self.config.bits, "ternary rounding"):  # type: ignore[arg-type]
            return NearestRounder(layer)  # type: ignore[arg-type]
        return TernaryRounder(layer, self.config)  # type: ignore[arg-type]
