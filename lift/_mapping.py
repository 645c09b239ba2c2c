"""``lift.vmap`` and the per-key axes that the mapping transforms share."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax

from ._errors import LiftTypeError, LiftValueError, closest, describe
from ._export import State, as_predicate, match_filters
from ._keys import StateKey, dotted, is_printed_key
from ._lifting import Lifted, Pure, refuse_varying_writes
from ._tracing import batched_here

__all__ = [
    "check_rank",
    "mapped_axes",
    "per_key",
    "prefix_leaves",
    "resolve_axes",
    "vmap",
]


def _keys_in(tree: Any) -> list[StateKey]:
    return [
        x
        for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: type(x) is StateKey)
        if type(x) is StateKey
    ]


def _arg_axes(args: tuple, kwargs: dict, in_axes: Any) -> dict[StateKey, int]:
    """The axis of each state key found inside a mapped argument.

    Callers check first that ``in_axes`` has one spec per positional argument.
    """
    found: dict[StateKey, int] = {}

    def note(tree: Any, axis: Any) -> None:
        if axis is None:
            return
        for key in _keys_in(tree):
            if found.setdefault(key, axis) != axis:
                raise LiftValueError(
                    f"`lift.vmap`: the key {str(key)!r} appears in arguments mapped "
                    f"over different axes ({found[key]} and {axis}). Say which one "
                    f"with `state_axes={{StateKey({str(key)!r}): axis}}`."
                )

    for arg, spec in zip(args, in_axes, strict=True):
        if spec is None or isinstance(spec, int):
            note(arg, spec)
            continue
        specs, treedef = jax.tree_util.tree_flatten(spec, is_leaf=lambda x: x is None)
        for sub, axis in zip(treedef.flatten_up_to(arg), specs, strict=True):
            note(sub, axis)
    note(kwargs, 0)
    return found


def prefix_leaves(
    prefix: Any, tree: Any, *, is_leaf: Callable[[Any], bool]
) -> list[tuple[Any, Any]]:
    """Each leaf of ``tree`` with its entry in ``prefix``, a tree prefix of ``tree``.

    As JAX reads ``in_axes`` and partition specs: an entry (a leaf of ``prefix`` by
    ``is_leaf``) applies to the whole subtree of ``tree`` at its place.
    """
    if is_leaf(prefix):
        return [(leaf, prefix) for leaf in jax.tree_util.tree_leaves(tree)]
    entries, treedef = jax.tree_util.tree_flatten(prefix, is_leaf=is_leaf)
    return [
        (leaf, entry)
        for sub, entry in zip(treedef.flatten_up_to(tree), entries, strict=True)
        for leaf in jax.tree_util.tree_leaves(sub)
    ]


def per_key(
    state: State,
    spec: Any,
    *,
    whole: type | tuple[type, ...],
    default: Callable[[StateKey], Any],
    what: str,
    expected: str,
) -> dict[StateKey, Any]:
    """One value per state key, from ``None``, one value for all, or ``{filter: x}``.

    The resolver behind ``state_axes`` (vmap, pmap, scan) and ``state_specs``
    (shard_map): ``None`` gives each key ``default(key)``; an instance of ``whole``
    applies to every key; a dict maps filters (those of :func:`lift.filter_state`) to
    values, and keys no filter matches get ``default(key)``.

    A filter that names keys (a pattern, a printed key, a StateKey or a type) but
    matches no key of a non-empty state is refused: it is a typo or a path from
    another tree, and ignoring it would map (or carry) the wrong state without a
    word. A predicate may match nothing (write one to select optional state).
    """
    if spec is None:
        return {k: default(k) for k in state}
    if isinstance(spec, whole):
        return dict.fromkeys(state, spec)
    if not isinstance(spec, Mapping):
        raise LiftTypeError(
            f"`{what}` must be {expected}, or a dict {{filter: value}} whose filters "
            "are globs, StateKeys, types or predicates (as in `lift.filter_state`); "
            f"got {type(spec).__name__}: {spec!r}."
        )
    if state:
        for filt in spec:
            _check_matches(state, filt, what)
    return match_filters(state, spec.items(), default)


# How many keys an error lists when no existing path is close to the filter.
_LISTED = 8


def _check_matches(state: State, filt: Any, what: str) -> None:
    """Refuse a filter naming keys (not a predicate) that matches no key."""
    if callable(filt) and not isinstance(filt, (type, str)):
        return  # a predicate: it may select nothing (optional state)
    pred = as_predicate(filt, state)
    # Stops at the first key matched: a filter in use costs little.
    if any(pred(k, v) for k, v in state.items()):
        return
    if isinstance(filt, type):
        raise LiftValueError(
            f"`{what}`: the filter {filt.__name__} matches no key: no value of the "
            "state is an instance of it, so it would be ignored. Name the keys by a "
            "pattern or a StateKey, or drop the filter."
        )
    keyed = isinstance(filt, StateKey) or is_printed_key(filt)
    # A StateKey or printed key is compared with the printed keys; a pattern with the
    # dotted paths it is matched on.
    paths = [str(k) if keyed else dotted(k) for k in state]
    shown = repr(filt) if isinstance(filt, StateKey) else repr(str(filt))
    hint = closest(str(filt), paths)
    if not hint:
        listed = ", ".join(map(repr, paths[:_LISTED]))
        more = f", ... ({len(paths)} keys in all)" if len(paths) > _LISTED else ""
        hint = f"The state has the keys {listed}{more}."
    how = (
        "the printed form of a key (`str(key)`) or its StateKey"
        if keyed
        else "a pattern on the dotted path (`*` matches any run of characters)"
    )
    raise LiftValueError(
        f"`{what}`: the filter {shown} matches no key of the state, so it would "
        f"be ignored. {hint} Write {how} that selects the state you mean, or drop "
        "the filter."
    )


def resolve_axes(
    state: State, spec: Any, inferred: Mapping[StateKey, int], what: str
) -> dict[StateKey, int | None]:
    """The mapped axis of each key (``None``: shared), checked against its rank."""
    axes = per_key(
        state,
        spec,
        whole=int,
        default=inferred.get,
        what=f"lift.{what}(state_axes=...)",
        expected="None (shared), an int (every key mapped over that axis)",
    )
    check_rank(state, axes, what)
    return axes


def check_rank(state: State, axes: Mapping[StateKey, int | None], what: str) -> None:
    for key, axis in axes.items():
        if axis is None:
            continue
        for leaf in jax.tree_util.tree_leaves(state[key]):
            ndim = len(getattr(leaf, "shape", ()))
            if not -ndim <= axis < ndim:
                raise LiftValueError(
                    f"`lift.{what}`: the state {str(key)!r} is {describe(state[key])}, "
                    f"which has no axis {axis} to map over. Build that state with a "
                    "batch axis (e.g. vmap its constructor), or mark it shared with "
                    f"`state_axes={{StateKey({str(key)!r}): None}}`."
                )


def mapped_axes(
    state: State, state_axes: Any, in_axes: Any, args: tuple, kwargs: dict, what: str
) -> tuple[tuple, dict[StateKey, int | None]]:
    """One axis spec per argument, and the axis of each state key (None: shared).

    Shared by the mapping transforms (``vmap``, ``pmap``).
    """
    spec = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    if not isinstance(spec, tuple):
        spec = (spec,) * len(args)
    if len(spec) != len(args):
        raise LiftValueError(
            f"`lift.{what}`: in_axes has {len(spec)} entries but the function got "
            f"{len(args)} positional arguments; give one axis spec per argument."
        )
    axes = resolve_axes(state, state_axes, _arg_axes(args, kwargs, spec), what)
    return spec, axes


def _batched_write(key: StateKey, leaf: Any, where: Any, how: Any) -> LiftValueError:
    return LiftValueError(
        f"`lift.vmap`: the new value of {str(key)!r} differs across the batch, but "
        "that state is shared by the batch (its state axis is None), so one value per "
        "example cannot be written to it. Reduce it over the batch: pass "
        "`axis_name='batch'` and write `lax.pmean(value, 'batch')`; or keep one state "
        f"per example with `state_axes={{StateKey({str(key)!r}): 0}}` (the state then "
        "needs that batch axis)."
    )


def vmap(
    f: Callable[..., Any],
    in_axes: Any = 0,
    out_axes: Any = 0,
    *,
    state_axes: Any = None,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Any = None,
) -> Lifted:
    """:func:`jax.vmap` that threads state.

    State is shared by the batch unless said otherwise: ``state_axes`` is ``None``, an
    int (every key mapped over that axis), or ``{filter: axis}`` with the filters of
    :func:`lift.filter_state`. State whose keys appear in a mapped argument (an
    ensemble whose entries were built under ``vmap``) is mapped over that argument's
    axis without being named. Writing a batched value into shared state is an error.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"total": lift.StateEntry(jnp.zeros(()))})
        >>> def add(x):
        ...     t = lift.get(tree["total"])
        ...     lift.set(tree["total"], t + jax.lax.psum(x, "batch"))
        ...     return x + t
        >>> import jax
        >>> batched = lift.stateful(lift.vmap(add, axis_name="batch"))
        >>> out, state = batched(state, jnp.arange(3.0))
        >>> state[tree["total"]]
        Array(3., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, /, *args: Any, **kwargs: Any) -> Any:
        spec, axes = mapped_axes(state, state_axes, in_axes, args, kwargs, "vmap")
        shared = [k for k, a in axes.items() if a is None]

        def body(state: State, args: tuple, kwargs: dict) -> Any:
            out, new = pures[0](state, *args, **kwargs)
            refuse_varying_writes(
                (
                    (key, leaf, None)
                    for key in shared
                    for leaf in jax.tree_util.tree_leaves(new[key])
                ),
                lambda leaf, _: batched_here(leaf),
                _batched_write,
            )
            return out, new

        return jax.vmap(
            body,
            in_axes=(axes, spec, 0),
            out_axes=(out_axes, axes),
            axis_name=axis_name,
            axis_size=axis_size,
            spmd_axis_name=spmd_axis_name,
        )(state, args, kwargs)

    return Lifted((f,), run, name="vmap")
