"""Unit input / output cache: CPU fp32, CPU fp16, or disk-backed, with a memory estimate up front."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

BYTES = {"cpu": 4, "fp16": 2, "disk": 4}


class TensorCache:
    """``num`` samples of one per-sample shape. ``read(idx)`` returns float32 on the requested device.

    * ``cpu``: float32 in RAM; ``fp16``: float16 in RAM (half the bytes);
    * ``disk``: float32 memory-mapped file under ``directory`` (RAM use stays flat as ``num`` grows).
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
        shape = (num, *self.sample_shape)
        self._dir: str | None = None
        if mode == "disk":
            self._dir = tempfile.mkdtemp(prefix="quantplug-cache-", dir=directory)
            path = os.path.join(self._dir, "cache.f32")
            self._array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            self._tensor = torch.from_numpy(self._array)
        else:
            store = torch.float16 if mode == "fp16" else torch.float32
            self._tensor = torch.empty(shape, dtype=self.integer_dtype or store)

    @property
    def nbytes(self) -> int:
        return self.num * math.prod(self.sample_shape) * self._tensor.element_size()

    def write(self, start: int, values: torch.Tensor) -> None:
        self._tensor[start : start + values.shape[0]] = values.detach().to("cpu", self._tensor.dtype)

    def read(self, index: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
        out = self._tensor[index]
        return out.to(device=device, dtype=self.integer_dtype or torch.float32, non_blocking=True)

    def close(self) -> None:
        self._tensor = torch.empty(0)
        if self._dir is not None:
            self._array = None  # type: ignore[assignment]
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
