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

import gc
import linecache
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ._errors import LiftValueError
from ._keys import StateEntry, StateKey
from ._memo import Memo
from ._naming import FIELDS as _FIELDS  # noqa: F401 - read by the generated walk
from ._naming import child_names as _child_names
from ._naming import is_namedtuple as _is_namedtuple
from ._naming import module_fields as _module_fields  # noqa: F401 - generated walk
from ._naming import unflattenable as _unflattenable
from ._tracing import _ArrayImpl as ArrayImpl

__all__ = [
    "Export",
    "Import",
    "export_entries",
    "import_keys",
    "pause_collector",
    "resume_collector",
]

_registry = jax.tree_util.default_registry
# Types that are always leaves, so the walk need not ask JAX's registry about them.
_LEAF_TYPES = frozenset(
    {int, float, complex, bool, str, bytes, type(None), np.ndarray, ArrayImpl}
)
_UNSEEN = object()


# The key strings of list and tuple positions, made once each (the first ones up
# front).
_INDEXED = 1024
_INDEX_NAMES = Memo("list positions", "[{}]".format, limit=1 << 20)
_INDEX_NAMES.update((i, f"[{i}]") for i in range(_INDEXED))
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


def _open(node: Any, kind: type, named: bool, path: str | None) -> Any:
    """``(children, node data, names)`` of a custom node, opened one level.

    ``None`` for a leaf of a type the walk does not know. ``names`` (the children's
    key strings, by position) only when ``named``.
    """
    try:
        flat = _registry.flatten_one_level(node)
    except Exception as err:  # the node's own flatten (or a dict subclass's sort)
        raise _unflattenable(node, kind, path, "", err) from err
    if flat is None:
        return None
    children, aux = list(flat[0]), flat[1]
    names = _child_names(node, kind, aux, len(children), path) if named else None
    return children, aux, names


def _close(node: Any, kind: type, aux: Any, children: list) -> Any:
    """The node opened by :func:`_open`, rebuilt from (new) ``children``."""
    if _is_namedtuple(node, kind, aux):
        return kind(*children)  # as JAX's namedtuple rule rebuilds it
    # The node itself, one level deep (its children are the leaves), unflattened.
    one_level = jax.tree_util.tree_structure(node, is_leaf=lambda x: x is not node)
    return one_level.unflatten(children)


# The walks. Both walk each kind of container (dict, list or tuple, Equinox module,
# other node) with the same loop; only how a child is read, named and swapped, and
# how a container is copied, differ. The loop is written once, in `_LOOP`, and the
# two `walk` methods are generated from it, one loop per kind of container, as
# `dataclasses` generates `__init__`: CPython specialises each loop for its container
# and child types, and one shared loop over all kinds measured 20-40% more
# instructions per export (callgrind, 1k-entry trees). `walk_source()` shows the code.
_LOOP = """\
out = None
for {slot}, {child} in {items}:
    {read}
    if type(child) is {target}:
        {swap}
    elif type(child) in _LEAF_TYPES:
        continue
    else:
        new = self.walk(child, {name})
        if new is child:
            continue
    if out is None:
        out = {copy}
    out[{slot}] = new
"""
_WALK = """\
def walk(self, node, path):
    kind = type(node)
{start}
    if kind is dict:
{dict_loop}
        return node if out is None else out
    if kind is list or kind is tuple:
{seq_loop}
        if out is None:
            return node
        return out if kind is list else tuple(out)
    fields = _FIELDS.get(kind, _UNSEEN)
    if fields is _UNSEEN:
        fields = _module_fields(node, kind)
    if fields is not None:
        values = object.__getattribute__(node, "__dict__")
        if fields[2] <= values.keys():
{module_loop}
            return node if out is None else _module(kind, out)
    how = _open(node, kind, {named}, path)
    if how is None:
        return node
    children, aux, names = how
{node_loop}
    return node if out is None else _close(node, kind, aux, out)
"""
# Per walk: what starts it, the type it swaps out, and how a swap is done.
_EXPORT = {
    "start": """\
    if kind is StateKey:
        self.existing.setdefault(node, path)
        return node
    if self.is_leaf is not None and self.is_leaf(node):
        return node
    entries, state = self.entries, self.state
    checked = False""",
    "target": "StateEntry",
    "swap": "new = StateKey({name})\n"
    "        state[new] = child.value\n"
    "        entries.append(child)",
    "named": "True",
}
_IMPORT = {
    "start": "    setdefault, get = self.made.setdefault, self.get",
    "target": "StateKey",
    "swap": "new = setdefault(child, _new_entry(StateEntry))\n"
    "        _set_value(new, get(child, _MISSING))",
    "named": "False",
}
# Per kind of container (and the indent of its loop in `_WALK`): the loop variables,
# what is iterated, how a child is read, its key string, and the copy to fill.
_KINDS = {
    "dict_loop": dict(
        indent=2, slot="k", child="child", items="node.items()", read="",
        name='f"{path}[{k!r}]"', copy="dict(node)",
    ),
    "seq_loop": dict(
        indent=2, slot="i", child="child", items="enumerate(node)", read="",
        name="path + _INDEX_NAMES[i]", copy="list(node)",
    ),
    "module_loop": dict(
        indent=3, slot="attr", child="name", items="fields[0]",
        read="child = values[attr]", name="path + name", copy="values.copy()",
    ),
    "node_loop": dict(
        indent=1, slot="i", child="child", items="enumerate(children)", read="",
        name="path + names[i]", copy="children",
    ),
}  # fmt: skip
# Export only: JAX sorts a dict's keys whenever it flattens it, so every dict the walk
# opens must have keys JAX can order. A str key needs no check; the first other key
# checks them all (`_check_keys`), once per dict.
_DICT_CHECK = """\
    if type(k) is not str and not checked:
        checked = _check_keys(node, path)"""


def walk_source(export: bool) -> str:
    """The source of :class:`Export`'s (or :class:`Import`'s) ``walk`` method."""
    how = _EXPORT if export else _IMPORT
    loops = {}
    for part, kind in _KINDS.items():
        name = kind["name"] if export else "None"
        loop = _LOOP.format(
            slot=kind["slot"],
            child=kind["child"],
            items=kind["items"],
            read=kind["read"],
            target=how["target"],
            swap=how["swap"].format(name=name),
            name=name,
            copy=kind["copy"],
        )
        if export and part == "dict_loop":  # first thing for each key
            loop = loop.replace("    {read}".format(read=kind["read"]), _DICT_CHECK, 1)
        loops[part] = "\n".join(
            "    " * int(kind["indent"]) + line
            for line in loop.splitlines()
            if line.strip()
        )
    return _WALK.format(start=how["start"], named=how["named"], **loops)


def _compile_walk(export: bool) -> Callable[..., Any]:
    source = walk_source(export)
    filename = f"<lift._swap: {'export' if export else 'import'} walk>"
    # Tracebacks through the generated code show its lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), globals(), namespace)
    return namespace["walk"]


class Export:
    """The walk of ``export_state``: entries out, keys in.

    ``entries`` lists every entry occurrence in walk order, ``state`` maps each new key
    to its entry's value, and ``existing`` maps each :class:`StateKey` already in the
    tree to its path. ``walk(node, path)`` returns ``node`` with its entries swapped
    for keys (itself if it holds none).
    """

    def __init__(self, is_leaf: Callable[[Any], bool] | None) -> None:
        self.is_leaf = is_leaf
        self.entries: list[StateEntry] = []
        self.state: dict[StateKey, Any] = {}
        self.existing: dict[StateKey, str] = {}

    walk = _compile_walk(export=True)


class Import:
    """The walk of ``import_state``: keys out, entries in (one per key).

    ``made`` maps every key met to its entry; an entry of a key ``state`` lacks holds
    a placeholder (``import_state`` then refuses). ``walk(node, None)`` returns
    ``node`` with its keys swapped for entries (itself if it holds none).
    """

    def __init__(self, state: Mapping[StateKey, Any]) -> None:
        self.get = state.get
        self.made: dict[StateKey, StateEntry] = {}

    walk = _compile_walk(export=False)


def _check_keys(node: dict, path: str) -> bool:
    """``True``, or refuse a dict whose keys JAX cannot sort (it sorts them)."""
    try:
        sorted(node)  # as JAX sorts them (only dicts with a non-str key get here)
        return True
    except Exception:  # whatever a key's `<` raises, JAX would refuse it too
        pass
    kinds = sorted({type(k).__name__ for k in node})
    where = repr(path) if path else "the root"
    raise LiftValueError(
        f"`export_state`: the dict at {where} has keys of types {', '.join(kinds)}, "
        "which cannot be ordered. JAX sorts a dict's "
        "keys whenever it flattens it, so `lift.jit` and every other transform would "
        "refuse this tree. Use keys of one type (all str, for example)."
    ) from None


# The walks allocate many small objects and make no cycles, and on a large heap the
# collector's passes would dominate their cost (callgrind, 10k-entry trees: 8-40% more
# instructions with it on, depending on when a full collection falls). It is paused
# only while `export_state` or an import walk runs; the count makes overlapping calls
# in several threads restore it once, as the first one found it.
_GC_LOCK = threading.Lock()
_gc_pauses = 0
_gc_resume = False


def pause_collector() -> None:
    """Pause Python's cyclic garbage collector; :func:`resume_collector` undoes it."""
    global _gc_pauses, _gc_resume
    with _GC_LOCK:
        if _gc_pauses == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pauses += 1


def resume_collector() -> None:
    """Undo one :func:`pause_collector`; the last one restores the collector."""
    global _gc_pauses
    with _GC_LOCK:
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_resume:
            gc.enable()


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
        return walk.walk([tree], None)[0], walk
    if type(tree) in _LEAF_TYPES:
        return tree, walk
    return walk.walk(tree, None), walk
