"""Binary and ternary weights on quantplug's affine grid.

A binary weight ``{-a, +a}`` and a ternary weight ``{-a, 0, +a}`` are the integer codes ``{-1, +1}`` and
``{-1, 0, +1}`` around a zero point, with scale ``a``: any grid of at least 2 bits holds them. On a symmetric
grid (``[-2^(b-1), 2^(b-1) - 1]``, zero point 0) the codes are ``-1, 0, +1``; on an asymmetric one (``[0, 2^b - 1]``)
the zero point is 1 and the codes are ``0, 1, 2``. So the layer keeps its ordinary quantizer (scale and zero
point per row) and integer codes: saving, loading and the packed-integer export work unchanged.

The bit policy may give some layers another width than the method's (``bits.first_layer_bits=8``,
``bits.overrides``, a bit-allocation pass): only layers at the method's low-bit width are binarized / ternarized;
the others are rounded to the nearest point of their own affine grid at their own width (``at_low_bit_width``), so
an 8-bit layer in the manifest has 8-bit weights.
"""

from __future__ import annotations

import logging

import torch

from quantplug.config import MAX_BITS, QuantSpec
from quantplug.errors import ConfigError
from quantplug.modules import QuantLayer
from quantplug.quantizer import EPS, to_rows

logger = logging.getLogger(__name__)

__all__ = ["MIN_CODE_BITS", "at_low_bit_width", "check_low_bits", "layer_rows", "safe_scale", "sign_zero_point"]

#: the narrowest affine grid that holds the codes ``-1, 0, +1``
MIN_CODE_BITS = 2


def sign_zero_point(spec: QuantSpec) -> int:
    """The zero point that puts codes ``z - 1, z, z + 1`` on ``spec``'s grid: 0 if symmetric, else 1."""
    zero_point = 0 if spec.symmetric else 1
    if not (spec.qmin <= zero_point - 1 and zero_point + 1 <= spec.qmax):
        raise ConfigError(f"a {spec.bits}-bit grid cannot hold binary / ternary codes; use at least 2 bits")
    return zero_point


def layer_rows(layer: QuantLayer, what: str) -> tuple[torch.Tensor, QuantSpec]:
    """The layer's full-precision weight as quantization rows (one per scale) and its weight spec."""
    if not isinstance(layer, QuantLayer) or layer.weight_spec is None:
        raise ConfigError(f"{what} attaches to quantized Conv2d / Linear layers with a weight quantizer, "
                          f"not {type(layer).__name__}")
    return to_rows(layer.weight.detach(), layer.weight_spec), layer.weight_spec


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """A scale the affine quantizer accepts: an all-zero row (scale 0) gets the smallest positive scale."""
    return scale.clamp_min(EPS)


def at_low_bit_width(layer: QuantLayer, low_bits: int, what: str) -> bool:
    """Whether ``layer``'s weights are on a ``low_bits``-bit grid, the method's width (then they are binarized /
    ternarized); a layer the bit policy gave another width is rounded to nearest at that width instead (logged)."""
    _, spec = layer_rows(layer, what)
    if spec.bits == low_bits:
        return True
    logger.info("%s: a layer with %d-bit weights (shape %s) is not at the method's %d bits: nearest rounding on "
                "its %d-bit grid", what, spec.bits, tuple(layer.weight.shape), low_bits, spec.bits)
    return False


def check_low_bits(bits: int, what: str) -> None:
    """Refuse a low-bit width no affine grid of quantplug has or that cannot hold the codes ``-1, 0, +1``."""
    if not MIN_CODE_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what} bits must lie in [{MIN_CODE_BITS}, {MAX_BITS}] (the weight.bits of the layers "
                          f"to binarize / ternarize, 2 in the recipes), got {bits}")
