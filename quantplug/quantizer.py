"""Affine (uniform) quantization: grids, scales and zero points, fake quantization with STE.

A tensor is quantized in *rows*: one row per quantization group. ``to_rows`` / ``from_rows`` convert
between a tensor and its ``[rows, elements]`` view for a granularity:

* per-tensor: ``[1, numel]``
* per-channel (axis a): ``[size(a), numel / size(a)]``
* per-group (size g): the tensor is flattened to ``[out, in * k]`` (output rows, input elements) and
  each row cut into runs of ``g`` consecutive input elements: ``[out * in * k / g, g]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantplug.config import PerChannel, PerGroup, PerTensor, QuantSpec
from quantplug.errors import ConfigError

EPS = 1e-8


# --------------------------------------------------------------------------- layout
def to_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    g = spec.granularity
    if isinstance(g, PerTensor):
        return x.reshape(1, -1)
    if isinstance(g, PerChannel):
        axis = g.axis % x.dim()
        if axis == 0:
            return x.reshape(x.shape[0], -1)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if isinstance(g, PerGroup):
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] % g.group_size:
            raise ConfigError(
                f"per-group quantization with group_size={g.group_size} needs the input size "
                f"({flat.shape[1]}) to be a multiple of it; choose a divisor or use per-channel"
            )
        return flat.reshape(-1, g.group_size)
    raise ConfigError(f"unknown granularity {g!r}")


def from_rows(rows: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    g = spec.granularity
    if isinstance(g, PerChannel):
        axis = g.axis % len(shape)
        if axis != 0:
            moved = list(shape)
            moved.insert(0, moved.pop(axis))
            return rows.reshape(moved).movedim(0, axis)
    return rows.reshape(shape)


def param_shape(x_shape: torch.Size, spec: QuantSpec) -> tuple[int, ...]:
    """Broadcastable shape of scale / zero point against the original tensor (per-tensor and per-channel)."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return (1,) * len(x_shape)
    if isinstance(g, PerChannel):
        axis = g.axis % len(x_shape)
        return tuple(s if i == axis else 1 for i, s in enumerate(x_shape))
    raise ConfigError("per-group parameters do not broadcast; use to_rows")


# --------------------------------------------------------------------------- maths
def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[min_val, max_val]`` (the range is first extended to include 0)."""
    qmin, qmax = spec.qmin, spec.qmax
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / ((qmax - qmin) / 2), min=EPS)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return _RoundSTE.apply(x)


class _ClampCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward((codes >= qmin) & (codes <= qmax))
        return codes.clamp(qmin, qmax)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def clamp_codes(codes: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(codes, qmin, qmax)`` whose gradient passes for every code in ``[qmin, qmax]``, bounds included.

    This is the subgradient ``torch.clamp`` had from 2018 (pytorch/pytorch#7049) until 2026, which the released
    code of AdaRound, BRECQ, QDrop and FlexRound ran on (``clamp(round_ste(x / s) + z, qmin, qmax)``); current
    torch passes no gradient at the bounds, so a value whose rounded code is the grid's first or last level would
    get none although it is not clipped (about a third of the weights of a 2-bit grid)."""
    return _ClampCodes.apply(codes, qmin, qmax)


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``factor`` (LSQ)."""
    return (x - x * factor).detach() + x * factor


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as floats): ``clamp(round(x / s) + z, qmin, qmax)``."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (codes - zero_point) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through round.

    Gradients reach ``x`` (where its rounded code is on the grid, edges included: ``clamp_codes``) and ``scale``
    (LSQ: ``round(x / s) - x / s`` there, the clipped level elsewhere).
    """
    codes = clamp_codes(round_ste(x / scale) + zero_point, qmin, qmax)
    return (codes - zero_point) * scale


class _FakeQuantSelect(torch.autograd.Function):
    """Fake quantization with a straight-through round and LSQ step gradient, optionally choosing per element
    between the quantized value and ``keep`` (QDrop), in one autograd node.

    Equivalent to ``where(select, fake_quant(x, s, z), keep)`` with ``fake_quant``'s gradients, but it saves
    three tensors and computes both gradients from them in a few fused passes instead of the dozen
    elementwise nodes autograd records for the composed expression.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                select: torch.Tensor | None, keep: torch.Tensor | None, grad_factor: float) -> torch.Tensor:
        v = x / scale
        codes = torch.round(v).add_(zero_point)
        # a code on the grid's edge is inside (not clipped), as in ``clamp_codes``
        inside = (codes >= qmin) & (codes <= qmax)
        centered = codes.clamp_(qmin, qmax).sub_(zero_point)  # clamp(round(v) + z) - z
        out = centered * scale
        if select is not None:
            out = torch.where(select, out, x if keep is None else keep)
        ctx.save_for_backward(v, centered, inside, select, scale)
        ctx.keep_is_x = keep is None
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        v, centered, inside, select, scale = ctx.saved_tensors
        quantized = inside if select is None else inside & select
        grad_x = grad_scale_t = grad_keep = None
        if ctx.needs_input_grad[0]:
            if select is None or not ctx.keep_is_x:
                grad_x = grad * quantized
            else:  # dropped elements pass x through unchanged
                grad_x = grad * (quantized | ~select)
        if ctx.needs_input_grad[1]:
            # d(out)/ds = (clamp(round(v) + z) - z) - v inside the grid, the clamped level outside (LSQ)
            d = torch.where(inside, centered - v, centered)
            if select is not None:
                d = d * select
            grad_scale_t = (grad * d).sum_to_size(scale.shape) * ctx.grad_factor
        if select is not None and not ctx.keep_is_x and ctx.needs_input_grad[6]:
            grad_keep = grad * ~select
        return grad_x, grad_scale_t, None, None, None, None, grad_keep, None


def fake_quant_select(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      select: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                      grad_factor: float = 1.0) -> torch.Tensor:
    """``where(select, fake_quant(x), keep if given else x)`` as one autograd node (see ``_FakeQuantSelect``).

    ``scale`` / ``zero_point`` broadcast against ``x``; ``grad_factor`` multiplies the step gradient (LSQ).
    """
    return _FakeQuantSelect.apply(x, scale, zero_point, qmin, qmax, select, keep, grad_factor)


def fake_quant_rows(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize ``x`` with row parameters ``scale`` / ``zero_point`` of shape ``[rows]``."""
    if isinstance(spec.granularity, PerTensor):
        return fake_quant(x, scale.reshape(()), zero_point.reshape(()), spec.qmin, spec.qmax)
    if isinstance(spec.granularity, PerChannel):
        shape = param_shape(x.shape, spec)
        return fake_quant(x, scale.reshape(shape), zero_point.reshape(shape), spec.qmin, spec.qmax)
    rows = to_rows(x, spec)
    out = fake_quant(rows, scale[:, None], zero_point[:, None], spec.qmin, spec.qmax)
    return from_rows(out, x.shape, spec)


def broadcast_rows(values: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Expand a ``[rows]`` parameter to ``x``'s shape (any granularity)."""
    rows = to_rows(x, spec)
    return from_rows(values[:, None].expand_as(rows), x.shape, spec)


# --------------------------------------------------------------------------- module
Mixer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``selector(x) -> (select, keep)``: quantize where ``select`` is True, else take ``keep`` (None: ``x``)
Selector = Callable[[torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]


class AffineQuantizer(nn.Module):
    """Fake-quantizes a tensor with a scale and zero point per row (see module docstring).

    Until ``set_qparams`` is called, or while ``enabled`` is False, it passes its input through.
    ``make_step_learnable`` turns the scale into a parameter learned with the straight-through
    estimator (LSQ, Esser et al. 2020); ``lsq_grad_scale`` applies LSQ's ``1/sqrt(N * qmax)`` factor.
    An activation policy may set ``mixer(x, x_q)`` to choose per element between the two, or (faster: one
    fused autograd node) ``selector(x) -> (select, keep)`` for an element-wise choice between ``x_q`` and
    ``keep``.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.lsq_grad_scale = False
        self.mixer: Mixer | None = None
        self.selector: Selector | None = None

    def extra_repr(self) -> str:
        g = self.spec.granularity.kind
        sym = "sym" if self.spec.symmetric else "asym"
        return f"bits={self.spec.bits}, {sym}, {g}"

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        scale = scale.detach().reshape(-1).float()
        zero_point = zero_point.detach().reshape(-1).float()
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError("quantizer scale must be finite and positive")
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.data = scale.to(self.scale.device)
        else:
            self.scale = scale.to(self.scale.device)
        self.zero_point = zero_point.to(self.zero_point.device)
        self.initialized = torch.tensor(True, device=self.initialized.device)

    def make_step_learnable(self) -> nn.Parameter:
        if not isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(value)
        return self.scale

    def freeze_step(self) -> None:
        if isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.register_buffer("scale", value)

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.initialized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        scale = self.scale
        factor = 1.0
        if self.lsq_grad_scale and isinstance(scale, nn.Parameter):
            # LSQ's g = 1 / sqrt(N * Q_P) with N counted over the whole batch per step, as QDrop's released code
            # (MQBench's LearnableFakeQuantize: X.numel()) does; the QAT plugin counts per sample (LSQ's N_F)
            n = x.numel() / max(scale.numel(), 1)
            factor = 1.0 / math.sqrt(n * self.spec.qmax)
        if self.mixer is None and not isinstance(self.spec.granularity, PerGroup):
            shape = param_shape(x.shape, self.spec) if isinstance(self.spec.granularity, PerChannel) else ()
            select, keep = self.selector(x) if self.selector is not None else (None, None)
            return fake_quant_select(x, scale.reshape(shape), self.zero_point.reshape(shape), self.spec.qmin,
                                     self.spec.qmax, select, keep, factor)
        if factor != 1.0:
            scale = grad_scale(scale, factor)
        xq = fake_quant_rows(x, scale, self.zero_point, self.spec)
        if self.mixer is not None:
            return self.mixer(x, xq)
        return xq

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # scale / zero point change shape after calibration: resize before copying
        for key in ("scale", "zero_point"):
            full = prefix + key
            if full in state_dict:
                current = getattr(self, key)
                if current.shape != state_dict[full].shape:
                    new = torch.empty_like(state_dict[full], device=current.device)
                    if isinstance(current, nn.Parameter):
                        current.data = new
                    else:
                        setattr(self, key, new)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
