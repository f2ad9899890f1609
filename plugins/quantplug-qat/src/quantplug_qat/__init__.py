"""Quantization-aware fine-tuning for quantplug, from any PTQ result.

Straight-through estimator (Bengio, Leonard, Courville, 2013) for the weights and LSQ step sizes (Esser,
McKinstry, Bablani, Appuswamy, Modha, "Learned Step Size Quantization", ICLR 2020) for weights and
activations, as the ``qat`` model pass (stage ``quantized``) and the ``qat`` recipe: a PTQ recipe
(``nearest`` by default, ``--base qdrop`` or any other) followed by fine-tuning of the whole fake-quantized
model, after which integer codes are hardened again.
"""

from __future__ import annotations

from typing import Any

from quantplug import hookimpl
from quantplug.recipes import RecipeSpec
from quantplug_qat.finetune import FakeQuantTraining, QATPass
from quantplug_qat.loss import distillation_loss, qat_loss
from quantplug_qat.lsq import ActivationSteps, LSQWeight, lsq_factor

__all__ = [
    "QAT",
    "ActivationSteps",
    "FakeQuantTraining",
    "LSQWeight",
    "QATPass",
    "distillation_loss",
    "lsq_factor",
    "qat_loss",
    "qat_passes",
]


def qat_passes(**options: Any) -> list[dict[str, Any]]:
    """The ``passes`` slot of a QAT recipe with these ``QATPass.Config`` options."""
    return [{"name": QATPass.name, "options": dict(options)}]


QAT = RecipeSpec(
    name="qat",
    extends="nearest",
    description="PTQ (nearest, or --base qdrop / any recipe) then quantization-aware fine-tuning: STE weights, "
                "LSQ steps",
    overrides={"passes": qat_passes(epochs=3)},
    presets={"distill": {"passes": qat_passes(epochs=3, distill=1.0)}},
    source="Esser et al., 'Learned Step Size Quantization', ICLR 2020; Bengio et al., 2013 (straight-through "
           "estimator)",
)


@hookimpl
def register_model_passes(register) -> None:  # type: ignore[no-untyped-def]
    register(QATPass)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(QAT)
