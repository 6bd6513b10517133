"""One registration mechanism for stages and formats: names to entries, a duplicate is an error, a failed lookup lists
the known names."""

from __future__ import annotations

from typing import Generic, TypeVar

from exporter.errors import ExportError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ExportError(f"{self.kind} '{name}'", "is not registered.", f"use one of: {', '.join(self.names())}.")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def values(self) -> list[T]:
        return [self._entries[name] for name in self.names()]
