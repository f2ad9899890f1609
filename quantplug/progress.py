"""Progress bars for long work (tqdm on stderr; QUANTPLUG_PROGRESS=0 turns them off)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("QUANTPLUG_PROGRESS", "1") not in ("0", "false", "no")


def progress_bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
