"""Equinox models under lift: convert their state, run their own code unchanged.

Equinox keeps state outside the model, in an :class:`equinox.nn.State` that maps each
:class:`equinox.nn.StateIndex` of the model to a value, and a stateful layer is called
as ``layer(x, state) -> (y, state)``. This module moves that state into a lift state
dict and back:

- :func:`from_equinox` ``(model, state) -> (tree, lift_state)``. Each ``StateIndex``
  of the model keeps its Equinox marker (so the model's own ``state.get``/``set``/
  ``substate``/``update`` calls still find it) and its ``init`` field, the copy of the
  initial value, is replaced by the lift :class:`~lift.StateKey` naming its state: the
  JAX key path of the index in the model, such as ``.bn.ema_state_index``.
- :func:`lower` ``(tree)`` is an implicit callable ``(x, ...) -> y``: inside a lift
  frame it builds an ``eqx.nn.State`` from the frame's values, calls the model and
  writes the new values back with :func:`lift.set`.
- :func:`to_equinox` ``(tree, lift_state) -> (model, state)`` is the exact inverse.

Because the keys sit inside the tree (in the indices' ``init``), a model passed as a
mapped argument of :func:`lift.vmap` has its state mapped on the same axis without
being named: an ensemble built with ``eqx.filter_vmap`` just works.

Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import lift, lift.equinox
    >>> make = eqx.nn.make_with_state(eqx.nn.BatchNorm)
    >>> bn, eqx_state = make(3, "batch", mode="batch")
    >>> tree, state = lift.equinox.from_equinox(bn, eqx_state)
    >>> sorted(state)
    [StateKey(".batch_counter"), StateKey(".batch_state_index")]
    >>> step = lift.stateful(lift.vmap(lift.equinox.lower(tree), axis_name="batch"))
    >>> y, state = step(state, jnp.arange(6.0).reshape(2, 3))
    >>> int(state[tree.batch_counter.init])
    1
    >>> model, eqx_state = lift.equinox.to_equinox(tree, state)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

try:
    import equinox as eqx
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "`lift.equinox` needs Equinox, which is not installed. Install it with "
        "`pip install 'jax-lift[equinox]'`."
    ) from err

import jax.tree_util as jtu

from ._convert import call_in_frame, check_prefix, check_state, take, unpack
from ._errors import LiftKeyError, LiftTypeError, LiftValueError
from ._export import State as LiftState
from ._keys import StateKey

__all__ = ["Lowered", "from_equinox", "lower", "to_equinox"]

_StateIndex = eqx.nn.StateIndex
_EqxState = eqx.nn.State


def _is_index(x: Any) -> bool:
    return isinstance(x, _StateIndex)


# ------------------------------------------------------------- eqx.nn.State access
# The only code that relies on how `eqx.nn.State` is built: it is a registered pytree
# node whose flattening gives its values and, as node data, its markers in order.


def _read_state(state: Any, where: str) -> dict[Hashable, Any]:
    """The ``{marker: value}`` dict of an ``eqx.nn.State``."""
    if not isinstance(state, _EqxState):
        raise LiftTypeError(
            f"{where} takes an `eqx.nn.State`; got {type(state).__name__}. Pass the "
            "state made by `eqx.nn.make_with_state` (or `eqx.nn.State(model)`)."
        )
    try:
        values, markers = state.tree_flatten()
    except ValueError as err:
        raise LiftValueError(
            f"{where} got an `eqx.nn.State` that was already used (Equinox invalidates "
            "a State once a call or `state.set` returns its successor). Pass the "
            "latest state, the one the last call returned."
        ) from err
    return dict(zip(markers, values, strict=True))


def _make_state(markers: list[Hashable], values: list[Any]) -> Any:
    """An ``eqx.nn.State`` mapping each marker to its value, in this order."""
    return _EqxState.tree_unflatten(tuple(markers), tuple(values))


# ------------------------------------------------------------------- tree helpers


def _with_init(index: Any, init: Any) -> Any:
    """``index`` with its ``init`` field (its one pytree child) replaced by ``init``."""
    treedef = jtu.tree_structure(index, is_leaf=lambda x: x is not index)
    return jtu.tree_unflatten(treedef, [init])


def _converted(tree: Any, where: str) -> list[tuple[Hashable, StateKey]]:
    """``(marker, key)`` of each converted index in ``tree``, once per marker."""
    found: dict[Hashable, StateKey] = {}
    for path, leaf in jtu.tree_flatten_with_path(tree, is_leaf=_is_index)[0]:
        if not _is_index(leaf):
            continue
        key = leaf.init
        if type(key) is not StateKey:
            raise LiftValueError(
                f"{where}: the `eqx.nn.StateIndex` at {jtu.keystr(path)!r} was not "
                "converted (its `init` is not a lift StateKey). Convert the model "
                "first: `tree, state = lift.equinox.from_equinox(model, eqx_state)`."
            )
        found.setdefault(leaf.marker, key)
    return list(found.items())


# ------------------------------------------------------------------ conversions


def from_equinox(
    model: Any, state: Any = None, *, prefix: str | None = None
) -> tuple[Any, LiftState]:
    """Convert an Equinox model and its ``eqx.nn.State`` to a lift tree and state.

    Each :class:`equinox.nn.StateIndex` in ``model`` keeps its marker and gets the lift
    :class:`~lift.StateKey` of its state as its ``init`` (the initial-value copy, which
    ``eqx.nn.make_with_state`` deletes anyway). The key is the JAX key path of the
    index in ``model`` (``.bn.ema_state_index``); an index reached by two paths is one
    key, named by the first. Values are taken as they are (batched values of layers
    built with ``eqx.filter_vmap`` keep their batch axis).

    Args:
        model: any pytree holding ``eqx.nn.StateIndex``es: made by
            ``eqx.nn.make_with_state``, stripped by ``eqx.nn.delete_init_state``, or
            still holding its initial values.
        state: its ``eqx.nn.State``. ``None`` takes the initial values stored in the
            model (as ``eqx.nn.State(model)`` does).
        prefix: put in front of every key, so the state can be merged with another.

    Returns:
        ``(tree, lift_state)``: the model with keys in its indices, and the dict from
        each key to its value.

    Raises:
        LiftTypeError: ``state`` is not an ``eqx.nn.State``.
        LiftKeyError: an index of the model has no value in ``state``.
        LiftValueError: ``state`` has values for indices the model does not hold, the
            ``State`` was already used, or the model was converted already.

    Examples:
        >>> import equinox as eqx, jax.numpy as jnp
        >>> import lift.equinox
        >>> class Counter(eqx.Module):
        ...     index: eqx.nn.StateIndex
        ...     def __init__(self):
        ...         self.index = eqx.nn.StateIndex(jnp.array(0))
        ...     def __call__(self, x, state):
        ...         n = state.get(self.index)
        ...         return x + n, state.set(self.index, n + 1)
        >>> model, eqx_state = eqx.nn.make_with_state(Counter)()
        >>> tree, state = lift.equinox.from_equinox(model, eqx_state)
        >>> tree.index.init, state[tree.index.init]
        (StateKey(".index"), Array(0, dtype=int32, weak_type=True))
    """
    where = "`lift.equinox.from_equinox`"
    prefix = check_prefix(prefix, where)
    leaves, treedef = jtu.tree_flatten_with_path(model, is_leaf=_is_index)
    if state is None:
        if any(_is_index(x) and type(x.init) is StateKey for _, x in leaves):
            raise LiftValueError(f"{where}: this model was converted already.")
        try:
            state = _EqxState(model)
        except ValueError as err:
            raise LiftValueError(
                f"{where}(model) without a state needs the initial values stored in "
                "the model, but they were deleted (by `eqx.nn.make_with_state` or "
                "`eqx.nn.delete_init_state`). Pass the `eqx.nn.State` too: "
                "`from_equinox(model, state)`."
            ) from err
    values = _read_state(state, where)
    keys: dict[Hashable, StateKey] = {}
    lift_state: LiftState = {}
    out = []
    for path, leaf in leaves:
        if _is_index(leaf):
            if type(leaf.init) is StateKey:
                raise LiftValueError(
                    f"{where}: the index at {jtu.keystr(path)!r} already holds the "
                    f"lift key {str(leaf.init)!r}: this model was converted already. "
                    "Use the tree and lift state you have, or `to_equinox` to go back."
                )
            key = keys.get(leaf.marker)
            if key is None:
                key = StateKey(prefix + jtu.keystr(path))
                if leaf.marker not in values:
                    raise LiftKeyError(
                        f"{where}: the `eqx.nn.StateIndex` at {jtu.keystr(path)!r} has "
                        "no value in the given `eqx.nn.State`. Pass the state made "
                        "together with this model (`eqx.nn.make_with_state`), not one "
                        "of another model or a `substate`."
                    )
                keys[leaf.marker] = key
                lift_state[key] = values[leaf.marker]
            leaf = _with_init(leaf, key)
        out.append(leaf)
    unused = [m for m in values if m not in keys]
    if unused:
        raise LiftValueError(
            f"{where}: the `eqx.nn.State` holds {len(unused)} value(s) for indices "
            f"that are not in the model ({', '.join(map(str, unused[:3]))}). Pass the "
            "model the state was made with (all of it, not a submodule)."
        )
    return jtu.tree_unflatten(treedef, out), lift_state


def to_equinox(
    tree: Any, state: Mapping[StateKey, Any], *, strict: bool = True
) -> tuple[Any, Any]:
    """Convert back: the exact inverse of :func:`from_equinox`.

    The model's indices get Equinox's deleted-initial-state marker again (as after
    ``eqx.nn.make_with_state``) and the ``eqx.nn.State`` maps each index's marker to
    ``state[key]``, in the model's order; the values are the same objects.

    Args:
        tree: a tree made by :func:`from_equinox`.
        state: its lift state (possibly updated).
        strict: a key of ``state`` that the tree does not use is an error.

    Returns:
        ``(model, eqx_state)``, ready for ``model(x, eqx_state)``.

    Raises:
        LiftKeyError: a key of the tree is not in ``state``.
        LiftValueError: ``state`` has unused keys (with ``strict``), or an index of the
            tree was not converted.

    Examples:
        >>> import equinox as eqx
        >>> import lift.equinox
        >>> make = eqx.nn.make_with_state(eqx.nn.BatchNorm)
        >>> bn, eqx_state = make(2, "batch", mode="batch")
        >>> tree, state = lift.equinox.from_equinox(bn, eqx_state)
        >>> model, back = lift.equinox.to_equinox(tree, state)
        >>> bool(eqx.tree_equal(model, bn)), bool(eqx.tree_equal(back, eqx_state))
        (True, True)
    """
    where = "`lift.equinox.to_equinox`"
    check_state(state, where)
    pairs = _converted(tree, where)
    keys = [key for _, key in pairs]
    values = take(
        state, keys, where, made_by="from_equinox", owner="the tree", strict=strict
    )
    model = eqx.nn.delete_init_state(tree)
    return model, _make_state([m for m, _ in pairs], values)


# ------------------------------------------------------------------------ lower


class Lowered(eqx.Module):
    """An Equinox model with a lift state: call it as ``lowered(x, ...) -> y``.

    Made by :func:`lower`. It is an Equinox module (a pytree), so it can be an argument
    of lifted transforms: passed as a mapped argument of :func:`lift.vmap`, its state is
    mapped on the same axis.
    """

    model: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``model(*args, eqx_state, **kwargs)`` with the current frame's state."""
        pairs = _converted(self.model, "`lift.equinox.lower`")
        markers = [m for m, _ in pairs]
        label = f"`lift.equinox.lower({type(self.model).__name__})`"

        def call(old: list[Any]) -> tuple[Any, list[Any]]:
            out, new_state = unpack(
                self.model(*args, _make_state(markers, old), **kwargs),
                _EqxState,
                label,
                must="the model must return `(output, state)` with an "
                "`eqx.nn.State`, as Equinox's stateful layers do",
                fix="Return the state the model's stateful layers gave back.",
            )
            new = _read_state(new_state, "`lift.equinox.lower`")
            if new.keys() != set(markers):
                raise LiftValueError(
                    f"{label}: the model returned an `eqx.nn.State` with other "
                    "indices than it was given. Return the whole state (after "
                    "`state.update(substate)`), not a `substate`."
                )
            return out, [new[marker] for marker in markers]

        return call_in_frame(
            [key for _, key in pairs], call, label, made_by="from_equinox"
        )


def lower(tree: Any) -> Lowered:
    """Make a converted Equinox model implicit: ``(x, ...) -> y`` inside a lift frame.

    The model is called as Equinox calls it, ``model(*args, eqx_state, **kwargs)`` with
    the state after the positional arguments, and must return ``(y, eqx_state)``. Its
    own code runs unchanged, ``state.get``/``set``/``substate``/``update`` and
    ``eqx.filter_vmap`` over sub-states included; values it does not change are not
    written, so a model in inference mode runs in a ``stateful(..., mutable=False)``
    frame.

    Args:
        tree: a model converted by :func:`from_equinox`.

    Returns:
        The implicit callable, an Equinox module holding ``tree``.

    Examples:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> import lift, lift.equinox
        >>> linear = eqx.nn.Linear(3, 3, key=jax.random.key(0))
        >>> sn, eqx_state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        ...     linear, "weight", key=jax.random.key(1))
        >>> tree, state = lift.equinox.from_equinox(sn, eqx_state)
        >>> y, new = lift.stateful(lift.equinox.lower(tree))(state, jnp.ones(3))
        >>> key = tree.uv_index.init  # the lift key of the power-iteration vectors
        >>> y.shape, bool((new[key][0] != state[key][0]).any())
        ((3,), True)
    """
    _converted(tree, "`lift.equinox.lower`")
    return Lowered(tree)
