"""Registries: every kind of named thing a setting can choose (losses, scorers, shifts, datasets,
...) is one :class:`Registry`, the one place its names are looked up.

A registry maps names to entries and knows its *kind* ("loss", "scorer", ...), so an unknown
name fails everywhere with the same :class:`~firm.config.SettingsError`, naming the kind and
the choices. A few kinds also accept *keywords* that stand for something other than one entry
(``all`` scorers, ``auto`` shifts): they are choices on the command line but not entries.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry", "SettingsError"]

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting that is unknown, of the wrong type or out of range; the message names it."""


class Registry(Generic[T]):
    """Names -> entries of one kind, in the order they were registered.

    ``keywords``: names that are valid choices without being entries, with what each means;
    ``alternative``: what else a setting of this kind may be, added to the error message
    (for datasets: "or a folder ...").
    """

    def __init__(self, kind: str, entries: dict[str, T] | None = None, keywords: dict[str, str] | None = None,
                 alternative: str = ""):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self.keywords = dict(keywords or {})
        self.alternative = alternative
        for name, entry in (entries or {}).items():
            self.register(name, entry)

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` as ``name`` (a name is registered once); returns the entry."""
        if name in self._entries or name in self.keywords:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    @property
    def names(self) -> tuple[str, ...]:
        """The registered entries' names."""
        return tuple(self._entries)

    @property
    def choices(self) -> tuple[str, ...]:
        """Every name a setting of this kind may take: the entries, then the keywords."""
        return (*self._entries, *self.keywords)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; :class:`SettingsError` naming the choices otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name, keywords=False) from None

    def check(self, names: str | Iterable[str]) -> list[str]:
        """``names`` (one or several) as a list, each a choice; :class:`SettingsError` for the first that is not."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.choices:
                raise self.unknown(name)
        return names

    def unknown(self, name: object, keywords: bool = True) -> SettingsError:
        """The error for a name that is not a choice (with ``keywords=False``: not an entry)."""
        alternative = f" {self.alternative}" if self.alternative else ""
        if name in self.keywords and not keywords:
            return SettingsError(f"{self.kind} {name!r} ({self.keywords[name]}) cannot be used here: one {self.kind} "
                                 f"is needed; choose one of {', '.join(self.names)}")
        choices = self.choices if keywords else self.names
        return SettingsError(f"unknown {self.kind} {name!r}; choose one of {', '.join(choices)}{alternative}")

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.choices)})"
