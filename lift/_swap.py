"""Swapping state entries for keys, and back, in one walk over the tree, in Python.

``export_state`` could flatten the tree, name the entries and unflatten it; that costs
more than one :func:`jax.tree_util.tree_flatten_with_path`. :func:`export_entries`
instead walks the tree once and rebuilds only the containers that hold an entry:
every other subtree is returned as the same object, and a leaf or an entry costs no
Python call. :func:`import_keys` does the same for ``import_state``, without names.
Children are named as JAX names them (``keystr`` of their key path):

* dicts, lists and tuples here (``['k']``, ``[0]``);
* namedtuples by their fields (``.x``);
* Equinox modules by their dynamic fields (``.weight``), read from the instance
  ``__dict__`` (Equinox's ``__getattribute__`` is slow): an Equinox module's flatten
  depends on its class only, and the plan of a class is checked against
  ``flatten_one_level_with_keys`` on its first instance. A module holding an entry is
  rebuilt as Equinox's unflatten does it: a new instance, its ``__dict__`` copied;
* any other node by ``flatten_one_level`` (JAX's own children) and the key strings
  remembered for its ``(type, node data, number of children)``, asked of
  ``flatten_one_level_with_keys`` once; it is rebuilt by its own unflatten.

Dicts are walked in insertion order, which is cheaper than JAX's sorted order and
names every entry the same: a path does not depend on the order. Only which of its
paths names a *shared* entry does (the first in JAX's flatten order); the walk
reports every occurrence and leaves that rare case to the caller.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ._errors import LiftValueError
from ._keys import StateEntry, StateKey
from ._tracing import _ArrayImpl as ArrayImpl

__all__ = ["Export", "Import", "export_entries", "import_keys"]

_registry = jax.tree_util.default_registry
# Types that are always leaves, so the walk need not ask JAX's registry about them.
_LEAF_TYPES = frozenset(
    {int, float, complex, bool, str, bytes, type(None), np.ndarray, ArrayImpl}
)
# Per (type, node data, number of children): the key strings of the children.
_NAMES: dict[tuple[Any, Any, int], tuple[str, ...]] = {}
# Per custom node type: for an Equinox module class, the (attribute, key string) of
# each dynamic field, the attributes, and them as a set; None for any other type.
_FIELDS: dict[type, tuple[Any, tuple[str, ...], frozenset[str]] | None] = {}
# Both are bounded (cleared when full): node data may hold large objects.
_MEMO_LIMIT = 10_000
_UNSEEN = object()
# The key strings of the first positions of a list or tuple: ``"[0]"``, ``"[1]"``, ...
_INDEXED = 1024
_INDEX_NAMES = tuple(f"[{i}]" for i in range(_INDEXED))
_MISSING: Any = object()  # the value of an entry whose key the state lacks
_new_entry = StateEntry.__new__
_set_value = vars(StateEntry)["value"].__set__  # the slot's descriptor: C-level


def _module(kind: type, values: dict[str, Any]) -> Any:
    """An Equinox module of class ``kind`` with ``__dict__`` ``values``.

    This is what Equinox's own unflatten builds: no ``__init__``, no checks.
    """
    module = object.__new__(kind)
    object.__setattr__(module, "__dict__", values)
    return module


def _open(node: Any, kind: type, named: bool) -> tuple[Any, Any, Any, Any]:
    """``(slots, names, children, how)`` of a custom node, opened one level.

    ``how`` is what :func:`_close` needs to rebuild it: its children and node data.
    """
    flat = _registry.flatten_one_level(node)
    if flat is None:  # a leaf of a type the walk does not know
        return (), (), (), None
    children, aux = list(flat[0]), flat[1]
    slots = range(len(children))
    names = _child_names(node, kind, aux, len(children)) if named else slots
    return slots, names, children, (children, aux)


def _close(node: Any, kind: type, how: Any, changed: dict[Any, Any]) -> Any:
    """The node opened by :func:`_open`, with the children in ``changed`` replaced."""
    children, aux = how
    children = [changed.get(i, c) for i, c in enumerate(children)]
    if _is_namedtuple(node, kind, aux):
        return kind(*children)  # as JAX's namedtuple rule rebuilds it
    # The node itself, one level deep (its children are the leaves), unflattened.
    one_level = jax.tree_util.tree_structure(node, is_leaf=lambda x: x is not node)
    return one_level.unflatten(children)


class Export:
    """The walk of ``export_state``: entries out, keys in.

    ``entries`` lists every entry occurrence in walk order, ``state`` maps each new key
    to its entry's value, and ``existing`` maps each :class:`StateKey` already in the
    tree to its path.
    """

    def __init__(self, is_leaf: Callable[[Any], bool] | None) -> None:
        self.is_leaf = is_leaf
        self.entries: list[StateEntry] = []
        self.state: dict[StateKey, Any] = {}
        self.existing: dict[StateKey, str] = {}

    def walk(self, node: Any, path: str) -> Any:
        """``node`` with its entries swapped for keys (itself if it holds none)."""
        # Every child is looked at here, so that leaves and entries (most of a tree)
        # cost no call. The three loops differ only in how a child is named and put
        # back; an entry is always swapped by the same three lines.
        kind = type(node)
        if kind is StateKey:
            self.existing.setdefault(node, path)
            return node
        if self.is_leaf is not None and self.is_leaf(node):
            return node
        entries, state = self.entries, self.state
        if kind is dict:
            out = None
            for k, child in node.items():
                if type(child) is StateEntry:
                    new = StateKey(f"{path}[{k!r}]")
                    state[new] = child.value
                    entries.append(child)
                elif type(child) in _LEAF_TYPES:
                    continue
                else:
                    new = self.walk(child, f"{path}[{k!r}]")
                    if new is child:
                        continue
                if out is None:
                    out = dict(node)
                out[k] = new
            return node if out is None else out
        if kind is list or kind is tuple:
            seq = None
            for i, child in enumerate(node):
                if type(child) in _LEAF_TYPES:
                    continue
                name = path + _INDEX_NAMES[i] if i < _INDEXED else f"{path}[{i}]"
                if type(child) is StateEntry:
                    new = StateKey(name)
                    state[new] = child.value
                    entries.append(child)
                else:
                    new = self.walk(child, name)
                    if new is child:
                        continue
                if seq is None:
                    seq = list(node)
                seq[i] = new
            if seq is None:
                return node
            return seq if kind is list else tuple(seq)
        fields: Any = _FIELDS.get(kind, _UNSEEN)
        if fields is _UNSEEN:
            fields = _module_fields(node, kind)
        if fields is not None:
            values = object.__getattribute__(node, "__dict__")
            if fields[2] <= values.keys():
                out = None
                for attr, name in fields[0]:
                    child = values[attr]
                    if type(child) is StateEntry:
                        new = StateKey(path + name)
                        state[new] = child.value
                        entries.append(child)
                    elif type(child) in _LEAF_TYPES:
                        continue
                    else:
                        new = self.walk(child, path + name)
                        if new is child:
                            continue
                    if out is None:
                        out = values.copy()
                    out[attr] = new
                return node if out is None else _module(kind, out)
        slots, names, children, how = _open(node, kind, named=True)
        changed = None
        for slot, name, child in zip(slots, names, children, strict=True):
            if type(child) is StateEntry:
                new = StateKey(path + name)
                state[new] = child.value
                entries.append(child)
            elif type(child) in _LEAF_TYPES:
                continue
            else:
                new = self.walk(child, path + name)
                if new is child:
                    continue
            if changed is None:
                changed = {}
            changed[slot] = new
        return node if changed is None else _close(node, kind, how, changed)


class Import:
    """The walk of ``import_state``: keys out, entries in (one per key).

    ``made`` maps every key met to its entry; an entry of a key ``state`` lacks holds
    a placeholder (``import_state`` then refuses).
    """

    def __init__(self, state: Mapping[StateKey, Any]) -> None:
        self.get = state.get
        self.made: dict[StateKey, StateEntry] = {}

    def walk(self, node: Any) -> Any:
        """``node`` with its keys swapped for entries (itself if it holds none)."""
        # As `Export.walk`, without paths: an import needs none.
        kind = type(node)
        setdefault, get = self.made.setdefault, self.get
        if kind is dict:
            out = None
            for k, child in node.items():
                if type(child) is StateKey:
                    new = setdefault(child, _new_entry(StateEntry))
                    _set_value(new, get(child, _MISSING))
                elif type(child) in _LEAF_TYPES:
                    continue
                else:
                    new = self.walk(child)
                    if new is child:
                        continue
                if out is None:
                    out = dict(node)
                out[k] = new
            return node if out is None else out
        if kind is list or kind is tuple:
            seq = None
            for i, child in enumerate(node):
                if type(child) is StateKey:
                    new = setdefault(child, _new_entry(StateEntry))
                    _set_value(new, get(child, _MISSING))
                elif type(child) in _LEAF_TYPES:
                    continue
                else:
                    new = self.walk(child)
                    if new is child:
                        continue
                if seq is None:
                    seq = list(node)
                seq[i] = new
            if seq is None:
                return node
            return seq if kind is list else tuple(seq)
        fields: Any = _FIELDS.get(kind, _UNSEEN)
        if fields is _UNSEEN:
            fields = _module_fields(node, kind)
        if fields is not None:
            values = object.__getattribute__(node, "__dict__")
            if fields[2] <= values.keys():
                out = None
                for attr in fields[1]:
                    child = values[attr]
                    if type(child) is StateKey:
                        new = setdefault(child, _new_entry(StateEntry))
                        _set_value(new, get(child, _MISSING))
                    elif type(child) in _LEAF_TYPES:
                        continue
                    else:
                        new = self.walk(child)
                        if new is child:
                            continue
                    if out is None:
                        out = values.copy()
                    out[attr] = new
                return node if out is None else _module(kind, out)
        slots, _, children, how = _open(node, kind, named=False)
        changed = None
        for slot, child in zip(slots, children, strict=True):
            if type(child) is StateKey:
                new = setdefault(child, _new_entry(StateEntry))
                _set_value(new, get(child, _MISSING))
            elif type(child) in _LEAF_TYPES:
                continue
            else:
                new = self.walk(child)
                if new is child:
                    continue
            if changed is None:
                changed = {}
            changed[slot] = new
        return node if changed is None else _close(node, kind, how, changed)


def _is_namedtuple(node: Any, kind: type, aux: Any) -> bool:
    """Whether JAX's own namedtuple rule flattens ``node`` (not a registration)."""
    return aux is kind and isinstance(node, tuple) and hasattr(kind, "_fields")


def _child_names(node: Any, kind: type, aux: Any, n: int) -> tuple[str, ...]:
    """The key strings of a custom node's children, remembered per structure."""
    if _is_namedtuple(node, kind, aux):
        # JAX's own namedtuple rule. (0.10.2's `flatten_one_level_with_keys` repeats
        # the first field's key for every child, so name them here.)
        return tuple(f".{name}" for name in kind._fields)
    try:
        memo_key = (kind, aux, n)
        names = _NAMES.get(memo_key)
    except (TypeError, ValueError):  # node data that cannot be hashed or compared
        memo_key, names = None, None
    if names is None:
        keyed = _registry.flatten_one_level_with_keys(node)
        names = tuple(str(k) for k, _ in keyed[0]) if keyed is not None else ()
        if len(names) != n:
            raise LiftValueError(
                f"`export_state`: a {kind.__qualname__} node flattens to {n} "
                f"children, but to {len(names)} with keys, so its entries cannot be "
                "named by their key paths. Make its `flatten_with_keys` return the "
                "same children as its `flatten`."
            )
        if memo_key is not None:
            if len(_NAMES) >= _MEMO_LIMIT:
                _NAMES.clear()
            _NAMES[memo_key] = names
    return names


def _module_fields(node: Any, kind: type) -> Any:
    """``((attribute, key string), attributes, attribute set)`` of a module's fields.

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
            fields = (tuple((a, f".{a}") for a in attrs), attrs, frozenset(attrs))
    if len(_FIELDS) >= _MEMO_LIMIT:
        _FIELDS.clear()
    _FIELDS[kind] = fields
    return fields


def export_entries(
    tree: Any, prefix: str, is_leaf: Callable[[Any], bool] | None
) -> tuple[Any, Export]:
    """``tree`` with every entry swapped for the key ``prefix + path``, and the walk.

    A shared entry gets one key per place it is reached: the caller sees it in
    ``entries`` twice.
    """
    walk = Export(is_leaf)
    kind = type(tree)
    if kind is StateEntry:
        key = StateKey(prefix)
        walk.state[key] = tree.value
        walk.entries.append(tree)
        return key, walk
    if kind in _LEAF_TYPES:
        return tree, walk
    return walk.walk(tree, prefix), walk


def import_keys(tree: Any, state: Mapping[StateKey, Any]) -> tuple[Any, Import]:
    """``tree`` with every key swapped for an entry holding its value, and the walk."""
    walk = Import(state)
    if type(tree) is StateKey:
        return walk.walk([tree])[0], walk
    if type(tree) in _LEAF_TYPES:
        return tree, walk
    return walk.walk(tree), walk
