"""Bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019, Sec. 4.2).

Quantization error is biased: ``E[W_q x_q] != E[W x]``, and the shift in each output channel's mean travels
through the network. Correcting the bias of a layer by the expected error restores the mean:

* empirical: ``b_q <- b_q + E[y_fp] - E[y_q]`` per output channel, where ``y_fp`` is the layer's output in
  the full-precision model and ``y_q`` in the quantized model (``E[W x] - E[W_q x_q]``, input quantization
  and the errors of earlier layers included), averaged over the calibration data (batch and positions).
  Layers are corrected in forward order, each measured after the ones before it were corrected.
* analytic (data-free): ``b_q <- b_q - (W_q - W) E[x]`` with ``E[x]`` from the folded BatchNorm of the layer
  that produces ``x``: its pre-activation is ``N(beta, gamma^2)``, so after a ReLU ``E[x]`` is the mean of a
  clipped normal, ``beta (1 - Phi(-beta / gamma)) + gamma phi(-beta / gamma)`` (Eq. 13; ReLU6: clipped at 6
  too). Only weight error is corrected, and only layers whose input comes from one BN-folded layer through
  a ReLU-like activation, nothing, or an average pool (see ``quantplug_dfq.graph``), and that are called on
  that input only. Zero padding is ignored: every kernel tap is taken to read ``E[x]``, though at the border
  a padded convolution's taps read 0 (on small feature maps a large share of the reads; see the README).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError, DataError
from quantplug.interfaces import ModelPass, PassContext
from quantplug.modules import QuantLayer, quant_layers
from quantplug.tensors import to_device as _to_device
from quantplug_dfq.activations import ChannelClip, clipped_normal_mean
from quantplug_dfq.bn_stats import bn_stats, distribution
from quantplug_dfq.graph import CONSUMER_CALLED_TWICE, Link, find_links, input_index

logger = logging.getLogger(__name__)

MODES = ("empirical", "analytic")


class _Stop(Exception):
    """Raised by a forward hook once the layer of interest has run."""


def _channel_dim(layer: nn.Module, output: torch.Tensor) -> int:
    return 1 if (layer.weight.dim() == 4 and output.dim() >= 2) else output.dim() - 1


def channel_means(layer: nn.Module, output: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over everything but the channel dimension, and the number of values summed per channel."""
    dim = _channel_dim(layer, output)
    moved = output.detach().movedim(dim, -1).reshape(-1, output.shape[dim])
    return moved.double().sum(0), moved.shape[0]


@torch.no_grad()
def output_means(model: nn.Module, names: Sequence[str], batches: Iterable[Any], adapter: Any,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-channel mean output of every layer in ``names`` over ``batches``, and the order they ran in."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    order: list[str] = []
    handles = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            s, n = channel_means(module, output)
            if name not in sums:
                order.append(name)
                sums[name], counts[name] = s, 0
            else:
                sums[name] += s
            counts[name] += n

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
    try:
        for inputs in batches:
            adapter.forward(model, _to_device(inputs, device))
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / max(counts[n], 1)).float() for n in sums}, order


@torch.no_grad()
def layer_output_mean(model: nn.Module, name: str, batches: Iterable[Any], adapter: Any,
                      device: torch.device) -> torch.Tensor:
    """Per-channel mean output of one layer, stopping each forward pass right after it."""
    total: torch.Tensor | None = None
    count = 0

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        nonlocal total, count
        s, n = channel_means(module, output)
        total = s if total is None else total + s
        count += n
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        for inputs in batches:
            try:
                adapter.forward(model, _to_device(inputs, device))
            except _Stop:
                continue
    finally:
        handle.remove()
    if total is None:
        raise DataError(f"layer {name!r} never ran on the calibration data; bias correction cannot measure it")
    return (total / max(count, 1)).float()


@torch.no_grad()
def correct_empirically(model: nn.Module, fp_model: nn.Module, layers: Sequence[str], batches: Sequence[Any],
                        adapter: Any, device: torch.device) -> dict[str, float]:
    """Sequential empirical correction (module docstring); returns the mean |correction| per layer."""
    fp_means, order = output_means(fp_model, layers, batches, adapter, device)
    done: dict[str, float] = {}
    for name in order:
        layer = model.get_submodule(name)
        delta = fp_means[name].to(layer.bias.device) - layer_output_mean(model, name, batches, adapter, device)
        layer.bias.add_(delta.to(layer.bias.dtype))
        done[name] = float(delta.abs().mean())
    return done


def expected_input(model: nn.Module, link: Link, stats: dict[str, Any]) -> torch.Tensor | None:
    """``E[x]`` of the consumer's input channels from the producer's BN statistics, or None if unknown."""
    if link.producer not in stats or link.pool_before_activation:
        return None
    mean, std = distribution(stats[link.producer])
    if link.activation == "identity":
        return mean
    if link.activation == "relu":
        return clipped_normal_mean(mean, std)
    if link.activation == "relu6" and link.upper is not None:
        return clipped_normal_mean(mean, std, link.upper)
    if link.activation == "channel_clip" and link.activation_module is not None:
        clip = model.get_submodule(link.activation_module)
        if isinstance(clip, ChannelClip):
            return clipped_normal_mean(mean, std, clip.upper.detach().cpu().double())
    return None


@torch.no_grad()
def analytic_correction(layer: QuantLayer, expected: torch.Tensor) -> torch.Tensor:
    """``E[(W_q - W) x] = (W_q - W) E[x]`` per output channel (kernel positions summed, padding ignored)."""
    error = (layer.quantized_weight() - layer.weight).detach()
    per_column = error.reshape(error.shape[0], error.shape[1], -1).sum(2)  # [out, in / groups]
    return (per_column * expected.to(error.device, error.dtype)[input_index(layer)]).sum(1)


class BiasCorrectionPass(ModelPass):
    """Bias correction (Nagel et al., ICCV 2019): remove the mean shift quantization puts in each layer's output.

    Stage ``quantized``, after calibration and reconstruction. ``mode``: ``empirical`` (calibration data,
    ``E[W x] - E[W_q x_q]``, layer after layer in forward order) or ``analytic`` (no data: BN statistics and
    the clipped-normal mean of a ReLU's output). Layers without a bias are left alone (adding one would
    change the saved model's layout).
    """

    name = "bias-correct"
    stage = "quantized"

    @dataclass(frozen=True)
    class Config:
        mode: str = "empirical"  # empirical | analytic

    def __init__(self, config: BiasCorrectionPass.Config | None = None) -> None:
        super().__init__(config)
        if self.config.mode not in MODES:
            raise ConfigError(f"bias-correct: mode must be one of {', '.join(MODES)}; got {self.config.mode!r}")

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        model.eval()
        layers = [(n, m) for n, m in quant_layers(model) if m.bias is not None]
        without_bias = [n for n, m in quant_layers(model) if m.bias is None]
        if self.config.mode == "empirical":
            if not ctx.calib_inputs:
                raise DataError("empirical bias correction needs calibration data; use mode=analytic without data")
            corrected = correct_empirically(model, ctx.fp_model, [n for n, _ in layers], ctx.calib_inputs,
                                            ctx.adapter, ctx.device)
            skipped = {n: "no bias" for n in without_bias}
        else:
            corrected, skipped = self._analytic(model, layers)
            skipped.update({n: "no bias" for n in without_bias})
        for _, layer in quant_layers(model):
            layer.invalidate_cache()
        logger.info("bias correction (%s): %d layers corrected", self.config.mode, len(corrected))
        return {"mode": self.config.mode, "corrected": corrected, "skipped": skipped}

    def _analytic(self, model: nn.Module, layers: Sequence[tuple[str, QuantLayer]]
                  ) -> tuple[dict[str, float], dict[str, str]]:
        stats = bn_stats(model)
        by_consumer = {link.consumer: link for link in find_links(model)}
        corrected: dict[str, float] = {}
        skipped: dict[str, str] = {}
        for name, layer in layers:
            link = by_consumer.get(name)
            if not layer.quantizes_weight:
                skipped[name] = "weights not quantized"
                continue
            if link is not None and link.reason == CONSUMER_CALLED_TWICE:
                skipped[name] = "the layer is called on several inputs, whose means differ"
                continue
            expected = expected_input(model, link, stats) if link is not None else None
            if expected is None:
                skipped[name] = "input does not come from a BN-folded layer through a known activation"
                continue
            correction = analytic_correction(layer, expected)
            layer.bias.sub_(correction.to(layer.bias.dtype))
            corrected[name] = float(correction.abs().mean())
        return corrected, skipped
