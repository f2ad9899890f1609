"""SignRound: sign-magnitude rounding for quantplug (the tutorial plugin of docs/plugin-tutorial.md).

A weight w with step s and zero point z lands on the grid code
``z + sign(w / s) * floor(|w / s| + 1 - threshold)``: the magnitude is rounded up only when its
fractional part reaches ``threshold``. The default, 1.0, rounds toward zero (truncation, what a C
integer cast does: every weight shrinks, the textbook biased rounding); 0.5 rounds half away from zero,
which is round-to-nearest. Background: Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020, section 2: the rounding rule alone moves a quantized network's accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantplug import hookimpl
from quantplug.errors import ConfigError
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.quantizer import from_rows, to_rows
from quantplug.recipes import RecipeSpec


class SignRounder(WeightRounder):
    def __init__(self, layer: nn.Module, threshold: float) -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children
        spec, q = layer.weight_spec, layer.weight_quantizer
        x = to_rows(layer.weight.detach(), spec) / q.scale.detach()[:, None]
        codes = torch.sign(x) * torch.floor(x.abs() + 1.0 - threshold) + q.zero_point[:, None]
        self.register_buffer("codes", from_rows(codes.clamp(spec.qmin, spec.qmax), layer.weight.shape, spec))

    def forward(self) -> torch.Tensor:  # the fake-quantized weight
        return self.layer[0].dequantize_codes(self.codes)

    def hard_codes(self) -> torch.Tensor:  # the integers stored when the unit is hardened
        return self.codes


class SignRound(Rounding):
    """Sign-magnitude rounding: |w / s| rounded up from ``threshold`` on (1.0: toward zero, 0.5: nearest)."""

    name = "signround"

    @dataclass(frozen=True)
    class Config:
        threshold: float = 1.0

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        if not 0.0 < self.config.threshold <= 1.0:
            raise ConfigError(f"signround threshold must be in (0, 1], got {self.config.threshold}")
        return SignRounder(layer, self.config.threshold)


SIGNROUND = RecipeSpec(
    name="signround", extends="nearest", overrides={"rounding.name": "signround"},
    presets={"half-away": {"rounding.options.threshold": 0.5}},
    description="Round-to-nearest PTQ with sign-magnitude rounding (toward zero by default)",
)


@hookimpl
def register_roundings(register) -> None:  # type: ignore[no-untyped-def]
    register(SignRound)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(SIGNROUND)
