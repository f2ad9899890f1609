"""Checks at the start of a run with the ``binary`` or ``ternary`` rounding, naming the layers concerned.

* No layer at the rounding's low-bit width (``rounding.options.bits``, 2; e.g. ``weight.bits=3`` without
  ``rounding.options.bits=3``): nothing would be binarized / ternarized, every layer rounded to nearest. Warned.
* A ternary threshold that keeps no weight of a quantization row (TWN, Li et al. 2016: ``Delta = factor * mean |W|``
  with a factor at least the row's ``max |W| / mean |W|``): the row becomes all zeros. Warned, per layer.

Warnings, not errors: a bit-allocation pass may legitimately leave no layer at the low width, and a large factor
may be wanted for some layers; the run goes on as configured.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from quantplug.modules import QuantLayer, quant_layers
from quantplug.quantizer import to_rows
from quantplug_lowbit.ternary import twn_codes, twn_threshold

logger = logging.getLogger(__name__)

__all__ = ["check_lowbit_run", "empty_ternary_rows"]

SIGN_CODE_ROUNDINGS = ("binary", "ternary")


def empty_ternary_rows(layer: QuantLayer, factor: float) -> tuple[int, int]:
    """How many quantization rows of ``layer`` with a nonzero weight keep no weight at ``Delta = factor mean |W|``,
    and how many rows there are."""
    assert layer.weight_spec is not None
    rows = to_rows(layer.weight.detach(), layer.weight_spec)
    codes = twn_codes(rows, twn_threshold(rows, factor))
    empty = (codes.abs().sum(dim=1) == 0) & (rows.abs().sum(dim=1) > 0)
    return int(empty.sum()), rows.shape[0]


@torch.no_grad()
def check_lowbit_run(run: Any) -> None:
    """Warn about the ``binary`` / ``ternary`` settings of ``run`` (a ``RunContext``) that are probably mistakes."""
    ref = run.recipe.rounding
    if ref.name not in SIGN_CODE_ROUNDINGS:
        return
    config = run.session.make("rounding", ref).config
    quantized = [(name, layer) for name, layer in quant_layers(run.q_model) if layer.quantizes_weight]
    low = [(name, layer) for name, layer in quantized if layer.weight_spec.bits == config.bits]
    if quantized and not low:
        widths = sorted({layer.weight_spec.bits for _, layer in quantized})
        logger.warning("the %s rounding works on %d-bit layers (rounding.options.bits) but the quantized layers have "
                       "%s bits: none is %s, all are rounded to nearest. To %s them set -o rounding.options.bits=%d",
                       ref.name, config.bits, "/".join(map(str, widths)), _participle(ref.name), _verb(ref.name),
                       widths[0])
    if ref.name != "ternary":
        return
    for name, layer in low:
        empty, total = empty_ternary_rows(layer, config.threshold_factor)
        if empty:
            logger.warning("ternary threshold_factor=%g keeps no weight of layer %s in %d of its %d quantization rows: "
                           "those weights are all 0 (the paper's factor is 0.7)", config.threshold_factor, name,
                           empty, total)


def _verb(rounding: str) -> str:
    return "binarize" if rounding == "binary" else "ternarize"


def _participle(rounding: str) -> str:
    return _verb(rounding)[:-1] + "ed"
