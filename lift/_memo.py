"""Bounded memos: every cache lift keeps between calls, with one eviction rule.

lift remembers a few things that are costly to recompute and depend only on their
key: a :class:`~lift.StateKey`'s flatten (JAX asks for it on every dispatch), the
dotted form of a key path, a compiled pattern, the key strings of a custom node's
children, an Equinox module class's fields, list position names and a dtype's file
encoding. Each lives in a :class:`Memo`, and every memo follows one rule: when it holds
``limit`` entries it is emptied before the next one is stored, so memory stays bounded
and a forgotten entry is simply made again. No memo holds state values or arrays.

:data:`MEMOS` lists them all by name; :func:`clear` empties them (tests use it to
start from a cold process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["MEMOS", "Memo", "clear"]


class Memo(dict):
    """A dict that makes a missing value with ``make(key)`` and stays bounded.

    ``memo[key]`` is a C-level lookup when the key is present; ``make`` runs only on a
    miss. :meth:`put` stores a value made elsewhere (when making it needs more than
    the key) under the same bound.

    Examples:
        >>> from lift._memo import Memo
        >>> squares = Memo("squares", lambda n: n * n, limit=2)
        >>> squares[3], squares[4], len(squares)
        (9, 16, 2)
        >>> squares[5], len(squares)  # full: emptied, then 5 stored
        (25, 1)
    """

    __slots__ = ("limit", "make", "name")

    def __init__(
        self, name: str, make: Callable[[Any], Any] | None = None, *, limit: int
    ) -> None:
        super().__init__()
        self.name = name
        self.make = make
        self.limit = limit
        MEMOS[name] = self

    def __missing__(self, key: Any) -> Any:
        if self.make is None:
            raise KeyError(key)
        return self.put(key, self.make(key))

    def put(self, key: Any, value: Any) -> Any:
        """Store ``value`` under ``key`` (emptying the memo first if it is full)."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value

    def __repr__(self) -> str:
        return f"Memo({self.name!r}, {len(self)}/{self.limit} entries)"


MEMOS: dict[str, Memo] = {}


def clear() -> None:
    """Empty every memo."""
    for memo in MEMOS.values():
        memo.clear()
