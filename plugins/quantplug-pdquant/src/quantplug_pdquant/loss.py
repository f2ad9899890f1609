"""PD-Quant's prediction-difference loss ``pd`` (Liu et al., CVPR 2023; released code hustvl/PD-Quant).

As in ``quant/block_recon.py`` (``LossFunction.__call__`` and the loop of ``block_reconstruction``)::

    loss = lp_loss(z_drop, z_fp) + KL(softmax(fp_logits / T) || softmax(rest(z_quant) / T)) / lambda_r

* ``lp_loss`` is ``(z_drop - z_fp).abs().pow(2).sum(1).mean()`` on the unit (block) output (quantplug's
  ``mse``); ``z_drop`` is the output for QDrop's drop-mixed input (``out_drop``);
* ``z_quant`` is the output for the quantized input (``out_quant``; the code concatenates both inputs into one
  batch): the engine runs the unit a second time (``needs_quantized_output``). By default with the drop switched
  off, so the KL term scores the unit as it will be deployed; the code keeps the drop on inside the block for that
  half (only its input is unmixed, the quantized-model input), which option ``pd_input="quantized_with_drop"``
  reproduces; ``pd_input="mixed"`` uses ``z_drop`` for both terms (one forward per step);
* the KL divergence is ``nn.KLDivLoss(reduction='batchmean')`` of ``log_softmax(q / T)`` against
  ``softmax(fp / T)`` over the class dimension (no ``T^2`` factor), divided by ``lambda_r`` (0.1);
* ``fp_logits`` are the full-precision network's logits of the calibration samples, captured once per unit;
* ``rest`` runs the blocks after the unit in full precision. The official code walks the *quantized*
  model's not-yet-reconstructed modules after calling ``set_quant_state(False, False)`` on them
  (``find_unquantized_module``), i.e. their original weights with no activation quantization, which is
  the full-precision network; here they are the FP model's blocks (``run.blocks`` is a chain).

Multiplying by ``lambda_r`` gives the paper's Eq. (5), ``L_PD + lambda_r * L_reg``; the code's scaling is
kept because the engine adds the rounding regularizer unscaled, as the official ``total_loss`` does.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.builtins.losses import LpLoss
from quantplug.builtins.losses import softmax_kl as kl_prediction_difference
from quantplug.errors import ConfigError, IncompatibleComponentsError
from quantplug.interfaces import LossContext, ReconstructionLoss, ReconUnit
from quantplug.tensors import to_device as _to_device

__all__ = ["PredictionDifferenceLoss", "kl_prediction_difference", "rest_of_network", "fp_logits"]

logger = logging.getLogger(__name__)
#: values of the ``pd_input`` option (see ``PredictionDifferenceLoss.Config``)
PD_INPUTS = ("quantized", "quantized_with_drop", "mixed")


def rest_of_network(run: Any, unit: ReconUnit) -> nn.Module:
    """The full-precision blocks after ``unit``, chained (an empty ``Sequential`` is the identity)."""
    if unit.is_layer or not unit.blocks:
        raise IncompatibleComponentsError(
            f"loss 'pd' needs block units (the rest of the network is built from the adapter's blocks); unit "
            f"{unit.name!r} is a single layer: use scheduler 'block' (or another block-level scheduler)"
        )
    names = [b.name for b in run.blocks]
    try:
        last = names.index(unit.blocks[-1])
    except ValueError as exc:
        raise IncompatibleComponentsError(f"unit {unit.name!r} ends in block {unit.blocks[-1]!r}, which the "
                                          f"adapter does not list ({names})") from exc
    chain = nn.Sequential(*(run.adapter.block_module(run.fp_model, b) for b in run.blocks[last + 1:]))
    return chain.eval()


@torch.no_grad()
def fp_logits(run: Any) -> torch.Tensor:
    """The full-precision network's outputs for every calibration sample, in calibration order, on the CPU."""
    outs = [run.adapter.forward(run.fp_model, _to_device(x, run.device)).detach().float().cpu()
            for x in run.calib_inputs]
    return torch.cat(outs)


class PredictionDifferenceLoss(ReconstructionLoss):
    """PD-Quant's prediction-difference loss (Liu et al., CVPR 2023): ``lp(z_q, z_fp) + KL_T / lambda_r``.

    ``KL_T = KL(softmax(fp_logits / T) || softmax(rest(z_q) / T))``, batch mean (see the module docstring).

    ``capture_extras`` builds the rest of the network after the unit (the FP model's later blocks) and
    captures the FP logits (extra ``fp_logits``). Until it has been called (a loss used on its own, as
    in the conformance kit) the unit is treated as the network's tail: its output is the prediction and
    the target is the FP prediction, so the ``fp_logits`` extra is not used.
    """

    name = "pd"
    extra_keys = ("fp_logits",)

    @dataclass(frozen=True)
    class Config:
        temperature: float = 4.0  # T; 1.0 for MobileNetV2 / MnasNet (run_script.py)
        lambda_r: float = 0.1  # main_imagenet.py --lamb_r; the KL term is divided by it
        p: float = 2.0  # lp_loss exponent of the regularization term
        #: which unit output the KL term sees while QDrop's drop is active: "quantized" (the unit run again on
        #: its quantized input, every activation quantized), "quantized_with_drop" (the code's ``out_quant``
        #: exactly: run again on the quantized input quantized in full, the drop inside the unit still on) or
        #: "mixed" (the drop-mixed output the MSE term sees; one forward per step, cheaper)
        pd_input: str = "quantized"

    def __init__(self, config: PredictionDifferenceLoss.Config | None = None) -> None:
        super().__init__(config)
        if not self.config.temperature > 0:
            raise ConfigError(f"pd temperature must be positive, got {self.config.temperature}")
        if not self.config.lambda_r > 0:
            raise ConfigError(f"pd lambda_r must be positive (the KL term is divided by it), "
                              f"got {self.config.lambda_r}")
        if self.config.pd_input not in PD_INPUTS:
            raise ConfigError(f"pd pd_input must be one of {', '.join(PD_INPUTS)}; got {self.config.pd_input!r}")
        self.needs_quantized_output = self.config.pd_input != "mixed"
        self.quantized_output_keeps_policy = self.config.pd_input == "quantized_with_drop"
        self._lp = LpLoss(LpLoss.Config(p=self.config.p))
        self.rest: nn.Module | None = None
        self._logits: torch.Tensor | None = None
        self._logits_owner: weakref.ReferenceType[Any] | None = None

    def bind(self, rest: nn.Module | None) -> None:
        """Use ``rest`` as the rest of the network (None: standalone, see the class docstring)."""
        self.rest = rest

    def capture_extras(self, run: Any, unit: Any) -> Mapping[str, torch.Tensor]:
        self.bind(rest_of_network(run, unit))
        owner = self._logits_owner() if self._logits_owner is not None else None
        if owner is not run or self._logits is None:  # the FP logits do not change between units of a run
            self._logits = fp_logits(run)
            self._logits_owner = weakref.ref(run)
        logger.debug("pd: unit %s, %d FP blocks after it", unit.name, len(self.rest or ()))
        return {"fp_logits": self._logits}

    def __call__(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        reg = self._lp(output, target, context)
        pd_output = output
        if self.needs_quantized_output and context.quantized_output is not None:
            pd_output = context.quantized_output
        if self.rest is None:
            q_logits, ref_logits = pd_output, target.detach()
        else:
            q_logits, ref_logits = self.rest(pd_output), context.extras["fp_logits"]
        pd = kl_prediction_difference(q_logits, ref_logits, self.config.temperature)
        return reg + pd / self.config.lambda_r
