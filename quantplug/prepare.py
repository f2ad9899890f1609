"""Wrap a model for quantization: swap Conv2d / Linear for quantized layers per recipe and bit policy."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from quantplug.config import BitPolicy, Recipe
from quantplug.errors import ConfigError
from quantplug.interfaces import ModelAdapter
from quantplug.modules import QuantLayer, make_quant_layer, set_submodule
from quantplug.quantizer import AffineQuantizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerBits:
    """Resolved bit widths of one layer (None: full precision)."""

    name: str
    weight_bits: int | None
    input_bits: int | None


def resolve_layer_bits(
    names: list[str], first: str | None, last: str | None, recipe: Recipe, policy: BitPolicy | None = None
) -> list[LayerBits]:
    policy = policy or recipe.bits
    out = []
    a_default = recipe.activation.bits if recipe.activation is not None else None
    for name in names:
        w, a = recipe.weight.bits, a_default
        if name == first and policy.first_layer_bits is not None:
            w = policy.first_layer_bits
            a = policy.first_layer_bits if a is not None else None
        if name == last and policy.last_layer_bits is not None:
            w = policy.last_layer_bits
            a = policy.last_layer_bits if a is not None else None
        for pattern, w_bits, a_bits in policy.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                w = w_bits or None
                a = a_bits or None
        out.append(LayerBits(name, w, a))
    return out


def recorded_layer_bits(names: Sequence[str], bit_map: Sequence[LayerBits | Mapping[str, Any]]) -> list[LayerBits]:
    """The recorded ``bit_map`` (a saved run's, e.g. after a bit-allocation pass) in the order of ``names``."""
    by_name = {b.name: b for b in (x if isinstance(x, LayerBits) else LayerBits(**x) for x in bit_map)}
    if set(by_name) != set(names):
        missing, extra = sorted(set(names) - set(by_name)), sorted(set(by_name) - set(names))
        raise ConfigError(f"the bit map does not match the model's quantizable layers (missing {missing[:5]}, "
                          f"unknown {extra[:5]}): it was recorded for another model or adapter version")
    return [by_name[n] for n in names]


def prepare_model(model: nn.Module, adapter: ModelAdapter, recipe: Recipe,
                  bit_map: Sequence[LayerBits | Mapping[str, Any]] | None = None) -> list[LayerBits]:
    """Replace quantizable layers in place; returns the resolved bit map.

    ``bit_map`` (one entry per quantizable layer) replaces the bit widths of the recipe's bit policy:
    ``load`` passes the one a run recorded, which a ``prepared`` model pass may have changed.
    """
    names = adapter.quantizable_layers(model)
    first, last = adapter.first_last_layers(model)
    plan = resolve_layer_bits(names, first, last, recipe) if bit_map is None else recorded_layer_bits(names, bit_map)
    for item in plan:
        module = model.get_submodule(item.name)
        if isinstance(module, QuantLayer):
            continue
        w_spec = recipe.weight.with_bits(item.weight_bits) if item.weight_bits else None
        a_spec = None
        if item.input_bits and recipe.activation is not None:
            a_spec = replace(recipe.activation, bits=item.input_bits)
        set_submodule(model, item.name, make_quant_layer(module, w_spec, a_spec))
    logger.info("prepared %d quantized layers", len(plan))
    return plan


def set_weight_bits(layer: QuantLayer, bits: int) -> None:
    """Give a prepared (not yet calibrated) layer a weight quantizer of ``bits`` bits, same grid otherwise."""
    if layer.weight_spec is None or layer.weight_quantizer is None:
        raise ConfigError("cannot set the weight bits of a layer whose weights stay in full precision")
    if layer.weight_codes is not None or layer.rounder is not None or bool(layer.weight_quantizer.initialized):
        raise ConfigError("weight bits can change only before calibration (a model pass at stage 'prepared')")
    spec = layer.weight_spec.with_bits(bits)
    layer.weight_spec = spec
    layer.weight_quantizer = AffineQuantizer(spec).to(layer.weight.device)
    layer.invalidate_cache()


def layer_bits(model: nn.Module, names: Sequence[str]) -> list[LayerBits]:
    """The bit widths the quantized layers ``names`` of ``model`` actually use (None: full precision)."""
    out = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, QuantLayer):
            out.append(LayerBits(name, None, None))
            continue
        w = layer.weight_spec.bits if layer.weight_spec is not None else None
        a = layer.input_quantizer.spec.bits if layer.input_quantizer is not None else None
        out.append(LayerBits(name, w, a))
    return out
