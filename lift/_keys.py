"""State keys and state entries: the two objects the tree layer is made of."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import jax

__all__ = ["StateEntry", "StateKey", "dotted", "matches"]

T = TypeVar("T")


class StateKey(str):
    """A hashable, totally ordered key naming one piece of state by its path.

    ``str(key)`` is the JAX key path (:func:`jax.tree_util.keystr`) of the
    :class:`StateEntry` it replaced, so the same model built twice, in any process,
    gives equal keys. A key is a ``str`` underneath: hashing and ordering cost what a
    ``str`` costs. It is a pytree node without children, so an exported tree passes
    through plain :func:`jax.jit`, :func:`jax.vmap` and :func:`jax.lax.scan` with the
    key as part of the tree structure.

    Examples:
        >>> from lift import StateKey
        >>> key = StateKey("['bn']['mean']")
        >>> str(key), key < StateKey("['bn']['var']")
        ("['bn']['mean']", True)
        >>> key
        StateKey("['bn']['mean']")
    """

    __slots__ = ()

    def __repr__(self) -> str:
        # Double quotes (paths are full of single ones), one line, valid Python.
        return f"StateKey({json.dumps(str(self), ensure_ascii=False)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (StateKey, (str(self),))

    @property
    def path(self) -> str:
        """The key path as a plain ``str``."""
        return str(self)


class _NodeData(dict):
    """A key's node data: ``{(): key}``, so that ``dict.get(data, ())`` is the key.

    It compares as the key does, and prints as it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(self[()])


class _Flattened(dict):
    """``key -> ((), node data)``: a key's flatten, made once per key."""

    def __missing__(self, key: StateKey) -> tuple[tuple[()], _NodeData]:
        if len(self) >= _FLATTENED_LIMIT:
            self.clear()  # bounded; a key flattened again is made again
        flat = self[key] = ((), _NodeData({(): key}))
        return flat


_FLATTENED_LIMIT = 100_000
_FLATTENED = _Flattened()
# A key is a node with no children. JAX calls its flatten and unflatten on every
# `jax.jit` dispatch (for the arguments and the outputs); both are C-level here, a dict
# lookup each, rather than Python functions: no Python frame per key per call.
jax.tree_util.register_pytree_node(StateKey, _FLATTENED.__getitem__, dict.get)


class StateEntry(Generic[T]):
    """Marks ``value``, a pytree of arrays, as state inside any pytree.

    :func:`lift.export_state` swaps each entry for a :class:`StateKey` and collects its
    value into the state dict. An entry is a pytree node whose one child is its value,
    so a constructor that builds entries can itself run under :func:`jax.vmap` (an
    ensemble) and the values come out batched.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry
        >>> entry = StateEntry(jnp.zeros(3))
        >>> entry.value.shape
        (3,)
    """

    __slots__ = ("value",)
    value: T

    def __init__(self, value: T) -> None:
        if isinstance(value, (StateEntry, StateKey)):
            from ._errors import LiftTypeError

            raise LiftTypeError(
                f"`StateEntry` got a {type(value).__name__} as its value; entries do "
                "not nest. Pass the array (or pytree of arrays) itself: "
                "`StateEntry(jnp.zeros(3))`."
            )
        self.value = value

    def __repr__(self) -> str:
        from ._errors import describe

        return f"StateEntry({describe(self.value)})"


_VALUE = jax.tree_util.GetAttrKey("value")


def _unflatten_entry(_: Any, children: Iterable[Any]) -> StateEntry:
    (value,) = children
    return StateEntry(value)


jax.tree_util.register_pytree_with_keys(
    StateEntry,
    lambda entry: (((_VALUE, entry.value),), None),
    _unflatten_entry,
    lambda entry: ((entry.value,), None),
)


_SUBSCRIPT = re.compile(r"\[(?:'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"|([^\]]*))\]")
_DOTTED: dict[str, str] = {}


def dotted(path: str) -> str:
    """``.layers[0]['bn']`` → ``layers.0.bn``: the form glob patterns are matched on."""
    out = _DOTTED.get(path)
    if out is None:
        out = _SUBSCRIPT.sub(
            lambda m: "." + next(g for g in m.groups() if g is not None), path
        ).lstrip(".")
        if len(_DOTTED) < 1_000_000:
            _DOTTED[path] = out
    return out


def matches(path: str, pattern: str) -> bool:
    """Whether a glob ``pattern`` matches a key path, in its raw or dotted form.

    Examples:
        >>> from lift._keys import matches
        >>> matches(".layers[0].bn.mean", "*.bn.*"), matches("['bn']['var']", "bn.*")
        (True, True)
    """
    if pattern == path:
        return True
    name = dotted(path)
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(
        "." + name, pattern
    )
