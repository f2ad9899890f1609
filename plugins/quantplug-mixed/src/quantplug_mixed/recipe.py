"""The ``mixed`` recipe: the bit-allocation pass on top of any base recipe (``--base qdrop``, ``--base brecq``...)."""

from __future__ import annotations

from quantplug.recipes import RecipeSpec


def _pass(**options: object) -> dict[str, object]:
    return {"passes": [{"name": "mixed", "options": options}]}


MIXED = RecipeSpec(
    name="mixed",
    extends="nearest",
    description="Mixed-precision weights: per-layer bit widths from a Hessian-trace sensitivity, allocated exactly "
    "under the size of uniform --w-bits (compose with --base qdrop / brecq / adaround)",
    overrides=_pass(),
    presets={
        "fisher": _pass(sensitivity="fisher"),
        "output-mse": _pass(sensitivity="output_mse"),
        "bops": _pass(budget_kind="bops"),
    },
    source="Dong et al., 'HAWQ-V2', NeurIPS 2020; Yao et al., 'HAWQ-V3: Dyadic Neural Network Quantization', "
    "ICML 2021",
)
