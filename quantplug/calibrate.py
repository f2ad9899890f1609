"""Calibration: run observers over weights and over calibration activations to set scales."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quantplug.config import Recipe
from quantplug.errors import DataError
from quantplug.interfaces import ModelAdapter, Observer
from quantplug.modules import QuantLayer, quant_layers
from quantplug.progress import progress_bar
from quantplug.quantizer import to_rows

logger = logging.getLogger(__name__)


def calibrate_weights(model: nn.Module, session: Any, recipe: Recipe) -> None:
    for name, layer in quant_layers(model):
        if layer.weight_quantizer is None:
            continue
        if not bool(torch.isfinite(layer.weight).all()):
            raise DataError(f"layer {name!r} has NaN or inf weights: the model itself is broken (check the "
                            "checkpoint it was loaded from, or the training run that wrote it)")
        observer: Observer = session.make("observer", recipe.weight_observer, layer.weight_quantizer.spec)
        observer.observe(to_rows(layer.weight.detach(), layer.weight_quantizer.spec))
        scale, zp = observer.compute()
        layer.weight_quantizer.set_qparams(scale, zp)
        layer.invalidate_cache()


@torch.no_grad()
def calibrate_activations(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: Iterable[Any],
    session: Any,
    recipe: Recipe,
    device: torch.device,
    weights_quantized: bool = False,
) -> None:
    """Observe every layer's input with all quantization off (QDrop), or with only the activation
    quantizers off on a weight-quantized model (``weights_quantized``, BRECQ after its weight pass)."""
    layers = [(n, m) for n, m in quant_layers(model) if m.input_quantizer is not None]
    if not layers:
        return
    observers: dict[str, Observer] = {
        n: session.make("observer", recipe.activation_observer, m.input_quantizer.spec) for n, m in layers
    }
    handles = []

    def make_hook(name: str, layer: QuantLayer):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not torch.isfinite(x).all():
                raise DataError(
                    f"the input of layer {name!r} contains NaN or inf values during calibration: "
                    "check the calibration data and the model"
                )
            observers[name].observe(to_rows(x.detach(), layer.input_quantizer.spec), batch_size=x.shape[0])

        return hook

    with quantization_disabled(model, weights=not weights_quantized):
        for name, layer in layers:
            handles.append(layer.register_forward_pre_hook(make_hook(name, layer)))
        try:
            for batch in progress_bar(list(batches), desc="calibrate", unit="batch"):
                inputs, _ = adapter.prepare_batch(batch, device)
                adapter.forward(model, inputs)
        finally:
            for h in handles:
                h.remove()
    for name, layer in layers:
        scale, zp = observers[name].compute()
        layer.input_quantizer.set_qparams(scale, zp)


class quantization_disabled:
    """Context manager turning every activation quantizer, and (``weights=True``) every weight quantizer, off."""

    def __init__(self, model: nn.Module, weights: bool = True) -> None:
        self.model = model
        self.weights = weights
        self.saved: list[tuple[Any, bool]] = []

    def __enter__(self) -> nn.Module:
        for _, layer in quant_layers(self.model):
            for q in (layer.weight_quantizer if self.weights else None, layer.input_quantizer):
                if q is not None:
                    self.saved.append((q, q.enabled))
                    q.enabled = False
        return self.model

    def __exit__(self, *exc: object) -> None:
        for q, state in self.saved:
            q.enabled = state
        for _, layer in quant_layers(self.model):
            layer.invalidate_cache()
