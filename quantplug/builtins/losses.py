"""Built-in reconstruction loss: Lp / MSE; the softmax KL divergence that PD-Quant and NWQ build on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantplug.hookspecs import hookimpl
from quantplug.interfaces import LossContext, ReconstructionLoss


def softmax_kl(q_logits: torch.Tensor, fp_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(fp / T) || softmax(q / T))`` summed over classes, averaged over the batch: PyTorch's
    ``KLDivLoss(reduction="batchmean")(log_softmax(q / T), softmax(fp / T))``, as PD-Quant's official code.

    Classes are dimension 1 (``[B, classes]``); for token logits ``[B, T, vocab]`` the last dimension.
    """
    dim = -1 if q_logits.dim() == 3 else 1
    log_q = F.log_softmax(q_logits / temperature, dim=dim)
    log_p = F.log_softmax(fp_logits.to(q_logits.dtype) / temperature, dim=dim)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / q_logits.shape[0]


class LpLoss(ReconstructionLoss):
    """|output - target|^p summed over the channel (feature) dimension and averaged over the rest.

    This is BRECQ / QDrop's ``lp_loss`` with ``reduction='none'``: ``(pred - tgt).abs().pow(p).sum(1).mean()``
    (dimension 1 is the channel of a conv output, the feature of a linear output [B, F]; for token
    outputs [B, T, F] the last dimension is summed). ``reduction='mean'`` is the plain element mean.
    """

    name = "mse"

    @dataclass(frozen=True)
    class Config:
        p: float = 2.0
        reduction: str = "channel_sum"  # channel_sum (BRECQ lp_loss) | mean (element mean)

    def __call__(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        diff = (output - target).abs()
        err = diff.square() if self.config.p == 2.0 else diff.pow(self.config.p)
        if self.config.reduction == "mean":
            return err.mean()
        if err.dim() == 3:  # [batch, tokens, features]
            return err.sum(-1).mean()
        return err.sum(1).mean() if err.dim() > 1 else err.mean()


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(LpLoss)
