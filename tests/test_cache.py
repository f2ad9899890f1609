"""The unit cache: every mode returns what was written; disk mode keeps its data in a file, not in memory."""

from __future__ import annotations

import os

import pytest
import torch

from quantplug.cache import TensorCache


def _filled(mode: str, tmp_path, values: torch.Tensor) -> TensorCache:  # type: ignore[no-untyped-def]
    cache = TensorCache(mode, values.shape[0], values.shape[1:], directory=str(tmp_path))
    for start in range(0, values.shape[0], 7):  # uneven batches, like a last partial calibration batch
        cache.write(start, values[start : start + 7])
    return cache


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_reads_return_what_was_written(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    values = torch.randn(30, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    cache = _filled(mode, tmp_path, values)
    idx = torch.tensor([29, 0, 5, 5, 17])  # random order with a repeat, as a shuffled batch may be
    assert torch.equal(cache.read(idx, torch.device("cpu")), values[idx])
    assert torch.equal(cache.read(slice(3, 19), torch.device("cpu")), values[3:19])
    assert torch.equal(cache.read(slice(0, 30, 4), torch.device("cpu")), values[0:30:4])
    assert torch.equal(cache.read(torch.tensor([-1]), torch.device("cpu")), values[-1:])
    assert cache.nbytes == 30 * 60 * 4
    cache.close()


def test_fp16_halves_bytes_and_rounds_to_half(tmp_path) -> None:  # type: ignore[no-untyped-def]
    values = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    cache = _filled("fp16", tmp_path, values)
    assert cache.nbytes == 10 * 8 * 2
    out = cache.read(slice(0, 10), torch.device("cpu"))
    assert out.dtype == torch.float32 and torch.equal(out, values.half().float())


def test_disk_cache_file_has_no_name_so_no_exit_leaves_it_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The file is unlinked as soon as it is open (SIGTERM or SIGKILL used to leave it and its directory)."""
    values = torch.randn(64, 16)
    cache = _filled("disk", tmp_path, values)
    assert list(tmp_path.iterdir()) == []  # nothing to clean up, even before close
    assert os.fstat(cache._fd).st_size == 64 * 16 * 4 and os.fstat(cache._fd).st_nlink == 0
    assert cache._tensor.numel() == 0  # nothing held in RAM besides the batch being read
    assert torch.equal(cache.read(slice(0, 64), torch.device("cpu")), values)
    cache.close()
    assert cache._fd is None


def test_disk_cache_reports_a_truncated_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = _filled("disk", tmp_path, torch.randn(8, 4))
    os.ftruncate(cache._fd, 16)
    with pytest.raises(OSError, match="ended early"):
        cache.read(slice(0, 8), torch.device("cpu"))
    with pytest.raises(IndexError):
        cache.read(torch.tensor([8]), torch.device("cpu"))
    with pytest.raises(IndexError):
        cache.write(6, torch.randn(3, 4))
    cache.close()


def test_fp16_cache_refuses_values_beyond_its_range(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from quantplug.errors import ConfigError

    cache = TensorCache("fp16", 4, (3,))
    cache.write(0, torch.tensor([[1.0, 65504.0, -3.0]]))  # the largest float16 is fine
    with pytest.raises(ConfigError, match=r"\(7e\+04\) exceeds float16's range.*recon.cache=cpu"):
        cache.write(1, torch.tensor([[1.0, 7e4, -3.0]]))  # would read back as inf
    cache.write(2, torch.tensor([[float("inf"), 0.0, 0.0]]))  # already infinite: not the cache's doing


def test_integer_inputs_are_kept_exactly_in_ram(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 50_000, (6, 12))
    cache = TensorCache("disk", 6, (12,), directory=str(tmp_path), dtype=torch.long)
    cache.write(0, ids)
    assert cache.mode == "cpu" and torch.equal(cache.read(slice(0, 6), torch.device("cpu")), ids)
