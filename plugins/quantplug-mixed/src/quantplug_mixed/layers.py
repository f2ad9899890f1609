"""What the allocator needs to know about each layer: its kind, size, multiply-accumulates and fixed bits.

Layer kinds are kept apart because they tolerate low bit widths differently: a depthwise convolution
(``groups == in_channels > 1``) has a handful of weights per output channel (9 for a 3x3 kernel), so a
per-channel grid of 2 or 3 bits leaves almost nothing of each filter (Krishnamoorthi, "Quantizing deep
convolutional networks for efficient inference: A whitepaper", 2018, section 3.2 / 4; Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019, on MobileNet's depthwise ranges);
pointwise (1x1) convolutions carry most of a MobileNet's weights and behave like linear layers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.config import Recipe
from quantplug.interfaces import ModelAdapter
from quantplug.modules import QuantLayer

KINDS = ("depthwise", "pointwise", "conv", "linear")
#: bit width charged for a full-precision input when counting bit operations (HAWQ-V3 counts b_w * b_a)
FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerInfo:
    """One quantized layer: ``fixed_bits`` is set when the recipe's bit policy decides its weight bits."""

    name: str
    kind: str
    numel: int
    macs: int
    input_bits: int
    weight_bits: int
    fixed_bits: int | None

    @property
    def allocated(self) -> bool:
        return self.fixed_bits is None

    def weight_cost(self, bits: int) -> int:
        """Weight storage in bits."""
        return self.numel * bits

    def bops(self, bits: int) -> int:
        """Bit operations of one sample: multiply-accumulates x weight bits x input bits."""
        return self.macs * bits * self.input_bits


def layer_kind(module: nn.Module) -> str:
    """``depthwise``, ``pointwise`` (1x1, ungrouped), ``conv`` or ``linear``."""
    if isinstance(module, nn.Linear) or (isinstance(module, QuantLayer) and hasattr(module, "in_features")):
        return "linear"
    groups = int(getattr(module, "groups", 1))
    in_channels = int(getattr(module, "in_channels", 0))
    if groups > 1 and groups == in_channels:
        return "depthwise"
    if groups == 1 and tuple(getattr(module, "kernel_size", ())) == (1, 1):
        return "pointwise"
    return "conv"


@torch.no_grad()
def count_macs(model: nn.Module, names: Sequence[str], adapter: ModelAdapter, inputs: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of the Conv2d / Linear layers ``names`` for one batch ``inputs``."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            batch = args[0].shape[0] if args[0].dim() > 1 else 1
            weight = module.weight
            if isinstance(module, nn.Conv2d):
                per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]  # (in / groups) * kh * kw
            else:
                per_output = weight.shape[1]
            macs[name] = macs.get(name, 0) + int(output.numel() * per_output // batch)
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        adapter.forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


def fixed_layers(names: Sequence[str], adapter: ModelAdapter, model: nn.Module, recipe: Recipe) -> set[str]:
    """Layers whose weight bits the recipe's bit policy sets (first, last, pattern overrides): kept as they are."""
    policy = recipe.bits
    first, last = adapter.first_last_layers(model)
    fixed = set()
    if first is not None and policy.first_layer_bits is not None:
        fixed.add(first)
    if last is not None and policy.last_layer_bits is not None:
        fixed.add(last)
    for name in names:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern, _, _ in policy.overrides):
            fixed.add(name)
    return fixed


def describe_layers(q_model: nn.Module, fp_model: nn.Module, adapter: ModelAdapter, recipe: Recipe,
                    sample: Any) -> list[LayerInfo]:
    """``LayerInfo`` of every quantizable layer whose weights are quantized, in the adapter's order."""
    names = adapter.quantizable_layers(fp_model)
    fixed = fixed_layers(names, adapter, fp_model, recipe)
    macs = count_macs(fp_model, names, adapter, sample)
    out = []
    for name in names:
        layer = q_model.get_submodule(name)
        if not isinstance(layer, QuantLayer) or layer.weight_spec is None:
            continue  # full-precision weights: outside the budget
        bits = layer.weight_spec.bits
        input_bits = layer.input_quantizer.spec.bits if layer.input_quantizer is not None else FLOAT_BITS
        out.append(LayerInfo(name, layer_kind(fp_model.get_submodule(name)), int(layer.weight.numel()),
                             macs.get(name, 0), input_bits, bits, bits if name in fixed else None))
    return out
