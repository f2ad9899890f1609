"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, Sec. 4.1).

For a pair ``y = W2 f(W1 x + b1) + b2`` with ``f`` positive-scale equivariant (ReLU, or the identity),
scaling output channel ``j`` of layer 1 by ``1 / s_j`` and input channel ``j`` of layer 2 by ``s_j``
keeps the function. With ``r1_j`` the range (``max |W1|``) of output channel ``j`` and ``r2_j`` the range
of input channel ``j`` of layer 2, ``s_j = sqrt(r1_j * r2_j) / r2_j`` makes both ranges
``sqrt(r1_j * r2_j)``, which maximizes the per-tensor precision of the pair. Pairs that share a layer
(MobileNetV2's expand -> depthwise -> project) are equalized in turn, sweep after sweep, until no scale
differs from 1 by more than ``tolerance`` (the ranges stop changing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import ModelPass, PassContext
from quantplug.modules import set_submodule
from quantplug_dfq.activations import ChannelClip, channel_clips, rebuild_channel_clips
from quantplug_dfq.bn_stats import bn_stats, scale_entry
from quantplug_dfq.graph import (
    Link,
    batch_runner,
    find_links,
    input_index,
    replace_with_channel_clip,
    scale_pair,
)

logger = logging.getLogger(__name__)

RANGE_EPS = 1e-12
RELU6_MODES = ("clip", "relu", "skip")


# ------------------------------------------------------------------------------------------ maths
def producer_ranges(layer: nn.Module) -> torch.Tensor:
    """``max |W|`` of every output channel, ``[out]``."""
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def consumer_ranges(layer: nn.Module) -> torch.Tensor:
    """``max |W|`` over the weights reading each input channel, ``[in]`` (grouped / depthwise convs too)."""
    w = layer.weight.detach()
    per_column = w.abs().reshape(w.shape[0], w.shape[1], -1).amax(2)  # [out, in / groups]
    index = input_index(layer)
    num_in = int(index.max()) + 1
    ranges = torch.zeros(num_in, dtype=w.dtype, device=w.device)
    return ranges.scatter_reduce(0, index.reshape(-1), per_column.reshape(-1), reduce="amax", include_self=True)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s = sqrt(r1 * r2) / r2`` per channel; 1 where either range is zero (a dead channel)."""
    live = (r1 > RANGE_EPS) & (r2 > RANGE_EPS)
    safe_r2 = torch.where(live, r2, torch.ones_like(r2))
    s = torch.sqrt(r1 * safe_r2) / safe_r2
    return torch.where(live, s, torch.ones_like(s))


def per_tensor_precision(layer: nn.Module) -> float:
    """Mean over output channels of ``range_c / range_tensor`` (DFQ's Fig. 2 measure; 1 is ideal)."""
    r = producer_ranges(layer)
    top = float(r.max())
    return float((r / top).mean()) if top > 0 else 1.0


def equalize_links(model: nn.Module, links: Sequence[Link], clips: dict[str, ChannelClip | None],
                   max_sweeps: int, tolerance: float) -> tuple[int, float]:
    """Equalize every link in turn until no scale moves by more than ``tolerance``: ``(sweeps, last change)``."""
    stats = bn_stats(model)
    change = math.inf
    sweeps = 0
    while sweeps < max_sweeps and change > tolerance:
        sweeps += 1
        change = 0.0
        for link in links:
            producer, consumer = model.get_submodule(link.producer), model.get_submodule(link.consumer)
            scales = equalization_scales(producer_ranges(producer), consumer_ranges(consumer))
            change = max(change, float((scales - 1).abs().max()))
            scale_pair(producer, consumer, scales, clips.get(link.producer))
            if link.producer in stats:
                scale_entry(stats[link.producer], scales)
    return sweeps, change


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 1.0


def restore_unscaled_activations(model: nn.Module, originals: dict[str, nn.Module]) -> list[str]:
    """Put back each replaced ReLU6 / ``Hardtanh(0, u)`` whose per-channel clip still holds ``u`` on every
    channel (every scale was exactly 1): the clip would change nothing but the saved model's layout."""
    restored: list[str] = []
    for name, original in originals.items():
        clip = model.get_submodule(name)
        if isinstance(clip, ChannelClip) and isinstance(original, nn.Hardtanh) and bool(
                (clip.upper == float(original.max_val)).all()):
            set_submodule(model, name, original)
            restored.append(name)
    return restored


# ------------------------------------------------------------------------------------------ pass
class EqualizePass(ModelPass):
    """Cross-layer equalization (Nagel et al., ICCV 2019): equal per-channel weight ranges across layer pairs.

    Stage ``float``: runs on the BN-folded model before the full-precision reference is copied. Equalizes
    every exclusive ``conv/linear -> [ReLU | ReLU6 | none] -> conv/linear`` pair of the graph (see
    ``quantplug_dfq.graph``), depthwise convolutions included. ReLU6 (``relu6``): ``clip`` replaces it by
    a per-channel clip whose thresholds follow the scales (the function is unchanged), ``relu`` replaces it
    by ReLU as the paper and AIMET do (the function changes where activations exceeded 6), ``skip`` leaves
    such pairs alone.
    """

    name = "equalize"
    stage = "float"

    @dataclass(frozen=True)
    class Config:
        relu6: str = "clip"  # clip | relu | skip
        through_identity: bool = True  # also equalize pairs with no activation in between (a linear map)
        max_sweeps: int = 1000
        tolerance: float = 1e-6  # stop once every scale is within this of 1

    def __init__(self, config: EqualizePass.Config | None = None) -> None:
        super().__init__(config)
        if self.config.relu6 not in RELU6_MODES:
            raise ConfigError(f"equalize: relu6 must be one of {', '.join(RELU6_MODES)}; got {self.config.relu6!r}")
        if self.config.max_sweeps < 1 or not self.config.tolerance > 0:
            raise ConfigError("equalize: max_sweeps must be >= 1 and tolerance > 0")

    def select(self, model: nn.Module, links: Sequence[Link], originals: dict[str, nn.Module] | None = None
               ) -> tuple[list[Link], dict[str, ChannelClip | None], list[dict[str, str]]]:
        """The links to equalize, the per-channel clips they carry, and the skipped links with reasons.
        ``originals`` receives each activation module replaced by a clip (by name)."""
        chosen: list[Link] = []
        clips: dict[str, ChannelClip | None] = {}
        skipped: list[dict[str, str]] = []
        originals = {} if originals is None else originals

        def skip(link: Link, reason: str) -> None:
            skipped.append({"producer": link.producer, "consumer": link.consumer, "reason": reason})

        for link in links:
            if not link.exclusive:
                skip(link, link.reason or "the producer's output has other users")
                continue
            if link.activation == "identity" and not self.config.through_identity:
                skip(link, "no activation in between (through_identity=false)")
                continue
            clip: ChannelClip | None = None
            if link.activation in ("relu6", "channel_clip"):
                if self.config.relu6 == "skip":
                    skip(link, "ReLU6 (relu6=skip)")
                    continue
                original = model.get_submodule(link.activation_module) if link.activation_module else None
                clip = replace_with_channel_clip(model, link)
                if clip is None:
                    skip(link, "ReLU6 that is functional or shared cannot be replaced")
                    continue
                if original is not None and original is not clip and link.activation_module is not None:
                    originals[link.activation_module] = original
                if self.config.relu6 == "relu":
                    clip.upper.fill_(math.inf)
            chosen.append(link)
            clips[link.producer] = clip
        return chosen, clips, skipped

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        links = find_links(model, batch_runner(ctx))
        originals: dict[str, nn.Module] = {}
        chosen, clips, skipped = self.select(model, links, originals)
        producers = sorted({link.producer for link in chosen})
        before = {n: per_tensor_precision(model.get_submodule(n)) for n in producers}
        sweeps, change = equalize_links(model, chosen, clips, self.config.max_sweeps, self.config.tolerance)
        after = {n: per_tensor_precision(model.get_submodule(n)) for n in producers}
        restored = restore_unscaled_activations(model, originals)
        converged = change <= self.config.tolerance
        if not converged:
            logger.warning("equalization stopped after %d sweeps with scales still moving by %.3g", sweeps, change)
        logger.info("equalized %d layer pairs in %d sweeps", len(chosen), sweeps)
        return {
            "pairs": [[link.producer, link.consumer, link.activation] for link in chosen],
            "skipped": skipped,
            "sweeps": sweeps,
            "last_change": change,
            "converged": converged,
            "relu6": self.config.relu6,
            "replaced_activations": len(originals) - len(restored),
            "graph": chosen[0].source if chosen else (links[0].source if links else "none"),
            "precision_before": _mean(before),
            "precision_after": _mean(after),
            "channel_clips": channel_clips(model),
        }

    def rebuild(self, model: nn.Module, summary: Mapping[str, Any]) -> None:
        """Put the per-channel clips of a saved run back (their thresholds come with the saved state)."""
        rebuild_channel_clips(model, summary.get("channel_clips") or {})
