"""Inox modules under lift: convert their state, run their own code unchanged.

Inox marks state with its own ``inox.nn.StateEntry``; ``inox.nn.export_state`` swaps
each entry for an ``inox.nn.StateKey`` and a stateful module is called as
``module(x, state) -> (y, state)``, reading ``state[self.key]`` from a plain dict. This
module moves that state into a lift state dict and back:

- :func:`from_inox` ``(module[, inox_state]) -> (tree, lift_state)`` replaces each
  Inox entry or key with a lift :class:`~lift.StateKey`: the JAX key path of the entry
  (which is also the name Inox's ``export_state`` gives it, such as ``.bn.stats``).
- :func:`lower` ``(tree)`` is an implicit callable ``(x, ...) -> y``: inside a lift
  frame it calls ``module(x, state)`` with a dict of the frame's values, keyed by the
  lift keys the module now holds, so the module's own ``state[self.stats]`` and
  ``update_state`` calls run unchanged; the new values are written with
  :func:`lift.set`.
- :func:`to_inox` ``(tree, lift_state) -> (module, inox_state)`` is the exact inverse:
  Inox ``StateKey`` s again.

Examples:
    >>> import jax, jax.numpy as jnp, inox.nn as nn
    >>> import lift, lift.inox
    >>> tree, state = lift.inox.from_inox(nn.BatchNorm(3))
    >>> tree.stats, sorted(state)
    (StateKey(".stats"), [StateKey(".stats")])
    >>> with jax.numpy_rank_promotion("allow"):  # Inox's BatchNorm broadcasts ranks
    ...     y, state = lift.stateful(lift.inox.lower(tree))(state, jnp.ones((4, 3)))
    >>> state[tree.stats].mean.round(3)  # 0.9 * 0 + 0.1 * 1
    Array([0.1, 0.1, 0.1], dtype=float32)
    >>> module, inox_state = lift.inox.to_inox(tree, state)
    >>> module.stats
    StateKey('.stats')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import inox.nn as inn
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "`lift.inox` needs Inox, which is not installed. Install it with "
        "`pip install lift[inox]`."
    ) from err

import jax.tree_util as jtu

from ._errors import LiftKeyError, LiftTypeError, LiftValueError, closest
from ._export import State as LiftState
from ._frame import get as _get
from ._frame import set as _set
from ._keys import StateKey

__all__ = ["Lowered", "from_inox", "lower", "to_inox"]

_InoxEntry = inn.StateEntry
_InoxKey = inn.StateKey


def _is_inox(x: Any) -> bool:
    # Inox's entries and keys are NamedTuples, pytree nodes: stop at them.
    return isinstance(x, (_InoxEntry, _InoxKey))


def _is_key(x: Any) -> bool:
    return type(x) is StateKey


def _lift_keys(tree: Any) -> list[StateKey]:
    """The lift keys in ``tree``, once each, in flatten order."""
    leaves = jtu.tree_leaves(tree, is_leaf=_is_key)
    return list(dict.fromkeys(x for x in leaves if type(x) is StateKey))


# ------------------------------------------------------------------ conversions


def from_inox(
    module: Any, state: Mapping[Any, Any] | None = None, *, prefix: str | None = None
) -> tuple[Any, LiftState]:
    """Convert an Inox module (or any pytree) and its state to a lift tree and state.

    An ``inox.nn.StateEntry`` becomes the lift key of its JAX key path (what
    ``inox.nn.export_state`` names it too); an ``inox.nn.StateKey`` ``k`` of an exported
    module becomes ``lift.StateKey(k.key)``, with its value taken from ``state``. The
    same Inox key at several places is one lift key.

    Args:
        module: an Inox module holding ``StateEntry``s (as built), or ``StateKey``s (as
            exported by ``inox.nn.export_state``), or both.
        state: the Inox state dict of an exported module; ``None`` when the module
            holds only entries.
        prefix: put in front of the keys made from entries' paths, so the state can be
            merged with another.

    Returns:
        ``(tree, lift_state)``: the module with lift keys in place of Inox's entries
        and keys, and the dict from each key to its value.

    Raises:
        LiftTypeError: an Inox key is not a string, or ``state`` is not a mapping.
        LiftKeyError: an Inox key of the module has no value in ``state``.
        LiftValueError: ``state`` has values for keys the module does not hold, or two
            pieces of state would get the same lift key.

    Examples:
        >>> import jax, inox.nn as nn
        >>> import lift.inox
        >>> exported, inox_state = nn.export_state(nn.BatchNorm(2))
        >>> tree, state = lift.inox.from_inox(exported, inox_state)
        >>> tree.stats, state[tree.stats].var
        (StateKey(".stats"), Array([1., 1.], dtype=float32))
    """
    where = "`lift.inox.from_inox`"
    if prefix is not None and not isinstance(prefix, str):
        raise LiftTypeError(
            f"{where}(prefix=...) must be a str, got {type(prefix).__name__}."
        )
    if state is not None and not isinstance(state, Mapping):
        raise LiftTypeError(
            f"{where} takes the Inox state dict (from `inox.nn.export_state`) as its "
            f"second argument; got {type(state).__name__}."
        )
    inox_state = {} if state is None else state
    leaves, treedef = jtu.tree_flatten_with_path(
        module, is_leaf=lambda x: _is_inox(x) or _is_key(x)
    )
    lift_state: LiftState = {}
    origin: dict[StateKey, str] = {}
    out = []
    for path, leaf in leaves:
        where_here = jtu.keystr(path)
        if isinstance(leaf, _InoxEntry):
            key = StateKey((prefix or "") + where_here)
            value = leaf.value
        elif isinstance(leaf, _InoxKey):
            if not isinstance(leaf.key, str):
                raise LiftTypeError(
                    f"{where}: the Inox key at {where_here!r} is {leaf.key!r}, not a "
                    "string; lift keys are path strings. Export the module with "
                    "`inox.nn.export_state`, which names keys by their paths."
                )
            if leaf not in inox_state:
                hint = closest(leaf.key, [k.key for k in inox_state])
                raise LiftKeyError(
                    f"{where}: the module holds the Inox key {leaf.key!r} (at "
                    f"{where_here!r}) but the state has no value for it. {hint} Pass "
                    "the state exported together with this module."
                )
            key = StateKey(leaf.key)
            if key in lift_state and origin[key] == "key":
                out.append(key)
                continue
            value = inox_state[leaf]
        elif type(leaf) is StateKey:
            raise LiftValueError(
                f"{where}: the module already holds the lift key {str(leaf)!r} (at "
                f"{where_here!r}): it was converted already. Use the tree and lift "
                "state you have, or `to_inox` to go back."
            )
        else:
            out.append(leaf)
            continue
        if key in lift_state:
            raise LiftValueError(
                f"{where}: two pieces of state would share the lift key {str(key)!r} "
                f"(the second at {where_here!r}). Pass `prefix=` to root the keys made "
                "from entries elsewhere."
            )
        lift_state[key] = value
        origin[key] = "key" if isinstance(leaf, _InoxKey) else "entry"
        out.append(key)
    used = {k for k, o in origin.items() if o == "key"}
    unused = [
        k
        for k in inox_state
        if not (isinstance(k, _InoxKey) and StateKey(str(k.key)) in used)
    ]
    if unused:
        raise LiftValueError(
            f"{where}: the Inox state has {len(unused)} value(s) for keys the module "
            f"does not hold ({', '.join(map(repr, unused[:3]))}). Pass the module the "
            "state was exported with (all of it, not a submodule)."
        )
    return jtu.tree_unflatten(treedef, out), lift_state


def to_inox(
    tree: Any, state: Mapping[StateKey, Any], *, strict: bool = True
) -> tuple[Any, dict[Any, Any]]:
    """Convert back: the exact inverse of :func:`from_inox` on an exported module.

    Every lift key in ``tree`` becomes ``inox.nn.StateKey(str(key))`` and the Inox state
    maps it to ``state[key]`` (the same value objects). A module converted while still
    holding entries comes back exported, as ``inox.nn.export_state`` would give it.

    Args:
        tree: a tree made by :func:`from_inox`.
        state: its lift state (possibly updated).
        strict: a key of ``state`` that the tree does not use is an error.

    Returns:
        ``(module, inox_state)``, ready for ``module(x, inox_state)``.

    Raises:
        LiftKeyError: a key of the tree is not in ``state``.
        LiftValueError: ``state`` has keys the tree does not use (with ``strict``).

    Examples:
        >>> import inox.nn as nn
        >>> import lift.inox
        >>> exported, inox_state = nn.export_state(nn.BatchNorm(2))
        >>> module, back = lift.inox.to_inox(*lift.inox.from_inox(exported, inox_state))
        >>> module.stats, list(back) == list(inox_state)
        (StateKey('.stats'), True)
    """
    where = "`lift.inox.to_inox`"
    if not isinstance(state, Mapping):
        raise LiftTypeError(
            f"{where} takes the lift state dict as its second argument; got "
            f"{type(state).__name__}."
        )
    keys = _lift_keys(tree)
    inox_state = {}
    for key in keys:
        if key not in state:
            raise LiftKeyError(
                f"{where}: no state under {str(key)!r}. {closest(str(key), state)} "
                "Pass the lift state made by `from_inox` for this tree."
            )
        inox_state[_InoxKey(str(key))] = state[key]
    if strict and len(state) != len(keys):
        extra = [repr(str(k)) for k in state if k not in set(keys)]
        raise LiftValueError(
            f"{where}: the state has keys the tree does not use "
            f"({', '.join(extra[:3])}). Pass only this tree's state "
            "(`lift.filter_state`), or `strict=False`."
        )
    module = jtu.tree_map(
        lambda x: _InoxKey(str(x)) if type(x) is StateKey else x, tree, is_leaf=_is_key
    )
    return module, inox_state


# ------------------------------------------------------------------------ lower


class Lowered(inn.Module):
    """An Inox module with a lift state: call it as ``lowered(x, ...) -> y``.

    Made by :func:`lower`. It is an Inox module (a pytree), so it can be an argument of
    lifted transforms: passed as a mapped argument of :func:`lift.vmap`, its state is
    mapped on the same axis.
    """

    def __init__(self, module: Any) -> None:
        """Wrap ``module``, a tree made by :func:`from_inox`."""
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``module(*args, state, **kwargs)`` with the current frame's state."""
        keys = _lift_keys(self.module)
        old = {key: _get(key) for key in keys}
        result = self.module(*args, old, **kwargs)
        name = type(self.module).__name__
        if not (
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[1], Mapping)
        ):
            raise LiftValueError(
                f"`lift.inox.lower({name})`: the module must return `(output, state)` "
                f"with a state dict, as Inox's stateful modules do; it returned "
                f"{type(result).__name__}. Return the state its stateful layers gave "
                "back."
            )
        out, new = result
        extra = [k for k in new if k not in old]
        if extra:
            raise LiftValueError(
                f"`lift.inox.lower({name})`: the module returned state under "
                f"{', '.join(map(repr, extra[:3]))}, which it was not given; state is "
                "never added silently. Declare it as an `inox.nn.StateEntry` when "
                "building the module, then convert with `from_inox`."
            )
        for key, before in old.items():
            value = new.get(key, before)
            if value is not before:
                _set(key, value)
        return out


def lower(tree: Any) -> Lowered:
    """Make a converted Inox module implicit: ``(x, ...) -> y`` inside a lift frame.

    The module is called as Inox calls it, ``module(*args, state, **kwargs)`` with the
    state dict after the positional arguments, and must return ``(y, state)``. The dict
    holds the frame's values of the lift keys in ``tree``, keyed by those keys, so the
    module's own ``state[self.key]`` and ``inox.nn.update_state`` run unchanged. Values
    it does not change are not written, so a module in evaluation mode
    (``module.train(False)``) runs in a ``stateful(..., mutable=False)`` frame.

    Args:
        tree: a module converted by :func:`from_inox`.

    Returns:
        The implicit callable, an Inox module holding ``tree``.

    Raises:
        LiftValueError: ``tree`` still holds Inox entries or keys.

    Examples:
        >>> import jax, jax.numpy as jnp, inox.nn as nn
        >>> import lift, lift.inox
        >>> tree, state = lift.inox.from_inox(nn.BatchNorm(2))
        >>> step = lift.jit(lift.stateful(lambda x: lift.inox.lower(tree)(x)))
        >>> with jax.numpy_rank_promotion("allow"):  # as Inox's BatchNorm needs
        ...     y, state = step(state, jnp.array([[0.0, 1.0], [2.0, 3.0]]))
        >>> state[tree.stats].mean.round(3)
        Array([0.1, 0.2], dtype=float32)
    """
    for path, leaf in jtu.tree_flatten_with_path(tree, is_leaf=_is_inox)[0]:
        if _is_inox(leaf):
            raise LiftValueError(
                f"`lift.inox.lower`: the tree holds an Inox {type(leaf).__name__} at "
                f"{jtu.keystr(path)!r}: it was not converted. Convert it first: "
                "`tree, state = lift.inox.from_inox(module)` (or "
                "`from_inox(module, inox_state)` for an exported one)."
            )
    return Lowered(tree)
