"""Hypothesis strategies for pytrees that hold state, for your own tests.

A property test states a law and lets `hypothesis <https://hypothesis.works>`_ look
for a counterexample. The strategies here draw small JAX arrays, state values, and
nested pytrees that mix :class:`~lift.StateEntry` leaves with plain arrays and ``None``
inside every kind of node JAX knows: dicts (with ``str`` or ``int`` keys), lists,
tuples, namedtuples, registered dataclasses and custom nodes without key paths. The
same entry object sometimes appears at two places, as shared state does.

``import lift`` never imports this module; importing it imports hypothesis.

Examples:
    >>> from hypothesis import given, settings
    >>> from jax.tree_util import tree_structure
    >>> from lift import export_state, import_state
    >>> from lift.testing import trees
    >>> @settings(max_examples=10, deadline=None, database=None)
    ... @given(trees())
    ... def test_round_trip(tree):
    ...     exported, state = export_state(tree)
    ...     again, _ = export_state(import_state(exported, state))
    ...     assert tree_structure(again) == tree_structure(exported)
    >>> test_round_trip()
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from ._export import State, export_state
from ._keys import StateEntry

__all__ = [
    "DTYPES",
    "Box",
    "Pair",
    "Record",
    "arrays",
    "shapes",
    "state_values",
    "states",
    "trees",
]

#: The dtypes :func:`arrays` draws from when no ``dtype`` is given.
DTYPES: tuple[str, ...] = (
    "bool",
    "int8",
    "int16",
    "int32",
    "uint8",
    "uint32",
    "float16",
    "bfloat16",
    "float32",
    "complex64",
)


class Pair(NamedTuple):
    """A namedtuple node: its children's key paths are ``.first`` and ``.second``.

    Examples:
        >>> import jax
        >>> from lift.testing import Pair
        >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        ...     Pair(1, 2))]
        ['.first', '.second']
    """

    first: Any
    second: Any


@dataclasses.dataclass(eq=False)
class Record:
    """A dataclass registered with :func:`jax.tree_util.register_dataclass`.

    ``x`` and ``y`` are children (key paths ``.x`` and ``.y``); ``tag`` is static data
    that is part of the tree structure.

    Examples:
        >>> import jax
        >>> from lift.testing import Record
        >>> leaves, treedef = jax.tree_util.tree_flatten(Record(1, 2, tag="t"))
        >>> leaves
        [1, 2]
    """

    x: Any
    y: Any
    tag: str = "record"


jax.tree_util.register_dataclass(Record, data_fields=["x", "y"], meta_fields=["tag"])


class Box:
    """A custom node registered with plain :func:`jax.tree_util.register_pytree_node`.

    It has no key paths of its own, so JAX names its children by flat index
    (``[<flat index 0>]``).

    Examples:
        >>> import jax
        >>> from lift.testing import Box
        >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        ...     Box(1, 2))]
        ['[<flat index 0>]', '[<flat index 1>]']
    """

    __slots__ = ("items",)

    def __init__(self, *items: Any) -> None:
        """Hold ``items`` as the node's children."""
        self.items = items

    def __repr__(self) -> str:
        """``Box(child, ...)``."""
        return f"Box{self.items!r}"


jax.tree_util.register_pytree_node(
    Box, lambda box: (box.items, None), lambda _, items: Box(*items)
)


def shapes(*, max_dims: int = 2, max_side: int = 3) -> st.SearchStrategy[tuple]:
    """Small array shapes, including ``()`` and shapes with a zero-length axis.

    Args:
        max_dims: the largest number of axes.
        max_side: the largest length of one axis.

    Returns:
        A strategy of shape tuples.

    Examples:
        >>> from hypothesis import find
        >>> from lift.testing import shapes
        >>> find(shapes(), lambda s: len(s) == 2 and 0 in s)
        (0, 0)
    """
    return st.lists(st.integers(0, max_side), max_size=max_dims).map(tuple)


def _elements(dtype: np.dtype) -> st.SearchStrategy[Any]:
    # Quarter integers are exact in every float dtype drawn, bfloat16 and float16
    # included, so a value survives a cast and compares equal to itself.
    if dtype == np.bool_:
        return st.booleans()
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        return st.integers(0, 15)
    if jnp.issubdtype(dtype, jnp.integer):
        return st.integers(-8, 8)
    quarters = st.integers(-16, 16).map(lambda i: i / 4)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return st.builds(complex, quarters, quarters)
    return quarters


@st.composite
def arrays(
    draw: st.DrawFn,
    *,
    dtype: Any = None,
    shape: tuple[int, ...] | None = None,
    max_dims: int = 2,
    max_side: int = 3,
) -> jax.Array:
    """Small JAX arrays of many dtypes and shapes, 0-d and zero-size ones included.

    Values are small and exact (integers, or multiples of 1/4 for inexact dtypes),
    so they never overflow and always equal themselves: no NaNs.

    Args:
        draw: supplied by hypothesis; do not pass it.
        dtype: the dtype of every array; by default one of :data:`DTYPES`.
        shape: the shape of every array; by default drawn by :func:`shapes`.
        max_dims: the largest number of axes when ``shape`` is not given.
        max_side: the largest axis length when ``shape`` is not given.

    Returns:
        A strategy of :class:`jax.Array`.

    Examples:
        >>> from hypothesis import find
        >>> from lift.testing import arrays
        >>> find(arrays(dtype="int8", shape=(2,)), lambda a: True)
        Array([0, 0], dtype=int8)
        >>> find(arrays(), lambda a: a.dtype == "bfloat16" and a.ndim == 0)
        Array(0, dtype=bfloat16)
    """
    if dtype is None:
        dtype = draw(st.sampled_from(DTYPES))
    dtype = jnp.dtype(dtype)
    if shape is None:
        shape = draw(shapes(max_dims=max_dims, max_side=max_side))
    size = math.prod(shape)
    values = draw(st.lists(_elements(dtype), min_size=size, max_size=size))
    host = np.asarray(values, dtype=np.complex128 if dtype.kind == "c" else None)
    return jnp.asarray(host.reshape(shape), dtype=dtype)


def state_values(**array_options: Any) -> st.SearchStrategy[Any]:
    """Values a :class:`~lift.StateEntry` holds: an array, or a small pytree of them.

    The pytrees are tuples, dicts with ``str`` keys, and :class:`Pair` namedtuples.

    Args:
        **array_options: passed to :func:`arrays` (``dtype=``, ``shape=``, ...).

    Returns:
        A strategy of arrays and pytrees of arrays.

    Examples:
        >>> from hypothesis import find
        >>> from lift.testing import Pair, state_values
        >>> find(state_values(dtype="float32"), lambda v: isinstance(v, Pair))
        Pair(first=Array(0., dtype=float32), second=Array(0., dtype=float32))
    """
    leaf = arrays(**array_options)
    names = st.lists(st.sampled_from(["mean", "var", "count"]), unique=True, max_size=3)
    return st.one_of(
        leaf,
        st.lists(leaf, max_size=2).map(tuple),
        names.flatmap(lambda ks: st.fixed_dictionaries({k: leaf for k in ks})),
        st.builds(Pair, leaf, leaf),
    )


_KEY_CHARS = "abxy_.'\" "
_CONTAINERS = (
    "dict",
    "dict_int",
    "list",
    "tuple",
    "namedtuple",
    "dataclass",
    "custom",
)


class _Builder:
    """Draws one tree: a node at a time, within a leaf budget and a depth limit."""

    def __init__(self, draw: st.DrawFn, max_leaves: int, max_depth: int, shared: bool):
        self.draw = draw
        self.budget = max_leaves
        self.max_depth = max_depth
        self.shared = shared
        self.entries: list[StateEntry] = []

    def leaf(self) -> Any:
        draw = self.draw
        if self.budget <= 0:
            return None
        kinds = ["entry", "entry", "array", "none"]
        if self.shared and self.entries:
            kinds.append("shared")
        kind = draw(st.sampled_from(kinds))
        if kind == "none":
            return None
        self.budget -= 1
        if kind == "array":
            return draw(arrays())
        if kind == "shared":
            return self.entries[draw(st.integers(0, len(self.entries) - 1))]
        entry = StateEntry(draw(state_values()))
        self.entries.append(entry)
        return entry

    def node(self, depth: int) -> Any:
        draw = self.draw
        if depth >= self.max_depth or self.budget <= 0 or draw(st.booleans()):
            return self.leaf()
        kind = draw(st.sampled_from(_CONTAINERS))
        if kind == "namedtuple":
            return Pair(self.node(depth + 1), self.node(depth + 1))
        if kind == "dataclass":
            tag = draw(st.sampled_from(["a", "b"]))
            return Record(self.node(depth + 1), self.node(depth + 1), tag=tag)
        if kind == "dict":
            keys = draw(
                st.lists(st.text(_KEY_CHARS, max_size=3), unique=True, max_size=3)
            )
            return {k: self.node(depth + 1) for k in keys}
        if kind == "dict_int":
            keys = draw(st.lists(st.integers(0, 12), unique=True, max_size=3))
            return {k: self.node(depth + 1) for k in keys}
        children = [self.node(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        if kind == "list":
            return children
        if kind == "tuple":
            return tuple(children)
        return Box(*children)


@st.composite
def trees(
    draw: st.DrawFn,
    *,
    max_leaves: int = 8,
    max_depth: int = 3,
    shared: bool = True,
) -> Any:
    """Nested pytrees with :class:`~lift.StateEntry` leaves, plain arrays and ``None``.

    Nodes are dicts (``str`` keys, or ``int`` keys: one dict never mixes the two),
    lists, tuples, :class:`Pair` namedtuples, :class:`Record` dataclasses and
    :class:`Box` custom nodes without key paths, empty ones included. A tree may be a
    single entry, array or ``None``. Entry values come from :func:`state_values`.

    Args:
        draw: supplied by hypothesis; do not pass it.
        max_leaves: the most arrays and entries in one tree.
        max_depth: the most nodes on a path from the root to a leaf.
        shared: let one entry object appear at several places (shared state).

    Returns:
        A strategy of pytrees.

    Examples:
        >>> import jax
        >>> from hypothesis import find, given, settings
        >>> from lift import StateEntry, export_state
        >>> from lift.testing import trees
        >>> tree = find(trees(), lambda t: isinstance(t, dict) and 0 in t)
        >>> type(tree), list(tree)
        (<class 'dict'>, [0])
        >>> @settings(max_examples=20, deadline=None, database=None)
        ... @given(trees(max_leaves=4))
        ... def test_one_key_per_entry_object(tree):
        ...     flat = jax.tree_util.tree_leaves(
        ...         tree, is_leaf=lambda x: isinstance(x, StateEntry))
        ...     objects = {id(x) for x in flat if isinstance(x, StateEntry)}
        ...     assert len(export_state(tree)[1]) == len(objects) <= 4
        >>> test_one_key_per_entry_object()
    """
    return _Builder(draw, max_leaves, max_depth, shared).node(0)


@st.composite
def states(
    draw: st.DrawFn,
    *,
    prefix: str | None = None,
    max_leaves: int = 8,
    max_depth: int = 3,
) -> State:
    """State dicts, as :func:`~lift.export_state` returns them for :func:`trees`.

    Args:
        draw: supplied by hypothesis; do not pass it.
        prefix: passed to :func:`~lift.export_state`.
        max_leaves: passed to :func:`trees`.
        max_depth: passed to :func:`trees`.

    Returns:
        A strategy of ``dict[StateKey, value]``.

    Examples:
        >>> from hypothesis import find
        >>> from lift.testing import states
        >>> state = find(states(prefix="model"), lambda s: len(s) == 2)
        >>> all(key.startswith("model") for key in state)
        True
    """
    tree = draw(trees(max_leaves=max_leaves, max_depth=max_depth))
    return export_state(tree, prefix=prefix)[1]
