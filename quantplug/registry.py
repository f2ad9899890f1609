"""Per-session registries of components, one per kind, with helpful errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from quantplug.errors import DuplicateComponentError, UnknownComponentError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    provider: str


class Registry(Generic[T]):
    """Name -> component for one kind. Re-registering the same object is a no-op."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self.note = ""

    def register(self, obj: T, provider: str, name: str | None = None) -> None:
        name = name or getattr(obj, "name", "")
        if not name or not isinstance(name, str):
            raise DuplicateComponentError(f"{self.kind} {obj!r} from {provider!r} has no name; set a `name` attribute")
        existing = self._entries.get(name)
        if existing is not None:
            if existing.obj is obj:
                return
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered by two plugins: {existing.provider!r} and {provider!r}; "
                f"uninstall or disable one of them (QUANTPLUG_DISABLE_PLUGINS={provider})"
            )
        self._entries[name] = Entry(name, obj, provider)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (
            f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(known) or 'none'}. "
            f"If it comes from a plugin, install it: pip install quantplug-{name}.{self.note}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def by_provider(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for e in self:
            out.setdefault(e.provider, []).append(e.name)
        return out


def describe_entry(entry: Entry[Any]) -> dict[str, Any]:
    obj = entry.obj
    info: dict[str, Any] = obj.describe() if hasattr(obj, "describe") else {"name": entry.name}
    info["provider"] = entry.provider
    return info
