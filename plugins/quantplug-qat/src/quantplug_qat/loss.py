"""The fine-tuning objective: the adapter's task loss, optionally mixed with distillation from the FP model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def distillation_loss(q_logits: torch.Tensor, fp_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(fp / T) || softmax(q / T))`` over the last dimension, averaged over the rest.

    Knowledge distillation (Hinton, Vinyals, Dean, 2015); the ``T^2`` factor keeps gradient magnitudes
    comparable across temperatures.
    """
    log_q = F.log_softmax(q_logits / temperature, dim=-1)
    log_p = F.log_softmax(fp_logits.detach() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * temperature**2


def qat_loss(adapter: Any, outputs: torch.Tensor, targets: Any, fp_outputs: torch.Tensor | None,
             distill: float, temperature: float) -> torch.Tensor:
    """``(1 - distill) * task_loss + distill * distillation_loss``."""
    total: torch.Tensor | None = None
    if distill < 1.0:
        total = (1.0 - distill) * adapter.task_loss(outputs, targets)
    if distill > 0.0:
        assert fp_outputs is not None
        kd = distill * distillation_loss(outputs, fp_outputs, temperature)
        total = kd if total is None else total + kd
    assert total is not None
    return total
