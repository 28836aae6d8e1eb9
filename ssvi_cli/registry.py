"""Name -> object registries: every string the user types becomes an object here, once.

Models, datasets, OOD sets, removal criteria, uncertainty scores, allocations, optimizers, methods,
kernel policies and bench models are all :class:`Registry` instances. An unknown name raises
:class:`UnknownName` (or the registry's subclass of it) listing the valid names, closest first when
the name looks like a typo.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that is not in a registry; the message lists the valid names."""


class Registry(Generic[T]):
    """A named collection of builders (or values) with one error for unknown names.

    ``error`` is the exception raised for an unknown name: :class:`UnknownName` or a subclass that
    also belongs to a domain's error family (e.g. a dataset name is also a ``DataError``).
    """

    def __init__(self, kind: str, error: type[UnknownName] = UnknownName, sort: bool = True) -> None:
        self.kind = kind
        self.error = error
        self.sort = sort  # list names alphabetically (else in registration order)
        self._items: dict[str, T] = {}
        self._reserved: dict[str, str] = {}  # name -> what already answers to it elsewhere

    def reserve(self, name: str, holder: str) -> None:
        """Refuse ``name`` from now on: ``holder`` (another registry's entry a user types the same way)
        answers to it, and an entry here would be listed beside it but never reached."""
        self._reserved[name] = holder

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._entries():  # a derived registry's own entries too
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if name in self._reserved:
                raise ValueError(f"{self.kind} {name!r} cannot be registered: {name!r} names {self._reserved[name]}")
            self._items[name] = item
            return item

        return decorator

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name`` (for values rather than decorated functions)."""
        return self.register(name)(item)

    def _entries(self) -> dict[str, T]:
        """Every entry: the registered ones (a registry derived from another adds that one's)."""
        return self._items

    def get(self, name: str) -> T:
        try:
            return self._entries()[name]
        except (KeyError, TypeError):
            raise self.error(self.unknown_message(name)) from None

    def unknown_message(self, name: object, label: Optional[str] = None) -> str:
        """``unknown <kind> 'x'; valid names are: ...`` (plus close matches when there are any)."""
        message = f"unknown {label or self.kind} {name!r}; valid names are: {', '.join(self.names())}"
        close = self.close_matches(name)
        return message + (f" (did you mean {' or '.join(close)}?)" if close else "")

    def close_matches(self, name: object) -> list[str]:
        """The registered names close to ``name``, closest first (at most three; ``MNIST`` finds ``mnist``)."""
        lower = {n.lower(): n for n in self.names()}
        return [lower[c] for c in difflib.get_close_matches(str(name).lower(), list(lower), n=3, cutoff=0.6)]

    def names(self) -> list[str]:
        entries = self._entries()
        return sorted(entries) if self.sort else list(entries)

    def items(self) -> list[tuple[str, T]]:
        entries = self._entries()
        return [(name, entries[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries())
