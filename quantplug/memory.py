"""Give the memory a finished reconstruction unit freed back to the operating system.

glibc's allocator keeps freed heap memory for reuse instead of returning it, and the tensors of the next unit
(other shapes) often cannot reuse it: resident memory then climbs from unit to unit although nothing is leaked
(QDrop on the zoo ResNet-18, 50 steps per unit: 836 -> 1 239 MiB over the run without trimming, 805 -> 862 MiB
with it). ``malloc_trim(0)`` returns the free pages; on CUDA the caching allocator's unused blocks are released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Callable

import torch

__all__ = ["release_freed_memory"]

logger = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory(device: torch.device | None = None) -> None:
    """Collect garbage, then hand free heap pages (and, on CUDA, cached blocks) back to the system."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
