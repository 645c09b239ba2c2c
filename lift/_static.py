"""Non-array leaves as static tree structure, so JAX transforms see only arrays."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import jax

from ._tracing import is_array

__all__ = ["Static", "hidden_arrays", "mask", "unmask"]


class Static:
    """A childless pytree node carrying a non-array leaf (a function, a str, an int).

    Its value becomes part of the tree structure, so ``jax.jit`` caches on it and
    ``jax.vmap`` leaves it alone. Equal values give equal structures; an unhashable
    value is compared by identity. Python numbers compare by type and exact value:
    ``0.0`` and ``-0.0`` differ (``1 / x`` differs), a NaN equals itself (so it does
    not retrace every call), and ``1``, ``1.0`` and ``True`` are three values.
    """

    __slots__ = ("_hash", "_id", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._id = _identity(value)
        try:
            self._hash = hash(self._id)
        except TypeError:
            self._hash = None

    def __hash__(self) -> int:
        return self._hash if self._hash is not None else id(self.value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Static:
            return NotImplemented
        if self._hash is None or other._hash is None:
            return self.value is other.value
        return self._hash == other._hash and bool(self._id == other._id)

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


def _identity(value: Any) -> Any:
    """What a static value is compared by: its type and, for numbers, its exact bits.

    ``==`` says ``0.0 == -0.0`` and ``nan != nan``; ``float.hex`` tells the zeros
    apart and spells every NaN ``'nan'``.
    """
    kind = type(value)
    if kind is float:
        return (kind, value.hex())
    if kind is complex:
        return (kind, value.real.hex(), value.imag.hex())
    return (kind, value)


jax.tree_util.register_pytree_node(Static, lambda s: ((), s), lambda s, _: s)


def _is_static(x: Any) -> bool:
    return type(x) is Static


_SCALARS = (int, float, complex, bool)


def _is_jax_value(x: Any) -> bool:
    return type(x) in _SCALARS or is_array(x)


def mask(
    tree: Any,
    *,
    keep_scalars: bool = False,
    refuse: Callable[[Any], Exception] | None = None,
) -> tuple[Any, bool]:
    """``tree`` with non-array leaves wrapped in :class:`Static`; and whether any was.

    With ``keep_scalars``, Python numbers stay dynamic (as ``lax.cond`` treats them).
    With ``refuse``, a leaf that would be static but holds JAX arrays in its
    attributes (:func:`hidden_arrays`) raises ``refuse(leaf)``.
    """
    dynamic = _is_jax_value if keep_scalars else is_array
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if all(map(dynamic, leaves)):
        return tree, False
    if refuse is not None:
        for x in leaves:
            if not dynamic(x) and hidden_arrays(x):
                raise refuse(x)
    return treedef.unflatten([x if dynamic(x) else Static(x) for x in leaves]), True


_PLAIN = frozenset({str, bytes, int, float, complex, bool, type(None)})


def hidden_arrays(value: Any) -> bool:
    """Whether an object JAX sees as a leaf holds JAX arrays (or tracers) inside.

    Looks two levels deep: its attributes (a partial's arguments, a bound method's
    instance) and theirs. A static value holding arrays is stale once they change
    (it compares by identity), and one holding a tracer leaks it out of its
    transform.
    """
    inner = _inside(value)
    for _ in range(2):
        if not inner:
            return False
        leaves = jax.tree_util.tree_leaves(inner)
        if any(isinstance(leaf, jax.Array) for leaf in leaves):
            return True
        inner = [x for leaf in leaves for x in _inside(leaf)]
    return False


def _inside(value: Any) -> list[Any]:
    """What an object holds: attributes, a partial's arguments, a method's instance."""
    if type(value) in _PLAIN or isinstance(value, (type, jax.Array)):
        return []
    inner: list[Any] = []
    if isinstance(value, types.MethodType):
        inner.append(value.__self__)
    elif isinstance(value, functools.partial):
        inner += [*value.args, *value.keywords.values()]
    try:
        inner += vars(value).values()
    except TypeError:  # no __dict__
        pass
    return inner


def unmask(tree: Any, *, static_as_none: bool = False) -> Any:
    """The inverse of :func:`mask` (or, for gradients, ``None`` in place of statics)."""
    if static_as_none:
        return jax.tree_util.tree_map(
            lambda x: None if type(x) is Static else x, tree, is_leaf=_is_static
        )
    return jax.tree_util.tree_map(
        lambda x: x.value if type(x) is Static else x, tree, is_leaf=_is_static
    )
