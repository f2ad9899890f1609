"""DFQ: "Data-Free Quantization Through Weight Equalization and Bias Correction" (Nagel, van Baalen,
Blankevoort, Welling, ICCV 2019, arXiv 1906.04721).

Three model passes and the ``dfq`` recipe:

* ``equalize`` (stage ``float``): cross-layer equalization of per-channel weight ranges, iterated until the
  ranges stop changing, ReLU6-aware (``quantplug_dfq.equalize``);
* ``absorb-bias`` (stage ``float``): bias absorption through ReLU with ``c = max(0, beta - 3 gamma)``
  (``quantplug_dfq.absorb``);
* ``bias-correct`` (stage ``quantized``): empirical (calibration data) or analytic (BN statistics) bias
  correction (``quantplug_dfq.bias_correction``).

The recipe extends ``nearest`` with per-tensor min-max weights, the setting DFQ targets (Sec. 5: per-tensor
asymmetric 8-bit quantization). Presets: ``empirical`` (the default: equalize, absorb, empirical bias
correction), ``analytic`` (the same with analytic bias correction) and ``equalize-only`` (cross-layer
equalization alone).
"""

from __future__ import annotations

from typing import Any

from quantplug import hookimpl
from quantplug.recipes import RecipeSpec
from quantplug_dfq.absorb import AbsorbBiasPass
from quantplug_dfq.activations import ChannelClip, clipped_normal_mean
from quantplug_dfq.bias_correction import BiasCorrectionPass
from quantplug_dfq.equalize import EqualizePass
from quantplug_dfq.graph import Link, find_links

__all__ = [
    "DFQ",
    "AbsorbBiasPass",
    "BiasCorrectionPass",
    "ChannelClip",
    "EqualizePass",
    "Link",
    "clipped_normal_mean",
    "dfq_passes",
    "find_links",
]


def dfq_passes(bias_correction: str | None = "empirical", *, equalize: bool = True,
               absorb: bool = True) -> list[dict[str, Any]]:
    """The ``passes`` slot of a DFQ recipe (``bias_correction=None`` leaves bias correction out)."""
    passes: list[dict[str, Any]] = []
    if equalize:
        passes.append({"name": EqualizePass.name, "options": {}})
    if absorb:
        passes.append({"name": AbsorbBiasPass.name, "options": {}})
    if bias_correction is not None:
        passes.append({"name": BiasCorrectionPass.name, "options": {"mode": bias_correction}})
    return passes


PER_TENSOR_MINMAX = {
    "weight.bits": 8,
    "weight.granularity": "per_tensor",
    "weight_observer.name": "minmax",
}

DFQ = RecipeSpec(
    name="dfq",
    extends="nearest",
    description="DFQ: cross-layer equalization, bias absorption and bias correction; per-tensor min-max weights",
    overrides={**PER_TENSOR_MINMAX, "passes": dfq_passes("empirical")},
    presets={
        "empirical": {"passes": dfq_passes("empirical")},
        "analytic": {"passes": dfq_passes("analytic")},
        "equalize-only": {"passes": dfq_passes(None, absorb=False)},  # cross-layer equalization alone
    },
    source="Nagel et al., 'Data-Free Quantization Through Weight Equalization and Bias Correction', ICCV 2019",
)


@hookimpl
def register_model_passes(register) -> None:  # type: ignore[no-untyped-def]
    register(EqualizePass)
    register(AbsorbBiasPass)
    register(BiasCorrectionPass)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(DFQ)
