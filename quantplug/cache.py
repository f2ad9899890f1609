"""Unit input / output cache: CPU fp32, CPU fp16, or disk-backed, with a memory estimate up front."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from quantplug.errors import ConfigError

BYTES = {"cpu": 4, "fp16": 2, "disk": 4}


class TensorCache:
    """``num`` samples of one per-sample shape. ``read(idx)`` returns float32 on the requested device.

    * ``cpu``: float32 in RAM; ``fp16``: float16 in RAM (half the bytes);
    * ``disk``: float32 file under ``directory``, written and read with positional file I/O (``pwrite`` /
      ``pread``), never memory-mapped: only the batch being read is resident, so the process's memory stays
      flat as ``num`` grows (a memory map would count every touched page of the file as resident).
    """

    def __init__(
        self,
        mode: str,
        num: int,
        sample_shape: Sequence[int],
        directory: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not dtype.is_floating_point:
            mode = "cpu"  # token ids and other integer inputs are kept exactly
        self.mode = mode
        self.integer_dtype = None if dtype.is_floating_point else dtype
        self.num = num
        self.sample_shape = tuple(sample_shape)
        self._dir: str | None = None
        self._fd: int | None = None
        self._tensor = torch.empty(0)
        if mode == "disk":
            self._dir = tempfile.mkdtemp(prefix="quantplug-cache-", dir=directory)
            path = os.path.join(self._dir, "cache.f32")
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:  # only the descriptor is used: with the name gone, no exit (SIGTERM, SIGKILL) leaves the file behind
                os.unlink(path)
                os.rmdir(self._dir)
                self._dir = None
            except OSError:  # a platform that cannot remove an open file: removed by close()
                pass
            self._sample_bytes = math.prod(self.sample_shape) * 4
            os.ftruncate(self._fd, num * self._sample_bytes)
        else:
            store = torch.float16 if mode == "fp16" else torch.float32
            self._tensor = torch.empty((num, *self.sample_shape), dtype=self.integer_dtype or store)

    @property
    def nbytes(self) -> int:
        per_value = 4 if self.mode == "disk" else self._tensor.element_size()
        return self.num * math.prod(self.sample_shape) * per_value

    def write(self, start: int, values: torch.Tensor) -> None:
        if self._fd is None:
            stored = values.detach().to("cpu", self._tensor.dtype)
            if self.mode == "fp16" and not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(values).all()):
                raise ConfigError(
                    f"a cached value ({float(values.detach().abs().max()):.4g}) exceeds float16's range (65504): "
                    "use recon.cache=cpu (float32) or disk for this model")
            self._tensor[start : start + values.shape[0]] = stored
            return
        if start < 0 or start + values.shape[0] > self.num:
            raise IndexError(f"cache write of {values.shape[0]} samples at {start} outside 0..{self.num}")
        data = values.detach().to("cpu", torch.float32).contiguous().numpy()
        _write_all(self._fd, memoryview(data).cast("B"), start * self._sample_bytes)

    def read(self, index: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
        out = self._tensor[index] if self._fd is None else self._read_disk(index)
        return out.to(device=device, dtype=self.integer_dtype or torch.float32, non_blocking=True)

    def _read_disk(self, index: torch.Tensor | slice) -> torch.Tensor:
        assert self._fd is not None
        if isinstance(index, slice):
            start, stop, stride = index.indices(self.num)
            if stride == 1:
                buf = np.empty((max(stop - start, 0), *self.sample_shape), dtype=np.float32)
                _read_all(self._fd, memoryview(buf).cast("B"), start * self._sample_bytes)
                return torch.from_numpy(buf)
            rows = list(range(start, stop, stride))
        else:
            rows = [int(i) for i in torch.as_tensor(index).reshape(-1)]
        buf = np.empty((len(rows), *self.sample_shape), dtype=np.float32)
        view = memoryview(buf).cast("B")
        for k, row in enumerate(rows):
            if not -self.num <= row < self.num:
                raise IndexError(f"cache index {row} outside 0..{self.num - 1}")
            row %= self.num
            chunk = view[k * self._sample_bytes : (k + 1) * self._sample_bytes]
            _read_all(self._fd, chunk, row * self._sample_bytes)
        return torch.from_numpy(buf)

    def close(self) -> None:
        self._tensor = torch.empty(0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _read_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise OSError(f"cache file ended early at byte {offset}: was it truncated (disk full)?")
        buf, offset = buf[n:], offset + n


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
