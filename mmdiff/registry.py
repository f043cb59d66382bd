"""A tiny name -> factory registry shared by every swappable component family.

Each family (schedules, remasking scores, transfer rules, vision encoders, adapters, ...)
owns one :class:`Registry`; ``build_x(cfg)`` functions look names up here.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; rejects duplicates and unknown names with a clear message.

    Args:
        kind: human-readable family name used in error messages ("schedule", "adapter", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise a ValueError listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise ValueError(f"Unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
