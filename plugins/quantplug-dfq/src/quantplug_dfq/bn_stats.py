"""The output distribution DFQ assumes for a BN-folded layer, kept in step with equalization and absorption.

``quantplug.bn_fold`` keeps each folded BatchNorm on the model as ``model.quantplug_bn_stats[layer]``
(``mean``, ``var``, ``weight`` = gamma, ``bias`` = beta, ``eps``). DFQ (Nagel et al., ICCV 2019, Sec. 4.2)
models the folded layer's pre-activation output of channel ``c`` as ``N(beta_c, gamma_c^2)``. Scaling a
folded layer's output by ``1 / s`` (equalization) is the same as a BatchNorm with ``gamma / s`` and
``beta / s``; subtracting ``c`` from its bias (absorption) is ``beta - c``. The passes update the entry
accordingly, so later passes (absorption, analytic bias correction) see the statistics of the model as it
now is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Stats = dict[str, Any]


def bn_stats(model: nn.Module) -> dict[str, Stats]:
    """The folded BatchNorm statistics of ``model`` by layer name (empty when none were folded)."""
    return getattr(model, "quantplug_bn_stats", {}) or {}


def distribution(entry: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the folded layer's output per channel: ``(beta, |gamma|)``."""
    mean_ref = entry["mean"]
    beta = entry["bias"] if entry.get("bias") is not None else torch.zeros_like(mean_ref)
    gamma = entry["weight"] if entry.get("weight") is not None else torch.ones_like(mean_ref)
    return beta.detach().float(), gamma.detach().float().abs()


def scale_entry(entry: Stats, scales: torch.Tensor) -> None:
    """The layer's output channels were divided by ``scales``."""
    beta, _ = distribution(entry)
    gamma = entry["weight"] if entry.get("weight") is not None else torch.ones_like(beta)
    entry["weight"] = gamma.detach().float() / scales.to(beta.device)
    entry["bias"] = beta / scales.to(beta.device)


def shift_entry(entry: Stats, shift: torch.Tensor) -> None:
    """``shift`` was subtracted from the layer's output channels (its bias)."""
    beta, _ = distribution(entry)
    if entry.get("weight") is None:
        entry["weight"] = torch.ones_like(beta)
    entry["bias"] = beta - shift.to(beta.device)
