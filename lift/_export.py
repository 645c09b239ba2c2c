"""The tree layer: export and import state, and the pure operations on state dicts.

A *state* is a plain ``dict`` mapping :class:`~lift.StateKey` to a pytree of arrays.
``export_state`` takes it out of any pytree, ``import_state`` puts it back, and the
other functions here build new state dicts from old ones without mutating them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax

from ._errors import (
    LiftKeyError,
    LiftTypeError,
    LiftValueError,
    closest,
    unflattenable,
)
from ._keys import (
    StateEntry,
    StateKey,
    check_pattern,
    is_printed_key,
    matches,
    not_a_key,
)
from ._swap import (
    _LEAF_TYPES,
    export_entries,
    import_keys,
    pause_collector,
    resume_collector,
)
from ._values import check_value

__all__ = [
    "State",
    "check_value",
    "export_state",
    "filter_state",
    "import_state",
    "merge_states",
    "partition_state",
    "update_state",
]

State = dict[StateKey, Any]
Filter = str | StateKey | type | Callable[[StateKey, Any], bool]
T = TypeVar("T")

_value = operator.attrgetter("value")
_NESTING = frozenset({StateEntry, StateKey})


def _is_entry(node: Any) -> bool:
    return type(node) is StateEntry


def _shared_export(
    tree: Any, prefix: str, is_leaf: Callable[[Any], bool] | None
) -> tuple[Any, State]:
    """Export a tree in which one entry is reached twice, in JAX's flatten order.

    Its first path names the key, used at every place. Rare enough to afford JAX's
    own path flatten.
    """
    leaf = _is_entry if is_leaf is None else lambda x: _is_entry(x) or is_leaf(x)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
    keys: dict[StateEntry, StateKey] = {}
    state: State = {}
    leaves = []
    for path, x in flat:
        if type(x) is StateEntry:
            key = keys.get(x)
            if key is None:
                key = keys[x] = StateKey(prefix + jax.tree_util.keystr(path))
                if key in state:
                    _collision(key, "the key of another entry")
                state[key] = x.value
            x = key
        leaves.append(x)
    return treedef.unflatten(leaves), state


def _collision(key: StateKey, where: str) -> None:
    raise LiftValueError(
        f"`export_state` would create the key {str(key)!r} twice: it is already "
        f"{where}. Two pieces of state would share one name. Pass `prefix=` to "
        "root the new keys elsewhere, import the old state first with "
        "`import_state`, or give a custom node's children distinct keys."
    )


def export_state(
    tree: T,
    *,
    prefix: str | None = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> tuple[T, State]:
    """Swap every :class:`StateEntry` in ``tree`` for a :class:`StateKey`.

    The key of an entry is its JAX key path (rooted at ``prefix`` when given); the same
    entry object reached by two paths is one key, used at both places. Keys already in
    the tree are kept.

    Args:
        tree: any JAX pytree: dicts, lists, tuples, namedtuples, ``None``, registered
            dataclasses, Equinox or Inox modules, custom nodes.
        prefix: a string put in front of every new key's path, so that the states of
            two trees can be merged without collisions.
        is_leaf: as in :func:`jax.tree_util.tree_flatten`; a subtree it accepts is kept
            as it is, neither searched for entries nor checked (the dicts elsewhere
            must have keys JAX can sort).

    Returns:
        ``(tree, state)``: the tree with keys in place of entries, and the dict from
        each key to its entry's value.

    Raises:
        LiftValueError: a new key equals a key already in the tree; a dict has keys
            JAX cannot sort (``{"a": ..., 1: ...}``), or a node cannot be flattened.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> params = {"w": jnp.ones(2), "bn": {"mean": StateEntry(jnp.zeros(2))}}
        >>> tree, state = export_state(params)
        >>> tree["bn"]["mean"]
        StateKey("['bn']['mean']")
        >>> state
        {StateKey("['bn']['mean']"): Array([0., 0.], dtype=float32)}
    """
    if prefix is not None and not isinstance(prefix, str):
        raise LiftTypeError(
            f"`export_state(prefix=...)` must be a str, got {type(prefix).__name__}. "
            "Pass for example `prefix='encoder'`."
        )
    pause_collector()
    try:
        return _export(tree, prefix or "", is_leaf)
    finally:
        resume_collector()


def _export(
    tree: T, prefix: str, is_leaf: Callable[[Any], bool] | None
) -> tuple[T, State]:
    new_tree, walk = export_entries(tree, prefix, is_leaf)
    entries, state = walk.entries, walk.state
    if not entries:
        return tree, {}
    # An entry reached twice (entries hash by identity), or two entries named
    # alike by a custom node: JAX's flatten order decides, or names the clash.
    if len(state) != len(entries) or len(set(entries)) != len(entries):
        new_tree, state = _shared_export(tree, prefix, is_leaf)
    existing = walk.existing
    if existing and not existing.keys().isdisjoint(state):
        key = next(k for k in state if k in existing)
        _collision(key, f"in the tree at path {existing[key][len(prefix) :]!r}")
    if not _LEAF_TYPES.issuperset(map(type, state.values())):
        _refuse_nested(state)
    return new_tree, state


def _refuse_nested(state: State) -> None:
    """Refuse a value holding an entry (or a key): entries do not nest."""
    for key, value in state.items():
        if type(value) in _LEAF_TYPES:
            continue
        try:
            leaves = jax.tree_util.tree_leaves_with_path(
                value, is_leaf=_is_entry_or_key
            )
        except (TypeError, ValueError) as err:  # JAX's "Comparator raised exception"
            raise unflattenable("`export_state`", key, err) from err
        for path, leaf in leaves:
            if type(leaf) in _NESTING:
                inner = str(key) + jax.tree_util.keystr(path)
                raise LiftTypeError(
                    f"`export_state`: the entry at {str(key)!r} holds another "
                    f"{type(leaf).__name__} (at {inner!r}); entries do not nest, and "
                    "the inner one would never get a key. Mark the arrays themselves: "
                    "`{'inner': StateEntry(x)}`, not `StateEntry({'inner': "
                    "StateEntry(x)})`."
                )


def _is_entry_or_key(node: Any) -> bool:
    return type(node) in _NESTING


def import_state(tree: T, state: Mapping[StateKey, Any], *, strict: bool = True) -> T:
    """Put the values of ``state`` back into ``tree``: the inverse of ``export_state``.

    Each :class:`StateKey` in ``tree`` becomes a :class:`StateEntry` holding
    ``state[key]``; a key used at several places becomes one shared entry.

    Args:
        tree: a tree returned by :func:`export_state`.
        state: a dict holding a value for every key in ``tree``.
        strict: also refuse keys of ``state`` that ``tree`` does not use.

    Returns:
        The tree with entries in place of keys.

    Raises:
        LiftKeyError: keys of ``tree`` missing from ``state`` (all of them are listed),
            or, when ``strict``, keys of ``state`` not used by ``tree``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state, import_state
        >>> tree, state = export_state([StateEntry(jnp.zeros(2))])
        >>> import_state(tree, state)
        [StateEntry(float32[2])]
    """
    if not isinstance(state, Mapping):
        raise LiftTypeError(
            "`import_state` takes the state dict that `export_state` returned as its "
            f"second argument; got {type(state).__name__}."
        )
    pause_collector()
    try:
        new_tree, walk = import_keys(tree, state)
    finally:
        resume_collector()
    made = walk.made
    if not made.keys() <= state.keys():
        missing = sorted(str(k) for k in made if k not in state)
        listed = ", ".join(map(repr, missing))
        raise LiftKeyError(
            f"`import_state`: the tree uses {len(missing)} key(s) the state "
            f"does not have: {listed}. {closest(missing[0], state)} Pass the "
            "state that `export_state` returned for this tree (or "
            "`merge_states` of several)."
        )
    if not _NESTING.isdisjoint(map(type, map(_value, made.values()))):
        key = next(k for k, e in made.items() if type(e.value) in _NESTING)
        raise LiftTypeError(
            f"`import_state`: the state's value for {str(key)!r} is a "
            f"{type(state[key]).__name__}; entries do not nest. Pass the state "
            "`export_state` returned, whose values are arrays (or pytrees of them)."
        )
    if strict and len(made) != len(state):
        unused = sorted(str(k) for k in state if k not in made)
        raise LiftKeyError(
            f"`import_state`: the state has {len(unused)} key(s) the tree does not "
            f"use: {', '.join(map(repr, unused))}. Pass `strict=False` to ignore "
            "them, or `filter_state` the state first."
        )
    return new_tree


def update_state(
    state: Mapping[StateKey, Any], mutation: Mapping[StateKey, Any]
) -> State:
    """A new state dict: ``state`` with the values of ``mutation`` written in.

    Args:
        state: the current state.
        mutation: new values for some of its keys.

    Returns:
        A new dict; ``state`` is not changed.

    Raises:
        LiftKeyError: a key of ``mutation`` is not in ``state``.
        LiftValueError: a new value changes the structure, shape or dtype (a numpy
            array JAX would turn into the state's dtype, such as float64 into
            float32, is cast when every element survives exactly; a Python number
            when it fits).
        LiftTypeError: a new value is not an array (a string, an object, an object
            array, a ``jax.ShapeDtypeStruct``).
        TraceError: a new value is a tracer of a transform that has finished.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state, update_state
        >>> tree, state = export_state({"n": StateEntry(jnp.zeros((), "int32"))})
        >>> new = update_state(state, {tree["n"]: jnp.ones((), "int32")})
        >>> int(new[tree["n"]]), int(state[tree["n"]])
        (1, 0)
    """
    for name, arg in (("state", state), ("mutation", mutation)):
        if not isinstance(arg, Mapping):
            raise LiftTypeError(
                f"`update_state`: {name} must be a dict {{StateKey: value}}; got "
                f"{type(arg).__name__}. Build it with keys from the exported tree: "
                "`{tree['bn']['mean']: value}`."
            )
    new = dict(state)
    for key, value in mutation.items():
        if key not in state:
            raise LiftKeyError(
                f"`update_state`: no state under {str(key)!r}. "
                f"{closest(str(key), state)} "
                "Only existing keys can be updated; use `merge_states` to add new ones."
            )
        new[key] = check_value(key, state[key], value, where="`update_state`")
    return new


def merge_states(*states: Mapping[StateKey, Any]) -> State:
    """One state dict holding the keys of all ``states``; they must not overlap.

    Raises:
        LiftValueError: a key appears in two of the states.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state, merge_states
        >>> _, a = export_state(StateEntry(jnp.zeros(1)), prefix="a")
        >>> _, b = export_state(StateEntry(jnp.ones(1)), prefix="b")
        >>> sorted(merge_states(a, b))
        [StateKey("a"), StateKey("b")]
    """
    out: State = {}
    for i, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise LiftTypeError(
                f"`merge_states`: argument {i} is a {type(state).__name__}, not a "
                "state dict. Pass the dicts that `export_state` returns."
            )
        for key, value in state.items():
            if key in out:
                raise LiftValueError(
                    f"`merge_states`: the key {str(key)!r} is in argument {i} and in "
                    "an earlier one; merging would overwrite state. Export the trees "
                    "with distinct `prefix=` values, or `filter_state` one of them "
                    "first."
                )
            out[key] = value
    return out


def as_predicate(
    filt: Any, state: Mapping[StateKey, Any] | None = None
) -> Callable[[StateKey, Any], bool]:
    """A filter (pattern, StateKey, type or predicate) as a ``(key, value) -> bool``.

    A pattern holding ``[`` must be the printed form of a key: of one in ``state``
    when it is given, else at least of a possible key.
    """
    if isinstance(filt, StateKey):
        return lambda key, _: key == filt
    if isinstance(filt, str):
        check_pattern(filt)
        if is_printed_key(filt):
            if state is not None and filt not in state:
                raise not_a_key(filt, "is not the printed form of any key of the state")
            return lambda key, _: key == filt
        return lambda key, _: matches(key, filt)
    if isinstance(filt, type):
        return lambda _, value: isinstance(value, filt)
    if callable(filt):
        return lambda key, value: bool(filt(key, value))
    raise LiftTypeError(
        f"A state filter must be a glob pattern (str), a StateKey, a type or a "
        f"predicate `(key, value) -> bool`; got {type(filt).__name__}: {filt!r}."
    )


def match_filters(
    state: Mapping[StateKey, Any],
    table: Iterable[tuple[Filter, T]],
    default: Callable[[StateKey], T],
) -> dict[StateKey, T]:
    """For each key, the option paired with the first filter of ``table`` it matches.

    Keys no filter matches get ``default(key)``. This is how every per-filter option
    (``partition_state``, ``state_axes``, ``state_specs``) is resolved; filters are
    read as :func:`filter_state` reads them.
    """
    preds = [(as_predicate(filt, state), option) for filt, option in table]
    out: dict[StateKey, T] = {}
    for key, value in state.items():
        out[key] = next((o for p, o in preds if p(key, value)), default(key))
    return out


def filter_state(state: Mapping[StateKey, Any], *filters: Filter) -> State:
    """The part of ``state`` whose keys match any of ``filters``.

    A filter is one of:

    * a **pattern** (``str``) on the key's dotted path: ``['layers'][0]['bn']`` and
      ``.layers[0].bn`` are both ``layers.0.bn``. ``*`` matches any run of
      characters, dots included, or none (``"*.bn.*"`` finds ``bn`` at any depth,
      ``"bn.*"`` only at the root, ``"*mean"`` any path ending in ``mean``); every
      other character matches only itself (``?`` too); a leading ``.`` is optional.
      A pattern is matched against the whole path: ``"bn"`` selects the key
      ``['bn']``, not the keys under it (write ``"bn.*"``);
    * the **printed form of one key** (``str(key)``, such as ``"['bn']['mean']"``):
      any filter holding ``[`` is one, and selects exactly that key. One that is not
      the printed form of a key in the state is refused (``LiftValueError``, showing
      the dotted pattern to write instead), never read as a glob;
    * a :class:`StateKey`: exactly that key (also one whose path holds ``.`` or
      ``*``, which a pattern cannot tell apart from its own);
    * a **type**: the keys whose value is an instance of it;
    * a **predicate** ``(key, value) -> bool``.

    ``partition_state``, ``state_axes`` (``vmap``, ``scan``), ``state_specs``
    (``shard_map``) and ``load_state(filters=)`` read filters the same way.

    Raises:
        LiftValueError: a filter holding ``[`` is not the printed form of a key.
        LiftTypeError: a filter of another kind.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state, filter_state
        >>> tree = {"bn": {"mean": StateEntry(jnp.zeros(1))}, "n": StateEntry(0)}
        >>> _, state = export_state(tree)
        >>> list(filter_state(state, "bn.*"))
        [StateKey("['bn']['mean']")]
        >>> list(filter_state(state, "['n']"))
        [StateKey("['n']")]
    """
    preds = [as_predicate(f, state) for f in filters]
    return {k: v for k, v in state.items() if any(p(k, v) for p in preds)}


def partition_state(
    state: Mapping[StateKey, Any], *filters: Filter
) -> tuple[State, ...]:
    """Split ``state`` by ``filters``: one dict per filter, then one for the rest.

    A key goes to the first filter it matches. ``merge_states`` of the parts is the
    original state. Filters are read as :func:`filter_state` reads them (patterns on
    the dotted path, printed keys, StateKeys, types, predicates).

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state, partition_state
        >>> tree = {"bn": StateEntry(jnp.zeros(1)), "n": StateEntry(0)}
        >>> _, state = export_state(tree)
        >>> bn, rest = partition_state(state, "bn")
        >>> list(bn), list(rest)
        ([StateKey("['bn']")], [StateKey("['n']")])
    """
    rest = len(filters)
    table = [(filt, i) for i, filt in enumerate(filters)]
    which = match_filters(state, table, lambda _: rest)
    parts: list[State] = [{} for _ in range(rest + 1)]
    for key, value in state.items():
        parts[which[key]][key] = value
    return tuple(parts)
