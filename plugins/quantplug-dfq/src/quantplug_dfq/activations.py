"""Per-channel clipped ReLU and the clipped-normal expectation DFQ's analytic bias correction needs.

Cross-layer equalization scales output channel ``j`` of a layer by ``1 / s_j``. ReLU commutes with a
positive scale (``relu(z / s) = relu(z) / s``); ReLU6 does not, because its clip at 6 would have to
move to ``6 / s_j``. ``ChannelClip`` is that activation: ``clamp(x, 0, upper_j)`` per channel, which
replaces a ReLU6 whose thresholds then follow the equalization exactly (``upper = inf`` is a ReLU).

A saved run holds the clips' thresholds but not the module replacement: the ``float`` passes record where
the clips are (``channel_clips``) and ``rebuild_channel_clips`` puts them back before the state is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quantplug.errors import ArtifactError
from quantplug.modules import set_submodule


class ChannelClip(nn.Module):
    """``clamp(x, 0, upper[c])`` along the channel dimension (``channel_dim``: 1 after a convolution, -1 after
    a Linear layer, whose features are the last dimension).

    Replaces a ReLU6 (``upper = 6``) so that cross-layer equalization and bias absorption can move the
    upper threshold with each channel (Nagel et al., "Data-Free Quantization Through Weight Equalization
    and Bias Correction", ICCV 2019, Sec. 4.1: ReLU6 is not scale-equivariant; the paper and AIMET replace
    it with ReLU instead, which changes the function).
    """

    def __init__(self, upper: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("upper", upper.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim % x.dim()
        shape = [1] * x.dim()
        shape[dim] = -1
        upper = self.upper.to(x.dtype).reshape(shape)
        return torch.minimum(torch.clamp(x, min=0.0), upper)

    def extra_repr(self) -> str:
        finite = torch.isfinite(self.upper)
        if not bool(finite.any()):
            return f"channels={self.upper.numel()}, upper=inf"
        return f"channels={self.upper.numel()}, upper in [{float(self.upper[finite].min()):.3g}, " \
               f"{float(self.upper[finite].max()):.3g}]"


def channel_clips(model: nn.Module) -> dict[str, dict[str, int]]:
    """Every ``ChannelClip`` of ``model``: ``{name: {"channels": n, "channel_dim": d}}`` (JSON-able)."""
    return {name: {"channels": int(m.upper.numel()), "channel_dim": int(m.channel_dim)}
            for name, m in model.named_modules() if isinstance(m, ChannelClip)}


def rebuild_channel_clips(model: nn.Module, record: Mapping[str, Mapping[str, Any]]) -> int:
    """Replace each module named in ``record`` (a ``channel_clips`` result) by a ``ChannelClip`` of that shape,
    thresholds ``inf`` until the saved state is loaded; modules that already are one stay. Returns how many
    were replaced."""
    replaced = 0
    for name, entry in record.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ArtifactError(f"the run records a per-channel clip at {name!r}, which the model does not have; "
                                "the run comes from another model or version: re-run `quantplug apply`") from exc
        if isinstance(module, ChannelClip):
            continue
        upper = torch.full((int(entry["channels"]),), math.inf)
        set_submodule(model, name, ChannelClip(upper, int(entry["channel_dim"])))
        replaced += 1
    return replaced


def _phi(x: torch.Tensor) -> torch.Tensor:
    """Standard normal density."""
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal cumulative distribution."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, upper: torch.Tensor | float = math.inf) -> torch.Tensor:
    """``E[clamp(z, 0, upper)]`` for ``z ~ N(mean, std^2)``, element-wise.

    With ``a = -mean / std`` and ``b = (upper - mean) / std``:
    ``E = mean (Phi(b) - Phi(a)) + std (phi(a) - phi(b)) + upper (1 - Phi(b))``. For ``upper = inf``
    this is DFQ's ReLU formula (Nagel et al., ICCV 2019, Eq. 13): ``mean (1 - Phi(a)) + std phi(a)``.
    A zero ``std`` gives ``clamp(mean, 0, upper)``.
    """
    mean = mean.double()
    std = std.double().abs()
    upper_t = torch.as_tensor(upper, dtype=torch.float64).expand_as(mean)
    degenerate = std <= 0
    safe_std = torch.where(degenerate, torch.ones_like(std), std)
    a = -mean / safe_std
    finite = torch.isfinite(upper_t)
    b = torch.where(finite, (upper_t - mean) / safe_std, torch.full_like(mean, math.inf))
    cdf_b = torch.where(finite, _cdf(b), torch.ones_like(b))
    phi_b = torch.where(finite, _phi(b), torch.zeros_like(b))
    upper_term = torch.where(finite, upper_t * (1.0 - cdf_b), torch.zeros_like(b))
    value = mean * (cdf_b - _cdf(a)) + safe_std * (_phi(a) - phi_b) + upper_term
    exact = torch.minimum(torch.clamp(mean, min=0.0), upper_t)
    return torch.where(degenerate, exact, value).float()
