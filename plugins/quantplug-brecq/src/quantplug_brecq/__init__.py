"""BRECQ: "Pushing the Limit of Post-Training Quantization by Block Reconstruction" (Li et al., ICLR 2021).

The recipe: AdaRound rounding, block-wise reconstruction (stem and head as their own units), the
Fisher-diagonal loss, and activation step sizes learned in a second pass with the weights fixed.

Fisher-diagonal loss (``fisher_diag``), as implemented in the released code (yhhhli/BRECQ; its
``main_imagenet.py`` script itself runs ``opt_mode='mse'``, see the README):
``((out_q - out_fp)^2 * g^2).sum(1).mean()`` where ``g = |dL/dz| + 1`` (damping 1) is the gradient of
``L = KL(softmax(fp logits) || softmax(quantized logits))`` with respect to the unit output ``z``,
captured once per unit over the calibration set with only that unit quantized (its weights rounded
to nearest, activations off) and the rest of the network in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from quantplug import hookimpl
from quantplug.engine import RunContext, entry_exit_modules, unit_layers
from quantplug.interfaces import LossContext, ReconstructionLoss, ReconUnit
from quantplug.modules import quant_layers
from quantplug.recipes import RecipeSpec
from quantplug.tensors import to_device

__all__ = ["FisherDiagLoss", "BRECQ", "capture_output_gradients"]


#: the released ``save_grad_data`` takes the KL's batch mean over batches of 32: each sample's gradient carries
#: 1/32 whatever batch the calibration data comes in here (a last, partial batch must not weigh more)
GRADIENT_BATCH = 32


def _kl_task_loss(q_logits: torch.Tensor, fp_logits: torch.Tensor) -> torch.Tensor:
    """BRECQ's proxy task loss: KL(p_fp || p_q) over the class (last) dimension, summed over samples and divided
    by ``GRADIENT_BATCH`` (the released code's batch mean at its batch size)."""
    dim = 1 if q_logits.dim() == 2 else -1
    log_q = F.log_softmax(q_logits, dim=dim)
    p_fp = F.softmax(fp_logits, dim=dim)
    kl = F.kl_div(log_q, p_fp, reduction="none").sum(dim)
    return kl.sum() / GRADIENT_BATCH


def capture_output_gradients(run: RunContext, unit: ReconUnit, damping: float) -> torch.Tensor:
    """``|dL/dz| + damping`` for every calibration sample, ``z`` the unit output (see module docstring)."""
    inside = set(unit_layers(run, unit))
    saved = []
    for name, layer in quant_layers(run.q_model):
        for q in (layer.weight_quantizer if name not in inside else None, layer.input_quantizer):
            if q is not None:
                saved.append((q, q.enabled))
                q.enabled = False
        layer.invalidate_cache()
    _, exit_module = entry_exit_modules(run, run.q_model, unit)
    holder: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        holder["z"] = leaf
        return leaf

    handle = exit_module.register_forward_hook(hook)
    grads = []
    try:
        for inputs in run.calib_inputs:
            x = to_device(inputs, run.device)  # a tensor, or a dict of token tensors
            with torch.no_grad():
                fp_logits = run.adapter.forward(run.fp_model, x)
            with torch.enable_grad():
                q_logits = run.adapter.forward(run.q_model, x)
                loss = _kl_task_loss(q_logits, fp_logits)
                (grad,) = torch.autograd.grad(loss, holder["z"])
            grads.append(grad.abs().add_(damping).cpu())
    finally:
        handle.remove()
        for q, enabled in saved:
            q.enabled = enabled
        for _, layer in quant_layers(run.q_model):
            layer.invalidate_cache()
    return torch.cat(grads)


class FisherDiagLoss(ReconstructionLoss):
    """BRECQ's Fisher-diagonal loss (Li et al., ICLR 2021): squared error weighted by squared task-loss gradients."""

    name = "fisher_diag"
    extra_keys = ("grad",)

    @dataclass(frozen=True)
    class Config:
        damping: float = 1.0

    def capture_extras(self, run: Any, unit: Any) -> dict[str, torch.Tensor]:
        return {"grad": capture_output_gradients(run, unit, self.config.damping)}

    def __call__(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        grad = context.extras["grad"]
        err = (output - target).square() * grad.square()
        if err.dim() == 3:
            return err.sum(-1).mean()
        return err.sum(1).mean() if err.dim() > 1 else err.mean()


OFFICIAL = {"recon.iters": 20000, "recon.batch_size": 32, "calib.num_samples": 1024, "recon.act_iters": 5000}

BRECQ = RecipeSpec(
    name="brecq",
    extends="adaround",
    description="BRECQ: AdaRound rounding, block reconstruction, Fisher-diagonal loss, steps learned in a second pass",
    overrides={
        "scheduler.name": "block",
        "loss.name": "fisher_diag",
        "activation_policy.name": "quantized",
        "recon.order": "weights_first",
        "recon.learn_act_step": True,
        "recon.act_lr": 4e-4,
        **OFFICIAL,
    },
    presets={
        "official": OFFICIAL,
        "official-mobilenetv2": {**OFFICIAL, "rounding.options.reg_weight": 0.1},
        "cpu-fast": {"recon.iters": 2000, "recon.act_iters": 500, "calib.num_samples": 512},
    },
    source="Li et al., 'BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction', ICLR 2021",
)


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(FisherDiagLoss)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(BRECQ)
