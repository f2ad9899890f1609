"""Evaluation: task metrics of a model over a data loader, and FP-versus-quantized comparison."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from quantplug.errors import DataError
from quantplug.interfaces import ModelAdapter
from quantplug.progress import progress_bar


def evaluate(model: nn.Module, adapter: ModelAdapter, batches: Iterable[Any], device: torch.device,
             desc: str = "evaluate") -> dict[str, float]:
    """The adapter's metrics of ``model`` over ``batches``; a :class:`DataError` when there is no sample."""
    return evaluate_together({"model": model}, adapter, batches, device, desc)["model"]


@torch.no_grad()
def evaluate_together(models: Mapping[str, nn.Module], adapter: ModelAdapter, batches: Iterable[Any],
                      device: torch.device, desc: str = "evaluate") -> dict[str, dict[str, float]]:
    """The adapter's metrics of each of ``models`` (name -> model) in one pass over ``batches``: every batch is
    read and prepared once (decoding a test set of images costs as much as a small model's forward)."""
    for model in models.values():
        model.eval()
    sums: dict[str, dict[str, float]] = {name: {} for name in models}
    batches_seen = 0
    for batch in progress_bar(batches, desc=desc, unit="batch"):
        inputs, targets = adapter.prepare_batch(batch, device)
        batches_seen += 1  # a data loader never yields an empty batch
        for name, model in models.items():
            outputs = adapter.forward(model, inputs)
            for key, value in adapter.metrics(outputs, targets).items():
                sums[name][key] = sums[name].get(key, 0.0) + value
    if batches_seen == 0:
        raise DataError("the test split is empty: there is nothing to evaluate; check --data (its test split) "
                        "and --eval-samples")
    return {name: adapter.finalize_metrics(model_sums) for name, model_sums in sums.items()}


def compare(fp: dict[str, float], quant: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{metric: {"fp": .., "quant": .., "delta": quant - fp}}`` for metrics both runs have."""
    return {k: {"fp": fp[k], "quant": quant[k], "delta": quant[k] - fp[k]} for k in fp if k in quant}
