"""Non-array leaves as static tree structure, so JAX transforms see only arrays."""

from __future__ import annotations

from typing import Any

import jax

from ._tracing import is_array

__all__ = ["Static", "mask", "unmask"]


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


def mask(tree: Any, *, keep_scalars: bool = False) -> tuple[Any, bool]:
    """``tree`` with non-array leaves wrapped in :class:`Static`; and whether any was.

    With ``keep_scalars``, Python numbers stay dynamic (as ``lax.cond`` treats them).
    """
    dynamic = _is_jax_value if keep_scalars else is_array
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if all(map(dynamic, leaves)):
        return tree, False
    return treedef.unflatten([x if dynamic(x) else Static(x) for x in leaves]), True


def unmask(tree: Any, *, static_as_none: bool = False) -> Any:
    """The inverse of :func:`mask` (or, for gradients, ``None`` in place of statics)."""
    if static_as_none:
        return jax.tree_util.tree_map(
            lambda x: None if type(x) is Static else x, tree, is_leaf=_is_static
        )
    return jax.tree_util.tree_map(
        lambda x: x.value if type(x) is Static else x, tree, is_leaf=_is_static
    )
