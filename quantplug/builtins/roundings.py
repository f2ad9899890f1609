"""Built-in roundings: nearest and stochastic."""

from __future__ import annotations

import torch
from torch import nn

from quantplug.hookspecs import hookimpl
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import from_rows, to_rows


class NearestRounder(WeightRounder):
    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children

    def forward(self) -> torch.Tensor:
        layer = self.layer[0]
        return layer.dequantize_codes(self.hard_codes())

    def hard_codes(self) -> torch.Tensor:
        return self.layer[0].nearest_codes()


class NearestRounding(Rounding):
    """Round to the nearest grid point (the baseline every PTQ paper starts from)."""

    name = "nearest"

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        assert isinstance(layer, QuantLayer)
        return NearestRounder(layer)


class StochasticRounder(WeightRounder):
    def __init__(self, layer: QuantLayer, generator: torch.Generator | None) -> None:
        super().__init__()
        self.layer = [layer]
        spec = layer.weight_spec
        q = layer.weight_quantizer
        assert spec is not None and q is not None
        rows = to_rows(layer.weight.detach(), spec) / q.scale[:, None]
        floor = torch.floor(rows)
        frac = rows - floor
        noise = torch.rand(frac.shape, generator=generator, dtype=frac.dtype).to(frac.device)
        codes = torch.clamp(floor + (noise < frac).to(frac.dtype) + q.zero_point[:, None], spec.qmin, spec.qmax)
        self.register_buffer("codes", from_rows(codes, layer.weight.shape, spec))

    def forward(self) -> torch.Tensor:
        return self.layer[0].dequantize_codes(self.codes)

    def hard_codes(self) -> torch.Tensor:
        return self.codes


class StochasticRounding(Rounding):
    """Round up with probability equal to the fractional part (Gupta et al., ICML 2015); unbiased, seeded."""

    name = "stochastic"

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        assert isinstance(layer, QuantLayer)
        return StochasticRounder(layer, generator)


@hookimpl
def register_roundings(register) -> None:  # type: ignore[no-untyped-def]
    register(NearestRounding)
    register(StochasticRounding)
