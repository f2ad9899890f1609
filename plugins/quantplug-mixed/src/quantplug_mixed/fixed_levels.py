"""Refuse bases whose weights take a fixed number of values, whatever the bit width a layer is given.

Mixed precision trades bits between layers: it only makes sense when a layer's weights really use ``2^b`` levels at
``b`` bits. Binary weights (BWN, BinaryConnect: ``{-a, +a}``, Rastegari et al., ECCV 2016; Courbariaux et al.,
NeurIPS 2015), ternary weights (TWN: ``{-a, 0, +a}``, Li et al., 2016) and trained ternary weights (TTQ:
``{-W_n, 0, +W_p}``, Zhu et al., ICLR 2017) keep 2 or 3 values at any width, so an allocation of 2 / 3 / 4 / 8 bits
would change nothing and its size and BOPs would be fictitious.

Such components are recognized without importing the plugin that provides them (it may not be installed): by the
class attribute ``fixed_weight_levels`` (the number of values), which any plugin can set on its ``Rounding`` or
``ModelPass``, or else by the registered names of quantplug-lowbit's components below.
"""

from __future__ import annotations

from typing import Any

from quantplug.config import Recipe
from quantplug.errors import ConfigError

#: (component kind, registered name) -> number of weight values, for components that do not declare
#: ``fixed_weight_levels`` themselves (quantplug-lowbit's binary / ternary roundings and the TTQ pass)
KNOWN_FIXED_LEVELS: dict[tuple[str, str], int] = {
    ("rounding", "binary"): 2,
    ("rounding", "ternary"): 3,
    ("model_pass", "ttq"): 3,
}

_REGISTRIES = {"rounding": "roundings", "model_pass": "model_passes"}


def fixed_levels(session: Any, kind: str, name: str) -> int | None:
    """How many values a component's weights take whatever the bit width (None: it follows the bit width)."""
    registry = getattr(session, _REGISTRIES[kind], None)
    if registry is not None and name in registry:
        levels = getattr(registry.get(name), "fixed_weight_levels", None)
        if levels is not None:
            return int(levels)
    return KNOWN_FIXED_LEVELS.get((kind, name))


def check_bit_width_matters(recipe: Recipe, session: Any) -> None:
    """Raise ``ConfigError`` if the recipe's rounding or one of its passes ignores the weight bit width."""
    found = [(kind, ref.name, fixed_levels(session, kind, ref.name))
             for kind, ref in [("rounding", recipe.rounding), *(("model_pass", p) for p in recipe.passes)]]
    found = [(kind, name, levels) for kind, name, levels in found if levels is not None]
    if not found:
        return
    what = ", ".join(f"{'rounding' if kind == 'rounding' else 'model pass'} {name!r} ({levels} values)"
                     for kind, name, levels in found)
    raise ConfigError(
        f"mixed cannot allocate bit widths on this base: {what} gives every layer's weights a fixed number of "
        "values whatever its bit width, so the chosen widths would change nothing and the reported size / BOPs "
        "would be fictitious. Use mixed with a base whose weights follow the bit width: an affine grid (nearest, "
        "adaround, brecq, qdrop, dfq, qat...) or k-means codebooks (kmeans)")
