"""Bias absorption (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019, Sec. 4.1, "Absorbing high biases").

For ``y = W2 r(W1 x + b1) + b2`` with ``r`` a ReLU (or a clip at ``u``), a vector ``c`` with
``W1 x + b1 >= c`` for (almost) every input gives ``r(W1 x + b1) = r(W1 x + b1 - c) + c``, so
``b1 <- b1 - c``, ``b2 <- b2 + W2 c`` (and ``u <- u - c``) keep the function while shrinking the activation
range that must be quantized. From the folded BatchNorm, the pre-activation of channel ``j`` is
``N(beta_j, gamma_j^2)``; the paper takes ``c = max(0, beta - 3 gamma)`` (3 standard deviations: about
0.13% of the values fall below ``c`` and are changed).

``W2 c`` is exact only when the consumer sees no zero padding (a padded border would read the shifted
value ``-c`` instead of 0), so only pairs whose consumer is a Linear or an unpadded convolution are
absorbed, and only exclusive pairs (see ``quantplug_dfq.graph``) whose layers both have a bias. A pair with
``c = 0`` on every channel is left as it is: in particular its ReLU6 is not replaced by a per-channel clip.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import ModelPass, PassContext
from quantplug_dfq.activations import ChannelClip, channel_clips, rebuild_channel_clips
from quantplug_dfq.bn_stats import bn_stats, distribution, shift_entry
from quantplug_dfq.graph import Link, batch_runner, find_links, input_index, replace_with_channel_clip

logger = logging.getLogger(__name__)


def absorbable_shift(mean: torch.Tensor, std: torch.Tensor, num_std: float,
                     upper: torch.Tensor | None = None) -> torch.Tensor:
    """``c = clamp(mean - num_std * std, 0, upper)``: the part of the activation that is (almost) always on."""
    c = torch.clamp(mean - num_std * std, min=0.0)
    return torch.minimum(c, upper.to(c.device)) if upper is not None else c


@torch.no_grad()
def absorb_shift(producer: nn.Module, consumer: nn.Module, shift: torch.Tensor, clip: ChannelClip | None) -> None:
    """``b1 -= c``, ``b2 += W2 c`` (summed over the kernel), ``u -= c``."""
    producer.bias.sub_(shift)
    w = consumer.weight
    per_column = w.reshape(w.shape[0], w.shape[1], -1).sum(2)  # [out, in / groups]
    consumer.bias.add_((per_column * shift[input_index(consumer)]).sum(1))
    if clip is not None:
        clip.upper.sub_(shift.to(clip.upper.device))


class AbsorbBiasPass(ModelPass):
    """Bias absorption (Nagel et al., ICCV 2019): move ``c = max(0, beta - 3 gamma)`` through ReLU into the next layer.

    Stage ``float``, after ``equalize`` (equalization can leave large biases behind). Data-free: uses the
    folded BatchNorm statistics, kept current by ``equalize``. Applies to exclusive ReLU / ReLU6 pairs
    whose consumer is unpadded (1x1 convolutions, Linear) and where some channel has ``c > 0``; a ReLU6 there
    becomes a per-channel clip whose threshold moves with ``c``. ``num_std`` is the paper's 3.
    """

    name = "absorb-bias"
    stage = "float"

    @dataclass(frozen=True)
    class Config:
        num_std: float = 3.0

    def __init__(self, config: AbsorbBiasPass.Config | None = None) -> None:
        super().__init__(config)
        if not self.config.num_std >= 0:
            raise ConfigError(f"absorb-bias: num_std must be >= 0; got {self.config.num_std}")

    def reason_to_skip(self, model: nn.Module, link: Link, stats: dict[str, Any]) -> str | None:
        if not link.exclusive:
            return link.reason or "the producer's output has other users"
        if link.activation not in ("relu", "relu6", "channel_clip"):
            return f"activation {link.activation} (absorption needs a ReLU-like lower bound at 0)"
        if link.consumer_padded:
            return "the consumer pads its input with zeros"
        if link.producer not in stats:
            return "no folded BatchNorm statistics for the producer"
        if model.get_submodule(link.producer).bias is None or model.get_submodule(link.consumer).bias is None:
            return "a layer without bias"
        return None

    @staticmethod
    def current_upper(model: nn.Module, link: Link) -> torch.Tensor | None:
        """The activation's upper threshold per channel (a scalar for ReLU6), None for ReLU."""
        if link.activation == "relu6" and link.upper is not None:
            return torch.tensor(link.upper)
        if link.activation == "channel_clip" and link.activation_module is not None:
            clip = model.get_submodule(link.activation_module)
            if isinstance(clip, ChannelClip):
                return clip.upper.detach()
        return None

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        stats = bn_stats(model)
        absorbed: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []

        def skip(link: Link, reason: str) -> None:
            skipped.append({"producer": link.producer, "consumer": link.consumer, "reason": reason})

        for link in find_links(model, batch_runner(ctx)):
            reason = self.reason_to_skip(model, link, stats)
            if reason is not None:
                skip(link, reason)
                continue
            upper = self.current_upper(model, link)
            if link.activation != "relu" and upper is None:
                skip(link, "ReLU6 that is functional or shared cannot be replaced")
                continue
            mean, std = distribution(stats[link.producer])
            shift = absorbable_shift(mean, std, self.config.num_std, upper)
            if not bool((shift > 0).any()):
                skip(link, f"nothing to absorb: beta - {self.config.num_std:g} gamma <= 0 on every channel")
                continue
            clip: ChannelClip | None = None
            if link.activation != "relu":
                clip = replace_with_channel_clip(model, link)
                if clip is None:
                    skip(link, "ReLU6 that is functional or shared cannot be replaced")
                    continue
            producer, consumer = model.get_submodule(link.producer), model.get_submodule(link.consumer)
            shift = shift.to(producer.bias.device, producer.bias.dtype)
            absorb_shift(producer, consumer, shift, clip)
            shift_entry(stats[link.producer], shift)
            absorbed.append({"producer": link.producer, "consumer": link.consumer,
                             "channels": int((shift > 0).sum()), "mean_shift": float(shift.mean())})
        logger.info("absorbed biases across %d layer pairs", len(absorbed))
        return {"absorbed": absorbed, "skipped": skipped, "num_std": self.config.num_std,
                "channel_clips": channel_clips(model)}

    def rebuild(self, model: nn.Module, summary: Mapping[str, Any]) -> None:
        """Put the per-channel clips of a saved run back (their thresholds come with the saved state)."""
        rebuild_channel_clips(model, summary.get("channel_clips") or {})
