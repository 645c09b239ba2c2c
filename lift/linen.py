"""Flax Linen variables under lift: the mutable collections as lift state.

A Linen module keeps its variables in a dict of collections, ``{"params": ...,
"batch_stats": ..., "cache": ...}``, and ``module.apply(variables, x,
mutable=["batch_stats"])`` returns ``(out, updated_collections)``. This module makes
every collection but ``params`` lift state and makes such an ``apply`` implicit:

- :func:`from_linen` ``(variables) -> (params, lift_state)``: one key per array of the
  state collections, the JAX key path of the array in ``variables``
  (``['batch_stats']['BatchNorm_0']['mean']``); ``params`` stays apart, for
  ``lift.grad`` and your optimizer.
- :func:`to_linen` ``(lift_state, like) -> variables``: the inverse, shaped like
  ``like``.
- :func:`lower` ``(module, like)``: an implicit ``(params, *args, **kwargs) -> out``
  that calls ``apply`` with the frame's values and ``mutable=`` the state collections
  (``mutable=False`` in an immutable frame) and writes back what changed with
  :func:`lift.set`.

Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import lift, lift.linen
    >>> bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    >>> variables = bn.init(jax.random.key(0), jnp.ones((4, 2)))
    >>> params, state = lift.linen.from_linen(variables)
    >>> sorted(state)
    [StateKey("['batch_stats']['mean']"), StateKey("['batch_stats']['var']")]
    >>> step = lift.stateful(lift.linen.lower(bn, variables))
    >>> y, state = step(state, params, jnp.array([[0.0, 2.0], [2.0, 4.0]]))
    >>> state[lift.StateKey("['batch_stats']['mean']")]
    Array([0.1, 0.3], dtype=float32)
    >>> lift.linen.to_linen(state, variables)["batch_stats"]["mean"]
    Array([0.1, 0.3], dtype=float32)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

try:
    import flax.errors
    import flax.linen as nn
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "`lift.linen` needs Flax, which is not installed. Install it with "
        "`pip install 'jax-lift[linen]'`."
    ) from err

import functools

import jax.tree_util as jtu

from ._convert import call_in_frame, check_prefix, check_state, take, unpack
from ._errors import FrameError, LiftTypeError, LiftValueError
from ._export import State as LiftState
from ._frame import current_frame
from ._keys import StateKey

__all__ = ["from_linen", "lower", "to_linen"]

# `params` are what a step differentiates and optimizes; `intermediates` are outputs
# (`sow` appends to them), state only when asked for.
_PARAMS = "params"
_NOT_BY_DEFAULT = (_PARAMS, "intermediates")


def _collections(variables: Any, collections: Any, where: str) -> list[str]:
    """The collections of ``variables`` that become lift state, in sorted order."""
    if not isinstance(variables, Mapping):
        raise LiftTypeError(
            f"{where} takes Linen variables, a dict `{{collection: tree}}` as "
            f"`module.init` returns it; got {type(variables).__name__}."
        )
    if collections is None:
        chosen = [c for c in variables if c not in _NOT_BY_DEFAULT]
    elif not isinstance(collections, (list, tuple)) or not all(
        isinstance(c, str) for c in collections
    ):
        raise LiftTypeError(
            f"{where}(collections=...) takes a list of collection names, such as "
            f"`['batch_stats', 'intermediates']`; got {type(collections).__name__}: "
            f"{collections!r}."
        )
    else:
        chosen = list(collections)
        if _PARAMS in chosen:
            raise LiftValueError(
                f"{where}(collections=...) names 'params': parameters stay apart "
                "(`lift.grad` never differentiates state). Leave it out; "
                "`from_linen` returns the params separately."
            )
        absent = [c for c in chosen if c not in variables]
        if absent:
            raise LiftValueError(
                f"{where}(collections=...) names {absent!r}, which the variables do "
                f"not have (they have {sorted(variables)!r}). Name collections that "
                "`module.init` made."
            )
    left = [c for c in variables if c != _PARAMS and c not in chosen]
    if left:
        raise LiftValueError(
            f"{where}: the variables hold the collection(s) {left!r}, which would not "
            "become lift state and would be lost. Add them to `collections=` to keep "
            "them as state, or leave them out of the variables you pass "
            "(`{k: v for k, v in variables.items() if k != 'intermediates'}`)."
        )
    return sorted(chosen)


class _Layout:
    """Where each state array of a Linen variables dict sits, and its lift key."""

    def __init__(self, variables: Any, collections: Any, prefix: Any, where: str):
        prefix = check_prefix(prefix, where)
        self.collections = _collections(variables, collections, where)
        self.treedefs = {}
        self.keys: list[StateKey] = []
        self.counts: list[int] = []
        for c in self.collections:
            leaves, self.treedefs[c] = jtu.tree_flatten_with_path(variables[c])
            self.keys += [self.key(prefix, c, path) for path, _ in leaves]
            self.counts.append(len(leaves))
        self.prefix = prefix

    @staticmethod
    def key(prefix: str, collection: str, path: tuple[Any, ...]) -> StateKey:
        return StateKey(prefix + jtu.keystr((jtu.DictKey(collection), *path)))

    def build(self, values: list[Any]) -> dict[str, Any]:
        """``{collection: tree}`` holding ``values``, in the order of ``keys``."""
        out, start = {}, 0
        for c, n in zip(self.collections, self.counts, strict=True):
            out[c] = jtu.tree_unflatten(self.treedefs[c], values[start : start + n])
            start += n
        return out


def from_linen(
    variables: Mapping[str, Any],
    *,
    prefix: str | None = None,
    collections: list[str] | tuple[str, ...] | None = None,
) -> tuple[Any, LiftState]:
    """Split Linen variables into their params and a lift state.

    Args:
        variables: ``{collection: tree}``, as ``module.init`` returns it.
        prefix: put in front of every key, so the state can be merged with another.
        collections: the collections that become state; by default every one but
            ``params`` and ``intermediates``. Any other collection the variables hold
            is an error rather than being dropped.

    Returns:
        ``(params, lift_state)``: the ``params`` collection (``{}`` if there is none)
        and the dict from each array's key, its JAX key path in ``variables``
        (``StateKey("['batch_stats']['BatchNorm_0']['mean']")``), to the array (the
        same objects).

    Raises:
        LiftTypeError: ``variables`` is not a dict, or ``collections``/``prefix`` are
            of the wrong kind.
        LiftValueError: ``collections`` names ``params`` or a collection that is not
            there, or a collection would be left out.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift.linen
        >>> variables = {"params": {"w": jnp.ones(2)}, "cache": {"i": jnp.zeros(())}}
        >>> params, state = lift.linen.from_linen(variables, prefix="dec")
        >>> params
        {'w': Array([1., 1.], dtype=float32)}
        >>> state
        {StateKey("dec['cache']['i']"): Array(0., dtype=float32)}
    """
    layout = _Layout(variables, collections, prefix, "`lift.linen.from_linen`")
    values = [
        leaf for c in layout.collections for leaf in jtu.tree_leaves(variables[c])
    ]
    return variables.get(_PARAMS, {}), dict(zip(layout.keys, values, strict=True))


def to_linen(
    state: Mapping[StateKey, Any],
    like: Mapping[str, Any],
    *,
    params: Any = None,
    prefix: str | None = None,
    collections: list[str] | tuple[str, ...] | None = None,
    strict: bool = True,
) -> Any:
    """Turn a lift state back into Linen variables shaped like ``like``.

    Args:
        state: the lift state (possibly updated).
        like: the variables :func:`from_linen` was given (only their structure is used,
            and their ``params`` unless ``params`` is given).
        params: the ``params`` collection to put in (after training, yours).
        prefix: the prefix given to :func:`from_linen`.
        collections: the collections given to :func:`from_linen`.
        strict: a key of ``state`` that ``like`` does not have is an error.

    Returns:
        Variables for ``module.apply``, of the same type and collection order as
        ``like``.

    Raises:
        LiftKeyError: an array of ``like``'s state collections has no key in ``state``.
        LiftValueError: ``state`` has unused keys (with ``strict``).

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift.linen
        >>> variables = {"params": {"w": jnp.ones(2)}, "cache": {"i": jnp.zeros(())}}
        >>> params, state = lift.linen.from_linen(variables)
        >>> lift.linen.to_linen(state, variables) == variables
        True
    """
    where = "`lift.linen.to_linen`"
    check_state(state, where)
    layout = _Layout(like, collections, prefix, where)
    values = take(
        state,
        layout.keys,
        where,
        made_by="from_linen",
        owner="`like`",
        strict=strict,
    )
    built = layout.build(values)
    if params is not None:
        built[_PARAMS] = params
    out = {c: built.get(c, tree) for c, tree in like.items()}
    if params is not None and _PARAMS not in out:
        out[_PARAMS] = params
    return out if type(like) is dict else type(like)(out)  # type: ignore[call-arg]


_IMMUTABLE = re.compile(r'variable "(.+)" in "(.*)" because collection "(.+)" is')


def _immutable_write(err: Exception, label: str, prefix: str) -> FrameError:
    found = _IMMUTABLE.search(str(err))
    where = ""
    if found:
        name, scope, collection = found.groups()
        path = [jtu.DictKey(p) for p in scope.split("/") if p] + [jtu.DictKey(name)]
        where = f" to {str(_Layout.key(prefix, collection, tuple(path)))!r}"
    return FrameError(
        f"{label}: the module wrote{where} in an immutable frame (inference mode, "
        "`lift.stateful(..., mutable=False)`), where it runs with `mutable=False`. "
        "Call it in its inference mode (`use_running_average=True`, "
        "`deterministic=True`, ...) or in a mutable frame."
    )


def lower(
    module_or_apply: Any,
    like: Mapping[str, Any],
    *,
    prefix: str | None = None,
    collections: list[str] | tuple[str, ...] | None = None,
) -> Callable[..., Any]:
    """Make a Linen module's ``apply`` implicit: ``(params, *args, **kwargs) -> out``.

    Each call runs ``apply({"params": params, **state_collections}, *args,
    mutable=collections, **kwargs)`` with the current frame's values, and writes back
    each array that changed (checked like :func:`lift.set`). In an immutable frame
    (``lift.stateful(..., mutable=False)``) it runs with ``mutable=False`` and writes
    nothing. ``rngs=`` and the module's own flags pass through ``kwargs``.

    Args:
        module_or_apply: a Linen module, or an apply function such as
            ``functools.partial(module.apply, method=...)``.
        like: the module's variables (from ``init``) naming its collections and arrays.
        prefix: the prefix given to :func:`from_linen`.
        collections: the collections given to :func:`from_linen`.

    Returns:
        The implicit ``(params, *args, **kwargs) -> out``.

    Raises:
        LiftTypeError: ``module_or_apply`` is neither a module nor callable, or a call
            passes ``mutable=``.
        LiftValueError: ``apply`` added or removed variables of a state collection.
        FrameError: the module wrote state in an immutable frame.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> import lift, lift.linen
        >>> bn = nn.BatchNorm(momentum=0.9)
        >>> variables = bn.init(jax.random.key(0), jnp.ones((2, 1)), False)
        >>> params, state = lift.linen.from_linen(variables)
        >>> apply = lift.linen.lower(bn, variables)
        >>> infer = lift.stateful(apply, mutable=False)
        >>> y, new = infer(state, params, jnp.ones((2, 1)), True)
        >>> new == state
        True
    """
    apply = module_or_apply.apply if isinstance(module_or_apply, nn.Module) else None
    is_class = isinstance(module_or_apply, type)
    if apply is None and (is_class or not callable(module_or_apply)):
        got = (
            f"the class {module_or_apply.__name__}"
            if is_class
            else f"a {type(module_or_apply).__name__}"
        )
        raise LiftTypeError(
            f"`lift.linen.lower` takes a Linen module (an instance, as `init` was "
            f"called on) or its `apply`; got {got}. Pass `Net()`, not `Net`."
        )
    apply = apply or module_or_apply
    name = getattr(module_or_apply, "__qualname__", type(module_or_apply).__name__)
    label = f"`lift.linen.lower({name})`"
    layout = _Layout(like, collections, prefix, "`lift.linen.lower`")

    @functools.wraps(apply)
    def implicit(params: Any, *args: Any, **kwargs: Any) -> Any:
        if "mutable" in kwargs:
            raise LiftTypeError(
                f"{label} got `mutable=`: lift chooses it (the state collections, "
                "or `False` in an immutable frame). Leave it out; use "
                "`lift.stateful(..., mutable=False)` for inference."
            )

        def call(old: list[Any]) -> tuple[Any, list[Any]]:
            variables = {_PARAMS: params, **layout.build(old)}
            frame = current_frame()
            if frame is None or not frame.mutable or not layout.collections:
                try:
                    return apply(variables, *args, mutable=False, **kwargs), old
                except flax.errors.ModifyScopeVariableError as err:
                    raise _immutable_write(err, label, layout.prefix) from err
            out, updated = unpack(
                apply(variables, *args, mutable=layout.collections, **kwargs),
                Mapping,
                label,
                must="`apply(..., mutable=[...])` must return `(out, variables)` as "
                "Linen's `apply` does",
                fix="Pass a Linen module or its `apply`.",
            )
            return out, _new_values(layout, updated, old, label)

        return call_in_frame(layout.keys, call, label, made_by="from_linen")

    return implicit


def _new_values(
    layout: _Layout, updated: Mapping[str, Any], old: list[Any], label: str
) -> list[Any]:
    """The updated arrays in the order of ``layout.keys``; the layout may not change."""
    new: list[Any] = []
    start = 0
    for c, n in zip(layout.collections, layout.counts, strict=True):
        expected = layout.keys[start : start + n]
        if c not in updated:  # Linen leaves out a collection with no variables
            new += old[start : start + n]
            start += n
            continue
        leaves = jtu.tree_flatten_with_path(updated[c])[0]
        keys = [_Layout.key(layout.prefix, c, path) for path, _ in leaves]
        if keys != expected:
            changed = sorted(set(map(str, keys)) ^ set(map(str, expected)))
            raise LiftValueError(
                f"{label}: `apply` added or removed variables in the collection {c!r} "
                f"({', '.join(map(repr, changed[:3]))}); state is never added or "
                "dropped silently. Create every variable in `init` and pass those "
                "variables as `like` (a `sow` that appends needs a `reduce_fn` that "
                "keeps the shape)."
            )
        new += [leaf for _, leaf in leaves]
        start += n
    return new
