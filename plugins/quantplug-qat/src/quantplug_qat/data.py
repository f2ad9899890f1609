"""Training batches for quantization-aware fine-tuning: the run's calibration set, or samples of a data spec."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from quantplug.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def calibration_dataset(inputs: Sequence[Any], targets: Sequence[Any], num_samples: int | None) -> Dataset:
    """The calibration batches as one dataset (tensor inputs), its first ``num_samples`` samples if given."""
    if not inputs:
        raise DataError("quantization-aware training has no calibration data; set the qat option `data`")
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ConfigError("the calibration inputs are not tensors (e.g. token dictionaries): set the qat option "
                          "`data` to a data spec so the fine-tuning data can be re-batched")
    x = torch.cat(list(inputs))
    if any(t is None for t in targets):
        y = torch.full((x.shape[0],), -1, dtype=torch.long)  # no labels: distillation only
    else:
        y = torch.cat([torch.as_tensor(t) for t in targets])
    if num_samples is not None:
        if num_samples > x.shape[0]:
            raise ConfigError(
                f"qat num_samples={num_samples} exceeds the {x.shape[0]} calibration samples; raise "
                "calib.num_samples or set the qat option `data` (e.g. fmnist:48) to draw training samples"
            )
        x, y = x[:num_samples], y[:num_samples]
    return TensorDataset(x, y)


def source_dataset(ctx: Any, spec: str, num_samples: int | None, seed: int) -> Dataset:
    """``num_samples`` training samples of ``spec`` (all of them when None), drawn with ``seed``; completed by
    the run's model adapter (e.g. a pretrained model's preprocessing) when the pass context names the model."""
    if ctx.model_id is not None:
        dataset = ctx.session.model_data(ctx.model_id, spec, "train", num_samples=num_samples, seed=seed,
                                         model_options=ctx.model_options)
    else:
        dataset = ctx.session.data_source_for(spec).load(spec, "train", num_samples=num_samples, seed=seed)
    logger.info("qat: %d training samples from %s", len(dataset), spec)  # type: ignore[arg-type]
    return dataset


def epoch_batches(dataset: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
    """One shuffled pass over ``dataset`` (the generator makes the order reproducible)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
    yield from loader
