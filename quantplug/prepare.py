"""Wrap a model for quantization: swap Conv2d / Linear for quantized layers per recipe and bit policy."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, replace

from torch import nn

from quantplug.config import BitPolicy, Recipe
from quantplug.interfaces import ModelAdapter
from quantplug.modules import QuantLayer, make_quant_layer, set_submodule

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


def prepare_model(model: nn.Module, adapter: ModelAdapter, recipe: Recipe) -> list[LayerBits]:
    """Replace quantizable layers in place; returns the resolved bit map."""
    names = adapter.quantizable_layers(model)
    first, last = adapter.first_last_layers(model)
    plan = resolve_layer_bits(names, first, last, recipe)
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
