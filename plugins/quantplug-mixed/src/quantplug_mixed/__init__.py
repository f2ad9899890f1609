"""quantplug-mixed: per-layer weight bit widths under a model-size or bit-operation budget.

The ``mixed`` model pass (stage ``prepared``) measures how sensitive each layer is to each candidate bit width
(Hessian trace x quantization error as in HAWQ-V2, an empirical-Fisher variant, or the output error of the model
with one layer quantized), then solves the multiple-choice knapsack of HAWQ-V3 exactly (``allocator.solve``) and
gives each layer its bit width before calibration, so any reconstruction recipe works on the chosen bit map.
The ``mixed`` recipe puts the pass on top of ``nearest``, or of any base with ``--base`` (whose own model passes
are kept); bases whose weights ignore the bit width (binary, ternary, TTQ) are refused.
"""

from __future__ import annotations

from quantplug import hookimpl
from quantplug_mixed.allocation_pass import BUDGET_KINDS, MixedPrecisionPass
from quantplug_mixed.allocator import Allocation, minimum_cost, solve
from quantplug_mixed.fixed_levels import check_bit_width_matters, fixed_levels
from quantplug_mixed.layers import KINDS, LayerInfo, count_macs, describe_layers, layer_kind
from quantplug_mixed.recipe import MIXED
from quantplug_mixed.sensitivity import (
    METHODS,
    fisher_diagonals,
    hutchinson_traces,
    output_errors,
    quantize_weight,
)

__all__ = [
    "BUDGET_KINDS",
    "KINDS",
    "METHODS",
    "MIXED",
    "Allocation",
    "check_bit_width_matters",
    "LayerInfo",
    "MixedPrecisionPass",
    "count_macs",
    "describe_layers",
    "fixed_levels",
    "fisher_diagonals",
    "hutchinson_traces",
    "layer_kind",
    "minimum_cost",
    "output_errors",
    "quantize_weight",
    "solve",
]


@hookimpl
def register_model_passes(register) -> None:  # type: ignore[no-untyped-def]
    register(MixedPrecisionPass)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(MIXED)
