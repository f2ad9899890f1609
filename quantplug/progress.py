"""Progress bars for long work (tqdm on stderr; QUANTPLUG_PROGRESS=0 turns them off; rank 0 only)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

from quantplug.distributed import is_main_process

T = TypeVar("T")


def progress_enabled() -> bool:
    """On unless QUANTPLUG_PROGRESS=0, and only on rank 0 of a data-parallel run."""
    return os.environ.get("QUANTPLUG_PROGRESS", "1") not in ("0", "false", "no") and is_main_process()


def progress_bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
