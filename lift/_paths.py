"""Naming state entries by their JAX key paths, without building every leaf's path.

``jax.tree_util.tree_flatten_with_path`` makes a key object and a path tuple for every
leaf; :func:`entry_paths` only needs strings for the entries. It walks the tree in
JAX's flatten order and remembers, per node type, how children are named:

* dicts, lists and tuples are named here (``['k']``, ``[0]``), as JAX names them;
* namedtuples by their fields (``.x``);
* Equinox modules by their dynamic fields (``.weight``), read from the instance
  ``__dict__`` (Equinox's ``__getattribute__`` is slow): an Equinox module's flatten
  depends on its class only, and the plan of a class is checked against
  ``flatten_one_level_with_keys`` on its first instance;
* any other node by ``flatten_one_level`` and the key strings remembered for its
  ``(type, node data, number of children)``, asked of ``flatten_one_level_with_keys``
  once: a tree structure has one set of key paths.

The caller checks that the entries found are, object for object, those that
:func:`jax.tree_util.tree_flatten` found; if not, :func:`entry_paths` runs again with
``exact=True``, which asks JAX for every node's keys.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._keys import StateEntry, StateKey
from ._tracing import _ArrayImpl as ArrayImpl

__all__ = ["entry_paths"]

_registry = jax.tree_util.default_registry
# Types that are always leaves, so the walk need not ask JAX's registry about them.
_LEAF_TYPES = frozenset(
    {int, float, complex, bool, str, bytes, type(None), np.ndarray, ArrayImpl}
)
# Per (type, node data, number of children): the key strings of the children.
_NAMES: dict[tuple[Any, Any, int], tuple[str, ...]] = {}
# Per custom node type: for an Equinox module class, the key strings and attribute
# names of its dynamic fields (and those names as a set); None for any other type.
_FIELDS: dict[type, tuple[tuple[str, ...], tuple[str, ...], frozenset[str]] | None] = {}
_UNSEEN = object()
# Both are bounded (cleared when full): node data may hold large objects.
_MEMO_LIMIT = 10_000


class _Walk:
    """One walk: ``entries`` (objects) and ``paths`` in flatten order, old keys."""

    def __init__(self, is_leaf: Callable[[Any], bool] | None, exact: bool) -> None:
        self.is_leaf = is_leaf
        self.exact = exact
        self.entries: list[StateEntry] = []
        self.paths: list[str] = []
        self.existing: dict[str, str] = {}

    def walk(self, node: Any, path: str) -> None:
        # Every child is looked at here, so that leaves and entries (most of a tree)
        # cost no call; the three loops differ only in how a child's path is spelled.
        kind = type(node)
        if kind is StateKey:
            self.existing.setdefault(node, path)
            return
        if self.is_leaf is not None and self.is_leaf(node):
            return
        entries, paths = self.entries, self.paths
        if kind is dict:
            for k in sorted(node):
                child = node[k]
                if type(child) is StateEntry:
                    entries.append(child)
                    paths.append(f"{path}[{k!r}]")
                elif type(child) not in _LEAF_TYPES:
                    self.walk(child, f"{path}[{k!r}]")
        elif kind is list or kind is tuple:
            for i, child in enumerate(node):
                if type(child) is StateEntry:
                    entries.append(child)
                    paths.append(f"{path}[{i}]")
                elif type(child) not in _LEAF_TYPES:
                    self.walk(child, f"{path}[{i}]")
        else:
            fields: Any = None if self.exact else _FIELDS.get(kind, _UNSEEN)
            if fields is _UNSEEN:
                fields = _module_fields(node, kind)
            values = object.__getattribute__(node, "__dict__") if fields else None
            if values is not None and fields[2] <= values.keys():
                # An Equinox module: its dynamic fields, straight from its __dict__.
                names, children = fields[0], map(values.__getitem__, fields[1])
            else:
                names, children = self.children(node, kind)
            for name, child in zip(names, children, strict=True):
                if type(child) is StateEntry:
                    entries.append(child)
                    paths.append(path + name)
                elif type(child) not in _LEAF_TYPES:
                    self.walk(child, path + name)

    def children(self, node: Any, kind: type) -> tuple[Any, Any]:
        """The key strings and the children of a custom node (empty for a leaf)."""
        flat = _registry.flatten_one_level(node)
        if flat is None:
            return (), ()
        kids, aux = flat
        if aux is kind and isinstance(node, tuple) and hasattr(kind, "_fields"):
            # JAX's own namedtuple rule. (0.10.2's `flatten_one_level_with_keys`
            # repeats the first field's key for every child, so name them here.)
            return [f".{name}" for name in kind._fields], node
        if not self.exact:
            kids = list(kids)
            names = _memo_names(node, kind, aux, len(kids))
            if len(names) == len(kids):
                return names, kids
        keyed = _registry.flatten_one_level_with_keys(node)
        if keyed is None:
            return (), ()
        return [str(k) for k, _ in keyed[0]], [child for _, child in keyed[0]]


def _memo_names(node: Any, kind: type, aux: Any, n: int) -> tuple[str, ...]:
    """The key strings of a custom node's children, remembered per structure."""
    try:
        memo_key = (kind, aux, n)
        names = _NAMES.get(memo_key)
    except (TypeError, ValueError):  # node data that cannot be hashed or compared
        memo_key, names = None, None
    if names is None:
        keyed = _registry.flatten_one_level_with_keys(node)
        names = tuple(str(k) for k, _ in keyed[0]) if keyed is not None else ()
        if memo_key is not None:
            if len(_NAMES) >= _MEMO_LIMIT:
                _NAMES.clear()
            _NAMES[memo_key] = names
    return names


def _module_fields(node: Any, kind: type) -> Any:
    """``(key strings, attributes, attribute set)`` of an Equinox module's fields.

    ``None`` when ``kind`` is not an Equinox module, or when its fields are not what
    JAX flattens (checked on this first instance of the class).
    """
    fields = None
    module = sys.modules.get("equinox")
    if module is not None and isinstance(node, module.Module):
        attrs = tuple(
            f.name
            for f in dataclasses.fields(node)
            if not f.metadata.get("static", False)
        )
        values = object.__getattribute__(node, "__dict__")
        keyed = _registry.flatten_one_level_with_keys(node)
        if (
            keyed is not None
            and len(keyed[0]) == len(attrs)
            and all(a in values for a in attrs)
            and all(
                getattr(k, "name", None) == a and child is values[a]
                for (k, child), a in zip(keyed[0], attrs, strict=True)
            )
        ):
            fields = (tuple(f".{a}" for a in attrs), attrs, frozenset(attrs))
    if len(_FIELDS) >= _MEMO_LIMIT:
        _FIELDS.clear()
    _FIELDS[kind] = fields
    return fields


def entry_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None, *, exact: bool = False
) -> tuple[list[StateEntry], list[str], dict[str, str]]:
    """The entries of ``tree`` in flatten order, their paths, and keys already there.

    The last is a dict from each :class:`StateKey` found in the tree to its path.
    """
    walker = _Walk(is_leaf, exact)
    kind = type(tree)
    if kind is StateEntry:
        return [tree], [""], {}
    if kind not in _LEAF_TYPES:
        walker.walk(tree, "")
    return walker.entries, walker.paths, walker.existing
