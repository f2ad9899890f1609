"""PD-Quant: "Post-Training Quantization based on Prediction Difference Metric" (Liu et al., CVPR 2023).

QDrop's parts (AdaRound rounding, block reconstruction, the ``drop`` activation policy, activation
steps learned jointly) with two additions from the released code (hustvl/PD-Quant):

* the ``pd`` loss (:mod:`quantplug_pdquant.loss`): the unit's output is passed through the rest of the
  full-precision network and compared with the FP predictions by a temperature-T KL divergence, plus an
  ``lp_loss`` regularizer on the unit output;
* the ``distribution_correction`` data transform (:mod:`quantplug_pdquant.dc`): each batch of the unit's
  calibration inputs is moved so that the BN inputs of the unit match the BN running statistics.

Recipe ``pdquant``: rounding lr 3e-3 (``w_opt`` in ``quant/block_recon.py``), lambda 0.01, T 4,
lambda_r 0.1, lambda_c 0.02; architecture presets follow ``run_script.py``.
"""

from __future__ import annotations

from typing import Any

from quantplug import hookimpl
from quantplug.recipes import RecipeSpec
from quantplug_pdquant.dc import BNTarget, DistributionCorrection, correct_inputs, statistics_loss, unit_bn_targets
from quantplug_pdquant.loss import PredictionDifferenceLoss, fp_logits, kl_prediction_difference, rest_of_network

__all__ = [
    "BNTarget",
    "DistributionCorrection",
    "PDQUANT",
    "PredictionDifferenceLoss",
    "correct_inputs",
    "dc_transform",
    "fp_logits",
    "kl_prediction_difference",
    "rest_of_network",
    "statistics_loss",
    "unit_bn_targets",
]


def dc_transform(**options: Any) -> list[dict[str, Any]]:
    """The recipe value of ``data_transforms``: distribution correction with ``options``."""
    return [{"name": DistributionCorrection.name, "options": dict(options)}]


def _loss(temperature: float, lambda_r: float = 0.1) -> dict[str, Any]:
    return {"name": PredictionDifferenceLoss.name, "options": {"temperature": temperature, "lambda_r": lambda_r}}


#: main_imagenet.py / run_script.py (resnet18, resnet50): --weight 0.01 --T 4.0 --lamb_c 0.02, lamb_r 0.1,
#: bn_lr 1e-3, 1024 samples, 20 000 iterations, batch 32; block_recon.py: rounding Adam lr 3e-3
OFFICIAL: dict[str, Any] = {
    "recon.iters": 20000,
    "recon.batch_size": 32,
    "calib.num_samples": 1024,
    "recon.lr": 3e-3,
    "rounding.options.reg_weight": 0.01,
    "loss": _loss(4.0),
    "data_transforms": dc_transform(lambda_c=0.02, steps=500, lr=1e-3),
}

PDQUANT = RecipeSpec(
    name="pdquant",
    extends="qdrop",
    description="PD-Quant: QDrop plus the prediction-difference loss and distribution correction of the inputs",
    overrides=dict(OFFICIAL),
    presets={
        "official": OFFICIAL,
        "official-regnet": {**OFFICIAL, "data_transforms": dc_transform(lambda_c=0.01, steps=500, lr=1e-3)},
        "official-mobilenetv2": {**OFFICIAL, "rounding.options.reg_weight": 0.1, "loss": _loss(1.0),
                                 "data_transforms": dc_transform(lambda_c=0.005, steps=500, lr=1e-3)},
        "official-mnasnet": {**OFFICIAL, "rounding.options.reg_weight": 0.2, "loss": _loss(1.0),
                             "data_transforms": dc_transform(lambda_c=0.001, steps=500, lr=1e-3)},
        "cpu-fast": {"recon.iters": 2000, "calib.num_samples": 512, "recon.act_lr": 1e-4,
                     "data_transforms": dc_transform(lambda_c=0.02, steps=100, lr=1e-3)},
    },
    source="Liu et al., 'PD-Quant: Post-Training Quantization based on Prediction Difference Metric', CVPR 2023",
)


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(PredictionDifferenceLoss)


@hookimpl
def register_data_transforms(register) -> None:  # type: ignore[no-untyped-def]
    register(DistributionCorrection)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(PDQUANT)
