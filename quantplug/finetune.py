"""Fine-tune chosen parameters of a quantized model with the task loss on the calibration batches.

The training step of methods that learn a few quantities after quantization with the network's own loss:
Deep Compression's centroid fine-tuning (Han et al., ICLR 2016), TTQ's scales (Zhu et al., ICLR 2017). Only
the given parameters are trained (every other parameter is frozen for the duration); the model runs in eval
mode (BatchNorm is folded; dropout stays off); the batch order of each epoch comes from a seeded generator.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import PassContext
from quantplug.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["FinetuneSummary", "calibration_task_loss", "finetune_task_loss"]


@dataclass
class FinetuneSummary:
    """What a fine-tuning did: mean calibration task loss before, after each epoch, steps and wall time."""

    loss_before: float
    epoch_losses: list[float] = field(default_factory=list)
    loss_after: float = math.nan
    steps: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"loss_before": self.loss_before, "epoch_losses": self.epoch_losses, "loss_after": self.loss_after,
                "steps": self.steps, "seconds": self.seconds}


def _batch_size(targets: Any) -> int:
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) else len(targets)


@torch.no_grad()
def calibration_task_loss(model: nn.Module, ctx: PassContext) -> float:
    """Mean task loss of ``model`` over the calibration batches (weighted by batch size)."""
    total, count = 0.0, 0
    for inputs, targets in zip(ctx.calib_inputs, ctx.calib_targets):
        x, y = ctx.adapter.prepare_batch((inputs, targets), ctx.device)
        n = _batch_size(y)
        total += float(ctx.adapter.task_loss(ctx.adapter.forward(model, x), y)) * n
        count += n
    return total / max(count, 1)


def finetune_task_loss(model: nn.Module, ctx: PassContext, param_groups: Sequence[Mapping[str, Any]], *,
                       epochs: int, desc: str = "fine-tune") -> FinetuneSummary:
    """Adam on ``param_groups`` (``{"params": [...], "lr": ...}``) for ``epochs`` passes over the calibration data.

    Each step is one calibration batch; the order of the batches is shuffled per epoch with ``ctx.seed``.
    """
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    if not ctx.calib_inputs:
        raise ConfigError("fine-tuning needs calibration data: set calib.num_samples > 0")
    groups = [dict(g) for g in param_groups if list(g["params"])]
    trainable = [p for g in groups for p in g["params"]]
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    summary = FinetuneSummary(loss_before=calibration_task_loss(model, ctx))
    if epochs == 0 or not trainable:
        summary.loss_after = summary.loss_before
        model.train(was_training)
        return summary
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(ctx.seed)
    n_batches = len(ctx.calib_inputs)
    bar = progress_bar(total=epochs * n_batches, desc=desc, unit="step")
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for i in torch.randperm(n_batches, generator=generator).tolist():
                x, y = ctx.adapter.prepare_batch((ctx.calib_inputs[i], ctx.calib_targets[i]), ctx.device)
                loss = ctx.adapter.task_loss(ctx.adapter.forward(model, x), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the task loss became {float(loss)} in epoch {epoch}; "
                                             "lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = _batch_size(y)
                total += float(loss.detach()) * n
                count += n
                summary.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
            summary.epoch_losses.append(total / max(count, 1))
            logger.info("%s: epoch %d/%d, calibration task loss %.4g", desc, epoch + 1, epochs,
                        summary.epoch_losses[-1])
        summary.loss_after = calibration_task_loss(model, ctx)
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(saved.get(id(p), p.requires_grad))
        model.train(was_training)
    summary.seconds = time.perf_counter() - t0
    return summary
