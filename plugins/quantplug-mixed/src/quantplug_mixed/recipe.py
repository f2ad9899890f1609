"""The ``mixed`` recipe: the bit-allocation pass on top of any base recipe (``--base qdrop``, ``--base brecq``...).

``adds_passes``: the ``mixed`` pass is added to the base's own model passes (``--base dfq`` keeps equalization,
bias absorption and bias correction; ``--base kmeans`` its codebooks), and a ``passes`` preset or ``-o passes=[...]``
only changes ``mixed``'s options. ``mixed`` comes first in the list, so it runs before any ``prepared``-stage pass of
the base, which then sees the chosen bit map.
"""

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
    adds_passes=True,
    presets={
        "fisher": _pass(sensitivity="fisher"),
        "output-mse": _pass(sensitivity="output_mse"),
        "bops": _pass(budget_kind="bops"),
    },
    source="Dong et al., 'HAWQ-V2', NeurIPS 2020; Yao et al., 'HAWQ-V3: Dyadic Neural Network Quantization', "
    "ICML 2021",
)
