"""``apply`` evaluates the test set batch by batch: it never holds the whole test set in memory, and reads it once
for both models."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from quantplug.api import apply
from quantplug.builtins.testing_models import TinyModelAdapter
from quantplug.evaluate import evaluate
from quantplug.interfaces import DataSource
from quantplug.testing.data import synthetic_images

TEST_SAMPLES = 256


class LoggedDataset(Dataset):
    """A data set that writes ``"get"`` to ``log`` for every sample read."""

    def __init__(self, inner: Dataset, log: list[str]) -> None:
        self.inner, self.log = inner, log

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        self.log.append("get")
        return self.inner[index]


def test_apply_streams_the_test_set_and_keeps_the_metrics(session, fast, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []

    class LoggedData(DataSource):
        """Synthetic images; the test split logs every sample read."""

        name = "logged"
        prefixes = ("logged",)

        def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> Dataset:
            if split == "train":
                return synthetic_images(num_samples or 128, "train", seed)
            return LoggedDataset(synthetic_images(TEST_SAMPLES, "test", 0), log)

    forward = TinyModelAdapter.forward

    def logged_forward(self: TinyModelAdapter, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        log.append("forward")
        return forward(self, model, inputs)

    monkeypatch.setattr(TinyModelAdapter, "forward", logged_forward)
    session.data_sources.register(LoggedData, "test")
    result = apply("nearest", "testing:tiny-resnet", data="logged:x", session=session,
                   overrides={**fast, "weight.bits": 4, "activation.bits": 8})

    reads = log[log.index("get"):]
    batch = max(result.recipe.calib.batch_size, 64)
    assert batch < TEST_SAMPLES  # else streaming and materializing look the same
    # the first test batch is evaluated after reading one batch, not the whole set (the old code read 256)
    assert reads.index("forward") == batch
    assert reads.count("get") == TEST_SAMPLES  # read once: the fp and quantized models share each batch
    assert reads[batch:batch + 3] == ["forward", "forward", "get"]  # fp, quantized, then the next batch
    longest_run = max(len(run) for run in "".join("g" if e == "get" else " " for e in reads).split())
    assert longest_run == batch

    # the metrics are those of the whole test set held in memory
    monkeypatch.setattr(TinyModelAdapter, "forward", forward)
    adapter = session.adapter_for("testing:tiny-resnet")
    held = list(DataLoader(synthetic_images(TEST_SAMPLES, "test", 0), batch_size=batch))
    assert result.quant_metrics == evaluate(result.model, adapter, held, torch.device("cpu"))
    fp_model = adapter.fold_batchnorm(adapter.load("testing:tiny-resnet", device=torch.device("cpu")))
    assert result.fp_metrics == evaluate(fp_model, adapter, held, torch.device("cpu"))
    assert set(result.fp_metrics) == set(result.quant_metrics) == {"top1", "top5"}
