"""What binary and ternary rounders share: codes around a zero point, an optional learned latent weight."""

from __future__ import annotations

import torch
from torch import nn

from quantplug.config import QuantSpec
from quantplug.interfaces import WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import from_rows
from quantplug_lowbit.grid import sign_zero_point

__all__ = ["SignCodeRounder"]


class SignCodeRounder(WeightRounder):
    """A layer's weight as codes in ``{-1, 0, +1}`` times a per-row scale; subclasses define ``current()``.

    With a latent weight ``V`` (stored in units of ``unit`` per row, so ``|V| ~ 1`` and one learning rate suits
    every layer) the codes and scales follow ``V``; without one they are fixed at attach time.
    """

    def __init__(self, layer: QuantLayer, spec: QuantSpec) -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children
        self.spec = spec
        self.zero_point = float(sign_zero_point(spec))
        self.latent: nn.Parameter | None = None

    def learn_latent(self, rows: torch.Tensor, unit: torch.Tensor) -> None:
        """Train a latent weight ``V = W / unit`` (per row of ``rows``, the full-precision weight) through the
        codes with the reconstruction loss."""
        self.register_buffer("unit", unit)
        self.latent = nn.Parameter(rows / unit[:, None])

    def _latent_rows(self) -> torch.Tensor:
        assert self.latent is not None
        return self.latent * self.unit[:, None]

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (``[rows, n]``) and scales (``[rows]``) the layer would be hardened to now."""
        raise NotImplementedError

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        codes, _ = self.current()
        return from_rows(codes + self.zero_point, self.layer[0].weight.shape, self.spec)

    @torch.no_grad()
    def final_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, scale = self.current()
        return scale.clone(), torch.full_like(scale, self.zero_point)
