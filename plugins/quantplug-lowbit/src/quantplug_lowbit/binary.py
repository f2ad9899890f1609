"""Binary weights: BWN (Rastegari et al., XNOR-Net, ECCV 2016) and BinaryConnect (Courbariaux et al., NeurIPS 2015).

Per quantization row (an output channel for per-channel grids, the whole tensor for per-tensor ones)::

    B = sign(W)  (sign(0) = +1),   a = mean |W| = ||W||_1 / n,   W ~ a * B

``a = ||W||_1 / n`` minimizes ``||W - a B||^2`` for ``B = sign(W)`` (XNOR-Net, sec. 3.1; released code
``allenai/XNOR-Net``, ``util.lua`` ``binarizeConvParms``: the L1 norm of each filter divided by its size).

Stochastic binarization (BinaryConnect, sec. 2.2): ``B = +1`` with probability ``hard_sigmoid(W / a) =
clip((W / a + 1) / 2, 0, 1)``, else ``-1``. BinaryConnect's released code (``binary_connect.py``) binarizes
to ``+-H`` with ``p = hard_sigmoid(W / H)``, ``H`` a per-layer constant bounding the (clipped) weights; quantplug
uses the same rule with ``H = a``, so that ``E[a B] = clip(W, -a, a)``. One draw from the unit's seeded
generator gives the deployed weights (the released code evaluates stochastic networks with their
real-valued weights, which a binary deployment cannot do).

With ``learn_latent`` the rounding trains a latent copy of the weights with the reconstruction loss (the
BinaryConnect / BWN training rule, applied block by block): the forward pass uses ``a(V) sign(V)`` with
``a(V) = mean |V|`` recomputed every step, the gradient reaches ``V`` straight through the sign (and through
``a``, as in XNOR-Net's gradient); at the end the codes are ``sign(V)`` and the scale ``a(V)``.

Only layers whose weight grid has ``bits`` bits (the recipes' ``weight.bits``, 2) are binarized; a layer the bit
policy gives another width (e.g. ``bits.first_layer_bits=8``) is rounded to nearest on its own grid at that width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantplug.builtins.roundings import NearestRounder
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import from_rows
from quantplug_lowbit.grid import MIN_CODE_BITS, at_low_bit_width, check_low_bits, layer_rows, safe_scale
from quantplug_lowbit.rounder import SignCodeRounder
from quantplug_lowbit.ste import sign_ste

__all__ = ["BinaryRounder", "BinaryRounding", "binary_scale", "binary_signs", "stochastic_binary_signs"]


def binary_scale(rows: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's optimal scale per row: ``mean |W|`` (``[rows]``)."""
    return rows.abs().mean(dim=1)


def binary_signs(rows: torch.Tensor) -> torch.Tensor:
    """Deterministic binarization: ``+1`` where ``W >= 0``, else ``-1`` (BinaryConnect's deterministic rule)."""
    return torch.where(rows >= 0, 1.0, -1.0).to(rows.dtype)


def stochastic_binary_signs(rows: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """BinaryConnect's stochastic rule in units of ``scale``: ``+1`` with probability ``clip((W/a + 1)/2, 0, 1)``."""
    prob = ((rows / safe_scale(scale)[:, None] + 1.0) / 2.0).clamp(0.0, 1.0)
    draw = torch.rand(rows.shape, generator=generator, dtype=rows.dtype).to(rows.device)
    return torch.where(draw < prob, 1.0, -1.0).to(rows.dtype)


class BinaryRounder(SignCodeRounder):
    """Per-layer binary state: fixed signs and scales, or a learned latent weight ``V`` (``learn_latent``)."""

    def __init__(self, layer: QuantLayer, config: BinaryRounding.Config, generator: torch.Generator | None) -> None:
        rows, spec = layer_rows(layer, "binary rounding")
        super().__init__(layer, spec)
        scale = binary_scale(rows)
        signs = stochastic_binary_signs(rows, scale, generator) if config.stochastic else binary_signs(rows)
        self.register_buffer("scale", safe_scale(scale))
        self.register_buffer("signs", signs)
        if config.learn_latent:
            self.learn_latent(rows, self.scale.clone())

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Signs (``[rows, n]``) and scales (``[rows]``) the layer would be hardened to now."""
        if self.latent is None:
            return self.signs, self.scale
        v = self._latent_rows().detach()
        return binary_signs(v), safe_scale(binary_scale(v))

    def forward(self) -> torch.Tensor:
        weight = self.layer[0].weight
        if self.latent is None:
            rows = self.signs * self.scale[:, None]
        else:
            v = self._latent_rows()
            rows = sign_ste(v) * binary_scale(v)[:, None]
        return from_rows(rows, weight.shape, self.spec)


class BinaryRounding(Rounding):
    """Binary weights a * sign(W), a = mean |W| per row (BWN, XNOR-Net 2016); stochastic signs (BinaryConnect 2015)."""

    name = "binary"

    @dataclass(frozen=True)
    class Config:
        stochastic: bool = False  # BinaryConnect's stochastic binarization instead of the sign
        learn_latent: bool = False  # train a latent weight through the sign with the reconstruction loss
        #: the weight width of the layers to binarize (the recipe's weight.bits); other widths: nearest rounding
        bits: int = MIN_CODE_BITS

        def __post_init__(self) -> None:
            check_low_bits(self.bits, "binary")

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        if not at_low_bit_width(layer, self.config.bits, "binary rounding"):  # type: ignore[arg-type]
            return NearestRounder(layer)  # type: ignore[arg-type]
        return BinaryRounder(layer, self.config, generator)  # type: ignore[arg-type]
