"""Name → factory registries (methods, backbones, heads, augmentation recipes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of named entries; duplicate names and unknown names raise with the valid choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._extras: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **extras: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; ``extras`` (e.g. ``config=``) are kept beside it."""

        def deco(obj: T) -> T:
            self.add(name, obj, **extras)
            return obj

        return deco

    def add(self, name: str, obj: T, **extras: Any) -> None:
        """Register ``obj`` under ``name``; registering a name twice is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        self._extras[name] = extras

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(sorted(self._entries))}"
            ) from None

    def extra(self, name: str, key: str) -> Any:
        """An extra value registered beside ``name`` (e.g. its config dataclass)."""
        self.get(name)
        return self._extras[name][key]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
