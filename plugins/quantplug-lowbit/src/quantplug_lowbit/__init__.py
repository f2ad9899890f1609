"""quantplug-lowbit: binary and ternary weights.

* rounding ``binary``: ``a * sign(W)``, ``a = mean |W|`` per quantization row, deterministic (BWN, XNOR-Net,
  Rastegari et al. 2016) or stochastic (BinaryConnect, Courbariaux et al. 2015);
* rounding ``ternary``: TWN (Li et al. 2016), ``Delta = 0.7 mean |W|``, ``a`` = mean |W| of the kept weights;
* model pass ``ttq``: TTQ (Zhu et al., ICLR 2017), learned ``W_p`` / ``W_n`` stored as a per-layer lookup table;
* recipes ``bwn``, ``binaryconnect``, ``twn``, ``ttq``.

Binary and ternary weights are codes ``{-1, (0,) +1}`` on the ordinary affine grid (2 bits, symmetric), so runs
save, load and export (``int``: 2-bit packed codes) like any other; TTQ's unequal scales use lookup tables.
Layers the bit policy gives another width than the method's (e.g. 8-bit first / last layers) are rounded to nearest
at that width. At the start of a run, settings that binarize / ternarize nothing, or a ternary threshold that
zeroes a layer's rows, are warned about (``checks``).
"""

from __future__ import annotations

from quantplug import hookimpl
from quantplug_lowbit.binary import BinaryRounding, binary_scale, binary_signs, stochastic_binary_signs
from quantplug_lowbit.checks import check_lowbit_run
from quantplug_lowbit.recipes import BINARYCONNECT, BWN, RECIPES, TTQ, TWN
from quantplug_lowbit.ternary import TernaryRounding, twn_codes, twn_scale, twn_threshold
from quantplug_lowbit.ttq import TTQPass, TTQWeights, ttq_indices

__all__ = [
    "BINARYCONNECT",
    "BWN",
    "BinaryRounding",
    "TTQ",
    "TTQPass",
    "TTQWeights",
    "TWN",
    "TernaryRounding",
    "binary_scale",
    "binary_signs",
    "stochastic_binary_signs",
    "ttq_indices",
    "twn_codes",
    "twn_scale",
    "twn_threshold",
]


@hookimpl
def register_roundings(register) -> None:  # type: ignore[no-untyped-def]
    register(BinaryRounding)
    register(TernaryRounding)


@hookimpl
def register_model_passes(register) -> None:  # type: ignore[no-untyped-def]
    register(TTQPass)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    for spec in RECIPES:
        register(spec)


@hookimpl
def on_run_start(run) -> None:  # type: ignore[no-untyped-def]
    check_lowbit_run(run)
