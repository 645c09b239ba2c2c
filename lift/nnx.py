"""Flax NNX modules under lift: their variables as lift state, their code unchanged.

An NNX module is a mutable object graph whose state lives in ``nnx.Variable`` s:
``nnx.Param`` for parameters, ``nnx.BatchStat`` for BatchNorm statistics, RNG counters,
caches. A call mutates them in place (``self.mean.value = ...``). This module splits a
module with NNX's own functional API and keeps the mutable variables in a lift state:

- :func:`from_nnx` ``(module) -> (tree, lift_state)``: ``nnx.split`` s the module into
  its graph definition, the variables that stay in the tree (by default the
  ``nnx.Param`` s, so gradients are taken with respect to them) and the ones that
  become lift state (by default everything else), one lift key per variable, named by
  its attribute path (``.bn.mean``, ``.layers[0].var``).
- :func:`lower` ``(tree)`` is an implicit callable ``(x, ...) -> y``: inside a lift
  frame it ``nnx.merge`` s a module from the frame's values, calls it, and writes the
  variables it changed back with :func:`lift.set`.
- :func:`to_nnx` ``(tree, lift_state) -> module`` merges them back into a module.

Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lift, lift.nnx
    >>> bn = nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
    >>> tree, state = lift.nnx.from_nnx(bn)
    >>> sorted(state)
    [StateKey(".mean"), StateKey(".var")]
    >>> y, state = lift.stateful(lift.nnx.lower(tree))(state, jnp.ones((4, 2)))
    >>> state[lift.StateKey(".mean")].round(3)
    Array([0.1, 0.1], dtype=float32)
    >>> lift.nnx.to_nnx(tree, state).mean[...].round(3)
    Array([0.1, 0.1], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from flax import nnx
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "`lift.nnx` needs Flax (NNX), which is not installed. Install it with "
        "`pip install 'jax-lift[nnx]'`."
    ) from err

import jax.tree_util as jtu

from ._convert import call_in_frame, check_prefix, check_state, take
from ._errors import LiftTypeError, LiftValueError
from ._export import State as LiftState
from ._keys import StateKey

__all__ = ["NnxTree", "from_nnx", "lower", "to_nnx"]

_DEFAULT_FILTER = nnx.Not(nnx.Param)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _name(path: tuple[Any, ...]) -> str:
    """``(DictKey('layers'), DictKey(0), DictKey('mean'))`` → ``.layers[0].mean``."""
    parts = []
    for entry in path:
        part = getattr(
            entry, "key", getattr(entry, "name", getattr(entry, "idx", None))
        )
        parts.append(f".{part}" if isinstance(part, str) else f"[{part!r}]")
    return "".join(parts)


def _variables(state: Any) -> tuple[list[tuple[str, Any]], Any]:
    """``[(name, variable)]`` of an ``nnx.State`` in flatten order, and its treedef."""
    pairs = jtu.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
    return [(_name(path), var) for path, var in pairs], jtu.tree_structure(state)


def _type_name(graphdef: Any) -> str:
    """The class name of the module a graph definition rebuilds."""
    nodes = getattr(graphdef, "nodes", None)
    node = nodes[0] if nodes else graphdef
    return getattr(getattr(node, "type", None), "__name__", "module")


class NnxTree:
    """An NNX module split for lift: graph definition, kept variables, state keys.

    Made by :func:`from_nnx`. A pytree whose children are the kept variables
    (``params``, an ``nnx.State``) and the lift keys of the variables moved to the
    state; differentiate with respect to it and update it like any pytree. Call it
    through :func:`lower`.
    """

    __slots__ = ("graphdef", "keys", "params", "state_def", "what")

    def __init__(
        self,
        graphdef: Any,
        params: Any,
        keys: tuple[StateKey, ...],
        state_def: Any,
        what: Any,
    ) -> None:
        """Hold the parts; use :func:`from_nnx` to make one."""
        self.graphdef = graphdef
        self.params = params
        self.keys = keys
        self.state_def = state_def
        self.what = what

    def __repr__(self) -> str:
        """The module's type and the lift keys."""
        return f"NnxTree({_type_name(self.graphdef)}, keys={list(self.keys)})"


def _unpack(aux: Any, children: Any) -> tuple[Any, Any, Any, Any, Any]:
    (graphdef, state_def, what), (params, keys) = aux, children
    return graphdef, params, keys, state_def, what


jtu.register_pytree_with_keys(
    NnxTree,
    lambda t: (
        ((jtu.GetAttrKey("params"), t.params), (jtu.GetAttrKey("keys"), t.keys)),
        (t.graphdef, t.state_def, t.what),
    ),
    lambda aux, children: NnxTree(*_unpack(aux, children)),
    lambda t: ((t.params, t.keys), (t.graphdef, t.state_def, t.what)),
)


# ------------------------------------------------------------------ conversions


def from_nnx(
    module: Any, what: Any = _DEFAULT_FILTER, *, prefix: str | None = None
) -> tuple[NnxTree, LiftState]:
    """Split an NNX module into a lift tree and a lift state.

    Args:
        module: an ``nnx.Module`` (or any NNX graph node).
        what: an NNX filter choosing the variables that become lift state; by default
            every variable that is not an ``nnx.Param`` (BatchNorm statistics, RNG
            counters and keys, caches, your own ``nnx.Variable`` subclasses).
        prefix: put in front of every key, so the state can be merged with another.

    Returns:
        ``(tree, lift_state)``: an :class:`NnxTree` holding the graph definition, the
        other variables and the keys, and the dict from each key (the variable's
        attribute path, ``.bn.mean``) to its value.

    Raises:
        LiftTypeError: ``module`` is not an NNX graph node.

    Examples:
        >>> from flax import nnx
        >>> import lift.nnx
        >>> class Net(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.linear = nnx.Linear(2, 3, rngs=rngs)
        ...         self.bn = nnx.BatchNorm(3, rngs=rngs)
        >>> tree, state = lift.nnx.from_nnx(Net(nnx.Rngs(0)))
        >>> sorted(state)
        [StateKey(".bn.mean"), StateKey(".bn.var")]
        >>> sorted(tree.params["linear"])
        ['bias', 'kernel']
    """
    where = "`lift.nnx.from_nnx`"
    prefix = check_prefix(prefix, where)
    try:
        graphdef, moved, kept = nnx.split(module, what, ...)
    except Exception as err:
        raise LiftTypeError(
            f"{where} takes an NNX module; `nnx.split` refused the "
            f"{type(module).__name__} given ({err})."
        ) from err
    named, state_def = _variables(moved)
    keys = tuple(StateKey(prefix + name) for name, _ in named)
    lift_state = {
        key: var.get_value() for key, (_, var) in zip(keys, named, strict=True)
    }
    return NnxTree(graphdef, kept, keys, state_def, what), lift_state


def _moved_state(tree: NnxTree, values: list[Any]) -> Any:
    leaves = [leaf for value in values for leaf in jtu.tree_leaves(value)]
    return tree.state_def.unflatten(leaves)


def to_nnx(tree: NnxTree, state: Mapping[StateKey, Any], *, strict: bool = True) -> Any:
    """Merge a lift tree and state back into an NNX module (the inverse of from_nnx).

    Args:
        tree: an :class:`NnxTree` made by :func:`from_nnx`.
        state: its lift state (possibly updated).
        strict: a key of ``state`` that the tree does not use is an error.

    Returns:
        A new NNX module whose variables hold the tree's and the state's values.

    Raises:
        LiftKeyError: a key of the tree is not in ``state``.
        LiftValueError: ``state`` has unused keys (with ``strict``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import lift.nnx
        >>> tree, state = lift.nnx.from_nnx(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
        >>> state = {**state, lift.StateKey(".mean"): jnp.full(2, 5.0, "float32")}
        >>> lift.nnx.to_nnx(tree, state).mean[...]
        Array([5., 5.], dtype=float32)
    """
    where = "`lift.nnx.to_nnx`"
    if not isinstance(tree, NnxTree):
        raise LiftTypeError(
            f"{where} takes the tree made by `from_nnx`; got {type(tree).__name__}."
        )
    check_state(state, where)
    values = take(
        state, tree.keys, where, made_by="from_nnx", owner="the tree", strict=strict
    )
    return nnx.merge(tree.graphdef, _moved_state(tree, values), tree.params)


# ------------------------------------------------------------------------ lower


class Lowered:
    """An NNX module with a lift state: call it as ``lowered(x, ...) -> y``.

    Made by :func:`lower`; a pytree holding the :class:`NnxTree`, so it can be an
    argument of lifted transforms.
    """

    __slots__ = ("tree",)

    def __init__(self, tree: NnxTree) -> None:
        self.tree = tree

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Merge a module from the frame's values, call it, write back what changed."""
        tree = self.tree
        label = f"`lift.nnx.lower({_type_name(tree.graphdef)})`"

        def call(old: list[Any]) -> tuple[Any, list[Any]]:
            module = nnx.merge(tree.graphdef, _moved_state(tree, old), tree.params)
            out = module(*args, **kwargs)
            named, _ = _variables(nnx.state(module, tree.what))
            if len(named) != len(tree.keys):
                raise LiftValueError(
                    f"{label}: the call created or removed variables "
                    f"({len(tree.keys)} before, {len(named)} after); lift state never "
                    "changes its keys. Create every variable in `__init__` "
                    "(initialise lazily built modules before `from_nnx`)."
                )
            return out, [var.get_value() for _, var in named]

        return call_in_frame(tree.keys, call, label, made_by="from_nnx")


jtu.register_pytree_with_keys(
    Lowered,
    lambda f: (((jtu.GetAttrKey("tree"), f.tree),), None),
    lambda _, children: Lowered(*children),
    lambda f: ((f.tree,), None),
)


def lower(tree: NnxTree) -> Lowered:
    """Make a split NNX module implicit: ``(x, ...) -> y`` inside a lift frame.

    Each call ``nnx.merge`` s a module from the tree and the frame's values of its keys,
    calls it with the arguments, and writes each variable it changed back with
    :func:`lift.set` (checked: same structure, shape and dtype). The module's own
    ``__call__`` runs unchanged; ``nnx.BatchNorm``'s ``use_running_average``, dropout's
    ``deterministic`` and similar flags are set on the module before ``from_nnx`` (or
    passed as call arguments).

    Args:
        tree: an :class:`NnxTree` made by :func:`from_nnx`.

    Returns:
        The implicit callable (a pytree holding ``tree``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import lift, lift.nnx
        >>> tree, state = lift.nnx.from_nnx(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
        >>> step = lift.jit(lift.stateful(lambda t, x: lift.nnx.lower(t)(x)))
        >>> y, state = step(state, tree, jnp.array([[0.0, 2.0], [2.0, 4.0]]))
        >>> state[lift.StateKey(".mean")].round(3)
        Array([0.01, 0.03], dtype=float32)
    """
    if not isinstance(tree, NnxTree):
        raise LiftTypeError(
            "`lift.nnx.lower` takes the tree made by `lift.nnx.from_nnx`; got "
            f"{type(tree).__name__}. Split the module first: "
            "`tree, state = lift.nnx.from_nnx(module)`."
        )
    return Lowered(tree)
