"""Bad sample counts and bad files of the image data sources: clear errors, honest warnings."""

from __future__ import annotations

import logging

import pytest
import torch
from quantplug_torchvision.sources import TensorFileSource

from quantplug.errors import DataError


def _tensor_file(tmp_path, n_train: int, n_test: int = 4) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "data.pt"
    torch.save({"train": (torch.randn(n_train, 3, 8, 8), torch.zeros(n_train, dtype=torch.long)),
                "test": (torch.randn(n_test, 3, 8, 8), torch.zeros(n_test, dtype=torch.long))}, path)
    return f"tensors:{path}"


def test_fewer_calibration_samples_than_asked_warns_with_the_count_used(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    spec = _tensor_file(tmp_path, 40)
    with caplog.at_level(logging.WARNING, logger="quantplug_torchvision"):
        calib = TensorFileSource().load(spec, "train", num_samples=1000, seed=0)
    assert len(calib) == 40
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using 40" in warnings[0] and "1000" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantplug_torchvision"):
        assert len(TensorFileSource().load(spec, "train", num_samples=30, seed=0)) == 30
    assert not caplog.records  # enough samples: no warning


def test_empty_calibration_split_and_non_positive_counts_are_data_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="calibration .*split.* is empty"):
        TensorFileSource().load(_tensor_file(tmp_path, 0), "train", num_samples=16, seed=0)
    spec = _tensor_file(tmp_path, 40)
    for n in (0, -5):  # before: -5 silently gave 35 samples, 0 an empty set
        with pytest.raises(DataError, match="at least 1"):
            TensorFileSource().load(spec, "train", num_samples=n, seed=0)
        with pytest.raises(DataError, match="at least 1"):
            TensorFileSource().load(spec, "test", num_samples=n, seed=0)


class _NotATensor:
    pass


def test_an_unreadable_tensor_file_is_one_line_without_the_unsafe_advice(tmp_path) -> None:  # type: ignore[no-untyped-def]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file" * 8)
    pickled = tmp_path / "objects.pt"
    torch.save({"train": _NotATensor()}, pickled)
    saved = tmp_path / "ok.pt"
    torch.save({"train": (torch.zeros(2, 1), torch.zeros(2))}, saved)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:100])
    for path, reason in ((garbage, "Unsupported operand"), (pickled, "Unsupported global"),
                         (truncated, "failed reading zip archive")):
        with pytest.raises(DataError) as info:
            TensorFileSource().load(f"tensors:{path}", "train", num_samples=2, seed=0)
        text = str(info.value)
        assert "\n" not in text and reason in text and "weights_only" not in text
        assert len(text) - len(str(path)) < 350  # before: over 1000 characters of torch advice
        assert "torch.save({'train': (x, y), 'test': (x, y)})" in text
