"""Progress bars for long work: tqdm on stderr, rank 0 only, and only on a terminal unless forced.

``QUANTPLUG_PROGRESS=0`` turns them off, ``QUANTPLUG_PROGRESS=1`` forces them on (also when stderr is a
file or a pipe); unset, tqdm draws them only when stderr is a TTY, so logs stay free of bar updates.
The CLI's ``--quiet`` turns them off for the process (:func:`set_quiet`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

from quantplug.distributed import is_main_process

T = TypeVar("T")

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of this process off (``--quiet``), or back to the default."""
    global _quiet
    _quiet = quiet


def progress_enabled() -> bool | None:
    """False: no bars (--quiet, QUANTPLUG_PROGRESS=0, or not rank 0); True: bars forced on
    (QUANTPLUG_PROGRESS=1); None: bars only when stderr is a terminal (tqdm's own check)."""
    setting = os.environ.get("QUANTPLUG_PROGRESS", "").strip().lower()
    if _quiet or setting in _OFF or not is_main_process():
        return False
    if setting in _ON:
        return True
    return None


def progress_bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> Any:
    enabled = progress_enabled()
    kwargs.setdefault("disable", None if enabled is None else not enabled)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
