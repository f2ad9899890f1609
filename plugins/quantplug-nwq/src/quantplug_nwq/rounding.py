"""Annealing-softmax rounding (ASoftmax) of NWQ (Wang et al., "Leveraging Inter-Layer Dependency for
Post-Training Quantization", NeurIPS 2022, Sec. "Annealing Softmax").

The paper writes the quantized weight as ``clip(floor(W / s) + h^t(V), q-, q+)`` with
``h^t(V) = softmax(V / tau^t)``: a softmax over candidate integer offsets whose temperature is annealed
toward zero, so the soft choice becomes a hard (one-hot) one. Here, per weight element:

* candidates ``c_k = clip(floor(W / s) + z + o_k, qmin, qmax) - z`` for the offsets ``o_k``; the default
  ``{0, 1}`` (floor, ceil) is the literal reading of ``floor(W / s) + h`` with ``h`` in [0, 1] (AdaRound's
  search space), ``{-1, 0, 1, 2}`` lets a weight move one more step either way;
* ``p = softmax(V / tau(t))`` over the K candidates, ``tau(t)`` decaying geometrically from ``tau_start``
  to ``tau_end`` after an optional warm-up (``temperature_at``), set by ``step(progress)`` before every
  iteration;
* soft weight ``s * sum_k p_k c_k`` (the expectation of the clipped candidates: equal to the paper's
  ``clip(floor + h)`` whenever every candidate lies on the grid; at the grid's edges it keeps the
  gradient that clipping the sum would zero);
* hard codes ``c_argmax(V) + z`` (the limit of the soft weight as ``tau -> 0``).

The paper's initialization is not known to us; ours: the logits are a discrete Gaussian over the
offsets, ``V_k = -tau_start (o_k - m)^2 / (2 init_spread)``, its centre ``m`` found per element so that
the expected candidate at ``tau_start`` equals

* ``init="fractional"``: ``W / s`` (clipped to the grid): the soft weight starts at the weight itself
  (AdaRound's convention), or
* ``init="nearest"``: ``round(W / s)`` (clipped): the soft weight starts at the nearest-rounded weight.

Finite logits cannot put all the mass on the lowest or highest candidate, so targets there are moved
``1e-4`` of the candidate range inside. Either way the initial hard codes (the mode) are the nearest
grid points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import from_rows, to_rows

__all__ = [
    "AnnealingSoftmaxRounder",
    "AnnealingSoftmaxRounding",
    "gaussian_logits",
    "gaussian_logits_with_mean",
    "temperature_at",
]

#: points of the table on which the initial centres are found (spacing about 0.003 grid steps)
_TABLE_POINTS = 8192
#: fraction of the candidate range kept from its ends (finite logits cannot put all mass on one end)
_EDGE = 1e-4


def temperature_at(progress: float, start: float, end: float, warmup: float = 0.0) -> float:
    """ASoftmax temperature at ``progress`` in [0, 1]: ``start`` during the warm-up, then a geometric
    decay reaching ``end`` at ``progress = 1`` (``start * (end / start) ** r``, ``r`` the progress after
    the warm-up, rescaled to [0, 1])."""
    if progress <= warmup:
        return start
    rel = min(1.0, (progress - warmup) / max(1.0 - warmup, 1e-12))
    return start * (end / start) ** rel


def gaussian_logits(centre: torch.Tensor, offsets: torch.Tensor, spread: float) -> torch.Tensor:
    """``-(o_k - centre)^2 / (2 spread)``: logits ``[..., K]`` of a discrete Gaussian over the offsets."""
    return -(offsets - centre[..., None]).square() / (2 * spread)


@torch.no_grad()
def gaussian_logits_with_mean(target: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor, qmin: int,
                              qmax: int, spread: float) -> torch.Tensor:
    """Logits ``[..., K]`` of a discrete Gaussian over ``offsets`` whose softmax gives the clipped candidate
    codes ``clip(base + o_k, qmin, qmax)`` the expectation ``target`` (codes, same shape as ``base``).

    The expectation is non-decreasing in the Gaussian's centre (the candidates are non-decreasing in the
    offset and the centre tilts the distribution toward larger offsets), so the centre is found by
    inverting a table of expectations, one per distinct ``base`` (at most ``2^bits + K`` of them), with
    linear interpolation. Targets are clamped ``1e-4`` of the candidate range inside it. The mode (the
    offset nearest the centre) gives the candidate nearest ``target`` up to ties.
    """
    lo_o, hi_o = float(offsets.min()), float(offsets.max())
    reach = spread * (abs(math.log(_EDGE)) + len(offsets) + 1) + (hi_o - lo_o)
    grid = torch.linspace(lo_o - reach, hi_o + reach, _TABLE_POINTS, dtype=torch.float64, device=target.device)
    probs = torch.softmax(gaussian_logits(grid, offsets.to(torch.float64), spread), dim=-1)  # [G, K]
    centre = torch.full_like(target, (lo_o + hi_o) / 2)
    for b in base.unique().tolist():
        sel = base == b
        values = torch.clamp(b + offsets.to(torch.float64), qmin, qmax)
        low, high = float(values.min()), float(values.max())
        if high == low:  # every candidate is the same code: any distribution will do
            continue
        table = probs @ values  # [G], non-decreasing
        t = target[sel].to(torch.float64).clamp(low + _EDGE * (high - low), high - _EDGE * (high - low))
        t = t.clamp(float(table[0]), float(table[-1]))
        idx = torch.searchsorted(table, t).clamp(1, _TABLE_POINTS - 1)
        t0, t1 = table[idx - 1], table[idx]
        frac = ((t - t0) / (t1 - t0).clamp(min=1e-300)).clamp(0.0, 1.0)
        centre[sel] = (grid[idx - 1] + frac * (grid[idx] - grid[idx - 1])).to(centre.dtype)
    return gaussian_logits(centre, offsets, spread)


class _SoftmaxExpectation(torch.autograd.Function):
    """``sum_k softmax(v / tau)_k c_k`` over dimension 0 with the analytic gradient
    ``d/dv_k = p_k (c_k - E) / tau``: one saved probability tensor instead of autograd's chain of temporaries."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, candidates: torch.Tensor, tau: float) -> torch.Tensor:  # type: ignore[override]
        p = v / tau
        p -= p.amax(0, keepdim=True)
        p.exp_()
        p /= p.sum(0, keepdim=True)
        expectation = (p * candidates).sum(0)
        ctx.save_for_backward(p, candidates, expectation)
        ctx.tau = tau
        return expectation

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        p, candidates, expectation = ctx.saved_tensors
        grad_v = candidates - expectation
        grad_v.mul_(p).mul_(grad / ctx.tau)
        return grad_v, None, None


class AnnealingSoftmaxRounder(WeightRounder):
    """Per-layer ASoftmax state: logits ``V`` of shape ``[K, rows, elements]`` (row layout of the weight)."""

    def __init__(self, layer: QuantLayer, config: AnnealingSoftmaxRounding.Config) -> None:
        super().__init__()
        self.layer = [layer]  # not a child module: the layer owns this rounder
        self.config = config
        spec, q = layer.weight_spec, layer.weight_quantizer
        assert spec is not None and q is not None
        scaled = to_rows(layer.weight.detach(), spec) / q.scale.detach()[:, None]
        floor = torch.floor(scaled)
        offsets = torch.tensor(config.offsets, dtype=scaled.dtype, device=scaled.device)
        zp = q.zero_point[:, None].to(scaled.dtype)
        codes = torch.clamp(floor[..., None] + offsets + zp[..., None], spec.qmin, spec.qmax)
        # [K, rows, elements]: grid steps relative to the zero point, one contiguous slice per candidate
        self.register_buffer("candidates", (codes - zp[..., None]).movedim(-1, 0).contiguous())
        target = torch.clamp(scaled + zp if config.init == "fractional" else torch.round(scaled) + zp,
                             spec.qmin, spec.qmax)
        logits = gaussian_logits_with_mean(target, floor + zp, offsets, spec.qmin, spec.qmax, config.init_spread)
        self.v = nn.Parameter((logits * config.tau_start).movedim(-1, 0).contiguous())
        self.tau = config.tau_start

    def step(self, progress: float) -> None:
        c = self.config
        self.tau = temperature_at(progress, c.tau_start, c.tau_end, c.warmup)

    def probabilities(self) -> torch.Tensor:
        """``softmax(V / tau)`` over the candidates, ``[K, rows, elements]``."""
        return torch.softmax(self.v / self.tau, dim=0)

    def soft_codes(self) -> torch.Tensor:
        """Expected grid step (relative to the zero point) of every weight, row layout.

        Two candidates take the exact shortcut ``c_0 + sigmoid((V_1 - V_0) / tau) (c_1 - c_0)``
        (a two-way softmax is a sigmoid of the logit difference), more use ``_SoftmaxExpectation``.
        """
        if self.v.shape[0] == 2:
            c0, c1 = self.candidates[0], self.candidates[1]
            return c0 + torch.sigmoid((self.v[1] - self.v[0]) / self.tau) * (c1 - c0)
        return _SoftmaxExpectation.apply(self.v, self.candidates, self.tau)

    def sharpness(self) -> float:
        """Mean over weights of the largest candidate probability (1.0: every choice is one-hot)."""
        with torch.no_grad():
            return float(self.probabilities().amax(0).mean())

    def forward(self) -> torch.Tensor:
        layer = self.layer[0]
        spec, q = layer.weight_spec, layer.weight_quantizer
        assert spec is not None and q is not None
        rows = self.soft_codes() * q.scale.detach()[:, None]
        return from_rows(rows, layer.weight.shape, spec)

    def hard_codes(self) -> torch.Tensor:
        layer = self.layer[0]
        spec, q = layer.weight_spec, layer.weight_quantizer
        assert spec is not None and q is not None
        choice = self.v.detach().argmax(0, keepdim=True)
        codes = self.candidates.gather(0, choice).squeeze(0) + q.zero_point[:, None]
        return from_rows(codes, layer.weight.shape, spec)


class AnnealingSoftmaxRounding(Rounding):
    """NWQ's annealing softmax (Wang et al., NeurIPS 2022): a softmax over candidate integer offsets of each
    weight, its temperature annealed geometrically toward a hard (argmax) choice."""

    name = "annealing-softmax"
    learnable = True

    @dataclass(frozen=True)
    class Config:
        offsets: tuple[int, ...] = (0, 1)  # candidate offsets around floor(W / s) (floor, ceil); must include 0 and 1
        tau_start: float = 1.0
        tau_end: float = 0.01
        warmup: float = 0.0  # fraction of the iterations at tau_start before the decay
        init: str = "fractional"  # fractional (soft weight = W) | nearest (soft weight = nearest-rounded W)
        init_spread: float = 0.5  # variance parameter of the initial discrete Gaussian over the offsets

    def __init__(self, config: AnnealingSoftmaxRounding.Config | None = None) -> None:
        super().__init__(config)
        c = self.config
        offsets = tuple(c.offsets)
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise ConfigError(f"annealing-softmax offsets must be integers, got {c.offsets!r}")
        if len(set(offsets)) != len(offsets) or not {0, 1} <= set(offsets):
            raise ConfigError(f"annealing-softmax offsets must be distinct and include 0 and 1 (floor and ceil), "
                              f"got {c.offsets!r}; e.g. [-1, 0, 1, 2] or [0, 1]")
        if not (0 < c.tau_end <= c.tau_start) or not math.isfinite(c.tau_start):
            raise ConfigError(f"annealing-softmax needs 0 < tau_end <= tau_start, got tau_start={c.tau_start}, "
                              f"tau_end={c.tau_end}")
        if not 0.0 <= c.warmup < 1.0:
            raise ConfigError(f"annealing-softmax warmup is a fraction of the iterations in [0, 1), got {c.warmup}")
        if c.init not in ("fractional", "nearest"):
            raise ConfigError(f"annealing-softmax init must be 'fractional' or 'nearest', got {c.init!r}")
        if not c.init_spread > 0:
            raise ConfigError(f"annealing-softmax init_spread must be positive, got {c.init_spread}")

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        assert isinstance(layer, QuantLayer)
        return AnnealingSoftmaxRounder(layer, self.config)
