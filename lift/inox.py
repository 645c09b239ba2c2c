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
        "`pip install 'jax-lift[inox]'`."
    ) from err

import jax.tree_util as jtu

from ._convert import call_in_frame, check_prefix, check_state, take, unpack
from ._errors import LiftKeyError, LiftTypeError, LiftValueError, closest
from ._export import State as LiftState
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
        prefix: put in front of every lift key (made from an entry's path or an Inox
            key), so the state can be merged with another's.

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
    prefix = check_prefix(prefix, where)
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
            key = StateKey(prefix + where_here)
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
            key = StateKey(prefix + leaf.key)
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
        if not (isinstance(k, _InoxKey) and StateKey(prefix + str(k.key)) in used)
    ]
    if unused:
        raise LiftValueError(
            f"{where}: the Inox state has {len(unused)} value(s) for keys the module "
            f"does not hold ({', '.join(map(repr, unused[:3]))}). Pass the module the "
            "state was exported with (all of it, not a submodule)."
        )
    return jtu.tree_unflatten(treedef, out), lift_state


def to_inox(
    tree: Any,
    state: Mapping[StateKey, Any],
    *,
    prefix: str | None = None,
    strict: bool = True,
) -> tuple[Any, dict[Any, Any]]:
    """Convert back: the exact inverse of :func:`from_inox` on an exported module.

    Every lift key in ``tree`` becomes ``inox.nn.StateKey`` of its string without
    ``prefix`` and the Inox state maps it to ``state[key]`` (the same value objects). A
    module converted while still holding entries comes back exported, as
    ``inox.nn.export_state`` would give it.

    Args:
        tree: a tree made by :func:`from_inox`.
        state: its lift state (possibly updated).
        prefix: the prefix given to :func:`from_inox`.
        strict: a key of ``state`` that the tree does not use is an error.

    Returns:
        ``(module, inox_state)``, ready for ``module(x, inox_state)``.

    Raises:
        LiftKeyError: a key of the tree is not in ``state``.
        LiftValueError: ``state`` has keys the tree does not use (with ``strict``), or
            a key of the tree does not start with ``prefix``.

    Examples:
        >>> import inox.nn as nn
        >>> import lift.inox
        >>> exported, inox_state = nn.export_state(nn.BatchNorm(2))
        >>> module, back = lift.inox.to_inox(*lift.inox.from_inox(exported, inox_state))
        >>> module.stats, list(back) == list(inox_state)
        (StateKey('.stats'), True)
    """
    where = "`lift.inox.to_inox`"
    check_state(state, where)
    prefix = check_prefix(prefix, where)
    keys = _lift_keys(tree)
    names = {}
    for key in keys:
        if not str(key).startswith(prefix):
            raise LiftValueError(
                f"{where}(prefix={prefix!r}): the tree holds the key {str(key)!r}, "
                "which does not start with the prefix. Pass the prefix given to "
                "`from_inox` for this tree."
            )
        names[key] = _InoxKey(str(key)[len(prefix) :])
    values = take(
        state, keys, where, made_by="from_inox", owner="the tree", strict=strict
    )
    inox_state = {names[key]: value for key, value in zip(keys, values, strict=True)}
    module = jtu.tree_map(
        lambda x: names[x] if type(x) is StateKey else x, tree, is_leaf=_is_key
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
        label = f"`lift.inox.lower({type(self.module).__name__})`"

        def call(values: list[Any]) -> tuple[Any, list[Any]]:
            old = dict(zip(keys, values, strict=True))
            out, new = unpack(
                self.module(*args, old, **kwargs),
                Mapping,
                label,
                must="the module must return `(output, state)` with a state dict, "
                "as Inox's stateful modules do",
                fix="Return the state its stateful layers gave back.",
            )
            extra = [k for k in new if k not in old]
            if extra:
                raise LiftValueError(
                    f"{label}: the module returned state under "
                    f"{', '.join(map(repr, extra[:3]))}, which it was not given; "
                    "state is never added silently. Declare it as an "
                    "`inox.nn.StateEntry` when building the module, then convert "
                    "with `from_inox`."
                )
            return out, [new.get(key, old[key]) for key in keys]

        return call_in_frame(keys, call, label, made_by="from_inox")


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
