"""Shared fixtures: isolated sessions (never load whatever happens to be installed) and a test-only
learnable rounding used to check that the engine lowers each unit's loss."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from quantplug.hookspecs import hookimpl
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.modules import QuantLayer
from quantplug.plugins import Session
from quantplug.quantizer import from_rows, to_rows
from quantplug.recipes import RecipeSpec

os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
torch.set_num_threads(1)


class SoftOffsetRounder(WeightRounder):
    """floor(w/s) + h(v), h a rectified sigmoid, v learned with a regularizer pushing h to 0 or 1 (AdaRound-like)."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.layer = [layer]
        spec, q = layer.weight_spec, layer.weight_quantizer
        rows = to_rows(layer.weight.detach(), spec) / q.scale[:, None]
        self.register_buffer("floor", torch.floor(rows))
        frac = rows - self.floor
        p = ((frac + 0.1) / 1.2).clamp(1e-4, 1 - 1e-4)  # h(v) = clamp(1.2 sigmoid(v) - 0.1, 0, 1) = frac
        self.v = nn.Parameter(torch.log(p / (1 - p)))

    def h(self) -> torch.Tensor:
        return torch.clamp(1.2 * torch.sigmoid(self.v) - 0.1, 0, 1)

    def _codes(self, soft: torch.Tensor) -> torch.Tensor:
        layer = self.layer[0]
        spec, q = layer.weight_spec, layer.weight_quantizer
        return torch.clamp(self.floor + soft + q.zero_point[:, None], spec.qmin, spec.qmax)

    def forward(self) -> torch.Tensor:
        layer = self.layer[0]
        spec, q = layer.weight_spec, layer.weight_quantizer
        rows = (self._codes(self.h()) - q.zero_point[:, None]) * q.scale[:, None]
        return from_rows(rows, layer.weight.shape, spec)

    def regularization(self, progress: float) -> torch.Tensor | None:
        if progress < 0.2:
            return None
        beta = 20 - 18 * (progress - 0.2) / 0.8
        return 0.01 * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def hard_codes(self) -> torch.Tensor:
        layer = self.layer[0]
        codes = self._codes((self.h().detach() >= 0.5).float())
        return from_rows(codes, layer.weight.shape, layer.weight_spec)


class SoftOffsetRounding(Rounding):
    """Test-only learnable rounding (a sigmoid offset per weight)."""

    name = "soft-offset"
    learnable = True

    def attach(self, layer, *, generator=None):  # type: ignore[no-untyped-def]
        return SoftOffsetRounder(layer)


class TestPlugin:
    @hookimpl
    def register_roundings(self, register):  # type: ignore[no-untyped-def]
        register(SoftOffsetRounding)

    @hookimpl
    def register_recipes(self, register):  # type: ignore[no-untyped-def]
        register(RecipeSpec(name="soft-offset", extends="nearest",
                            overrides={"rounding.name": "soft-offset", "recon.iters": 300, "recon.lr": 3e-2}))


@pytest.fixture
def session() -> Session:
    return Session(entry_points=False, plugins=[TestPlugin()])


@pytest.fixture
def fast() -> dict:
    return {"calib.num_samples": 128, "calib.batch_size": 64}
