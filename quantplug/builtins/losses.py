"""Built-in reconstruction loss: Lp / MSE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantplug.hookspecs import hookimpl
from quantplug.interfaces import LossContext, ReconstructionLoss


class LpLoss(ReconstructionLoss):
    """Mean over samples of the summed |output - target|^p (p = 2: BRECQ / QDrop's ``lp_loss``)."""

    name = "mse"

    @dataclass(frozen=True)
    class Config:
        p: float = 2.0
        reduction: str = "sample_sum"  # sample_sum (BRECQ) | mean (element mean)

    def __call__(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        diff = (output - target).abs()
        err = diff.square() if self.config.p == 2.0 else diff.pow(self.config.p)
        if self.config.reduction == "mean":
            return err.mean()
        return err.reshape(err.shape[0], -1).sum(1).mean()


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register(LpLoss)
