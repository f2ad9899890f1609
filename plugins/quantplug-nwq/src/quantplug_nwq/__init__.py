"""NWQ: "Leveraging Inter-Layer Dependency for Post-Training Quantization" (Wang, Zheng, Liu, Li; NeurIPS 2022).

Network-wise quantization: every rounding variable and activation step of the network is optimized
jointly, in one reconstruction unit (quantplug's built-in ``network`` scheduler), with

* ``annealing-softmax`` rounding (:mod:`quantplug_nwq.rounding`): a softmax over candidate integer
  offsets of each weight, its temperature annealed toward a hard choice;
* the ``annealing-mixup`` activation policy (:mod:`quantplug_nwq.mixup`): activations kept in full
  precision with a probability annealed from 0.5 to 0;
* the ``activation-regularization`` loss (:mod:`quantplug_nwq.loss`): output loss plus the distances
  between quantized and full-precision intermediate block outputs.

No public code exists; every choice the paper does not fix is documented in the plugin README and in
:mod:`quantplug_nwq.recipe`.
"""

from __future__ import annotations

from quantplug import hookimpl
from quantplug_nwq.loss import EXTRA_PREFIX, ActivationRegularizationLoss, kl_divergence
from quantplug_nwq.mixup import AnnealingMixupPolicy, fp_probability_at
from quantplug_nwq.recipe import NWQ
from quantplug_nwq.rounding import (
    AnnealingSoftmaxRounder,
    AnnealingSoftmaxRounding,
    gaussian_logits_with_mean,
    temperature_at,
)

__all__ = [
    "EXTRA_PREFIX",
    "NWQ",
    "ActivationRegularizationLoss",
    "AnnealingMixupPolicy",
    "AnnealingSoftmaxRounder",
    "AnnealingSoftmaxRounding",
    "fp_probability_at",
    "gaussian_logits_with_mean",
    "kl_divergence",
    "temperature_at",
]


@hookimpl
def register_roundings(register) -> None:  # type: ignore[no-untyped-def]
    register(AnnealingSoftmaxRounding)


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(ActivationRegularizationLoss)


@hookimpl
def register_activation_policies(register) -> None:  # type: ignore[no-untyped-def]
    register(AnnealingMixupPolicy)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(NWQ)
