"""Quantized layers and module swapping.

``QuantConv2d`` / ``QuantLinear`` keep the full-precision weight, a weight quantizer (scale and zero
point), an optional input-activation quantizer, and one of four weight paths:

* a ``WeightRounder`` attached by a rounding component (during reconstruction),
* lookup-table weights, ``weight = codebook[indices]`` (k-means weight sharing, Han et al. 2016; TTQ's
  ``{-W_n, 0, +W_p}``, Zhu et al. 2017): values that no affine grid holds, saved and reloaded like codes,
* hard integer codes (after hardening: the deployable state, saved and reloaded),
* plain nearest rounding (before reconstruction).

Activations are quantized at layer *inputs*: the first layer's input is the (8-bit) image, the
network output is never quantized. Where one activation feeds two layers (a residual block's input
feeding ``conv1`` and the downsample), each layer quantizes it with its own parameters.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from quantplug.config import QuantSpec
from quantplug.errors import ConfigError, QuantplugError
from quantplug.interfaces import WeightRounder
from quantplug.quantizer import AffineQuantizer, dequantize, fake_quant_rows, from_rows, quantize, to_rows


class QuantLayer(nn.Module):
    """Shared behaviour of quantized Conv2d / Linear layers."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quant(self, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        self.weight_spec = weight_spec
        self.weight_quantizer = AffineQuantizer(weight_spec) if weight_spec is not None else None
        self.input_quantizer = AffineQuantizer(input_spec) if input_spec is not None else None
        self.rounder: WeightRounder | None = None
        self.register_buffer("weight_codes", None)
        self.register_buffer("weight_codebook", None)
        self.register_buffer("weight_indices", None)
        self._dequant_cache: torch.Tensor | None = None

    # -------------------------------------------------------------- weight paths
    @property
    def quantizes_weight(self) -> bool:
        return self.weight_quantizer is not None and self.weight_quantizer.active

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantizes_weight:
            return self.weight
        if self.rounder is not None:
            return self.rounder()
        if self.weight_indices is not None:
            if self._dequant_cache is None or self._dequant_cache.device != self.weight_indices.device:
                self._dequant_cache = self.codebook_weight()
            return self._dequant_cache
        if self.weight_codes is not None:
            if self._dequant_cache is None or self._dequant_cache.device != self.weight_codes.device:
                self._dequant_cache = self.dequantize_codes(self.weight_codes)
            return self._dequant_cache
        q = self.weight_quantizer
        assert q is not None and self.weight_spec is not None
        return fake_quant_rows(self.weight, q.scale, q.zero_point, self.weight_spec)

    @property
    def has_codebook(self) -> bool:
        """True when the weights are lookup-table values (``set_codebook``), not affine codes."""
        return self.weight_indices is not None

    def codebook_weight(self) -> torch.Tensor:
        """``codebook[indices]`` in the weight's dtype and shape."""
        if self.weight_codebook is None or self.weight_indices is None:
            raise QuantplugError("this layer has no codebook; call set_codebook first")
        return self.weight_codebook[self.weight_indices.long()].to(self.weight.dtype)

    def set_codebook(self, codebook: torch.Tensor, indices: torch.Tensor) -> None:
        """Harden to lookup-table weights: ``weight = codebook[indices]``; the forward pass uses them from now on.

        ``codebook`` holds at most 256 floats (one table per layer), ``indices`` has the weight's shape and
        integer values in ``[0, len(codebook))``; they are stored as buffers ``weight_codebook`` (fp32) and
        ``weight_indices`` (uint8), replacing any affine codes.
        """
        codebook = codebook.detach().reshape(-1)
        if not codebook.is_floating_point() or not 1 <= codebook.numel() <= 256:
            raise ConfigError(f"a codebook holds 1 to 256 floats, got {codebook.numel()} of {codebook.dtype}")
        if not torch.isfinite(codebook).all():
            raise ConfigError("the codebook has NaN or inf entries")
        if tuple(indices.shape) != tuple(self.weight.shape):
            raise ConfigError(f"codebook indices have shape {tuple(indices.shape)}, "
                              f"the weight {tuple(self.weight.shape)}")
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise ConfigError(f"codebook indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook.numel()):
            raise ConfigError(f"codebook indices must lie in [0, {codebook.numel() - 1}]")
        self.weight_codebook = codebook.float().clone().to(self.weight.device)
        self.weight_indices = indices.detach().to(device=self.weight.device, dtype=torch.uint8)
        self.weight_codes = None
        self._dequant_cache = None
        self.rounder = None

    def nearest_codes(self) -> torch.Tensor:
        if self.has_codebook:
            raise QuantplugError(
                "this layer holds lookup-table (codebook) weights (k-means, TTQ), which have no affine integer "
                "codes: formats built on them (ONNX QDQ) cannot carry it; `quantplug export --format int` packs "
                "the codebook and its indices"
            )
        q = self.weight_quantizer
        assert q is not None and self.weight_spec is not None
        rows = to_rows(self.weight.detach(), self.weight_spec)
        codes = quantize(rows, q.scale[:, None], q.zero_point[:, None], self.weight_spec.qmin, self.weight_spec.qmax)
        return from_rows(codes, self.weight.shape, self.weight_spec)

    def dequantize_codes(self, codes: torch.Tensor) -> torch.Tensor:
        q = self.weight_quantizer
        assert q is not None and self.weight_spec is not None
        rows = to_rows(codes.to(self.weight.dtype), self.weight_spec)
        w = dequantize(rows, q.scale.detach()[:, None], q.zero_point[:, None])
        return from_rows(w, self.weight.shape, self.weight_spec)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Harden: store integer codes; the forward pass uses them from now on."""
        assert self.weight_spec is not None
        spec = self.weight_spec
        dtype = torch.int16 if (spec.bits == 8 and not spec.symmetric) else torch.int8
        self.weight_codes = codes.detach().round().to(dtype)
        self.weight_codebook = None
        self.weight_indices = None
        self._dequant_cache = None
        self.rounder = None

    def invalidate_cache(self) -> None:
        self._dequant_cache = None

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # hardened weights are None until set: give them the saved tensors' shape and dtype before copying
        for name in ("weight_codes", "weight_codebook", "weight_indices"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.weight.device))
        self._dequant_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantConv2d(QuantLayer):
    """A ``Conv2d`` with weight and input-activation quantizers."""

    def __init__(self, conv: nn.Conv2d, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False) if conv.bias is not None else None
        self._init_quant(weight_spec, input_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        if self.padding_mode != "zeros":
            raise NotImplementedError("QuantConv2d supports zero padding only")
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class QuantLinear(QuantLayer):
    """A ``Linear`` with weight and input-activation quantizers."""

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = (
            nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if linear.bias is not None else None
        )
        self._init_quant(weight_spec, input_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def make_quant_layer(module: nn.Module, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> QuantLayer:
    if isinstance(module, nn.Conv2d):
        layer: QuantLayer = QuantConv2d(module, weight_spec, input_spec)
    elif isinstance(module, nn.Linear):
        layer = QuantLinear(module, weight_spec, input_spec)
    else:
        raise TypeError(f"cannot quantize {type(module).__name__}")
    return layer.to(module.weight.device)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE) and not isinstance(m, QuantLayer)]
