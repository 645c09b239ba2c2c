"""Haiku state under lift: ``hk.transform_with_state`` functions, threaded by frames.

Haiku keeps state in a two-level dict ``{module_name: {name: value}}`` and a transformed
function is pure: ``apply(params, state, rng, *args) -> (out, state)``. This module
gives that state lift keys and makes such an ``apply`` implicit:

- :func:`from_haiku` ``(state) -> lift_state``: one key per value, the JAX key path of
  the value in the dict (``['batch_norm/~/mean_ema']['average']``).
- :func:`to_haiku` ``(lift_state, like) -> state``: the inverse, shaped like ``like``.
- :func:`lower` ``(apply, like)``: an implicit ``(params, rng, *args) -> out`` that
  reads the frame's values for ``like``'s keys, calls ``apply`` and writes back what
  changed with :func:`lift.set`.

Examples:
    >>> import haiku as hk, jax, jax.numpy as jnp
    >>> import lift, lift.haiku
    >>> def count(x):
    ...     n = hk.get_state("n", (), jnp.int32, init=jnp.zeros)
    ...     hk.set_state("n", n + 1)
    ...     return x
    >>> f = hk.without_apply_rng(hk.transform_with_state(count))
    >>> params, hk_state = f.init(None, 1.0)
    >>> state = lift.haiku.from_haiku(hk_state)
    >>> sorted(state)
    [StateKey("['~']['n']")]
    >>> step = lift.stateful(lift.haiku.lower(f.apply, hk_state))
    >>> out, state = step(state, params, 1.0)
    >>> int(state[lift.StateKey("['~']['n']")])
    1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

try:
    import haiku as hk
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "`lift.haiku` needs Haiku, which is not installed. Install it with "
        "`pip install 'jax-lift[haiku]'`."
    ) from err

import functools

from ._convert import call_in_frame, check_prefix, check_state, take, unpack
from ._errors import LiftTypeError, LiftValueError
from ._export import State as LiftState
from ._keys import StateKey

__all__ = ["from_haiku", "lower", "to_haiku"]


def _key(prefix: str, module: str, name: str) -> StateKey:
    return StateKey(f"{prefix}[{module!r}][{name!r}]")


def _items(state: Any, where: str) -> list[tuple[str, str, Any]]:
    """``(module, name, value)`` of a Haiku state dict, in sorted order."""
    if not isinstance(state, Mapping) or not all(
        isinstance(v, Mapping) for v in state.values()
    ):
        raise LiftTypeError(
            f"{where} takes a Haiku state, a dict `{{module_name: {{name: value}}}}` "
            f"as returned by `transformed.init`; got {type(state).__name__}."
        )
    return [
        (module, name, state[module][name])
        for module in sorted(state)
        for name in sorted(state[module])
    ]


def from_haiku(
    state: Mapping[str, Mapping[str, Any]], *, prefix: str = ""
) -> LiftState:
    """Key a Haiku state dict for lift.

    Args:
        state: ``{module_name: {name: value}}``, as ``init`` and ``apply`` return it.
        prefix: put in front of every key, so the state can be merged with another.

    Returns:
        The lift state: ``StateKey("['module']['name']")`` → value (the same objects).

    Raises:
        LiftTypeError: ``state`` is not a two-level dict.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift.haiku
        >>> lift.haiku.from_haiku({"linear": {"counter": jnp.zeros((), "int32")}})
        {StateKey("['linear']['counter']"): Array(0, dtype=int32)}
    """
    where = "`lift.haiku.from_haiku`"
    prefix = check_prefix(prefix, where)
    return {_key(prefix, m, n): v for m, n, v in _items(state, where)}


def to_haiku(
    state: Mapping[StateKey, Any],
    like: Mapping[str, Mapping[str, Any]],
    *,
    prefix: str = "",
    strict: bool = True,
) -> dict[str, dict[str, Any]]:
    """Turn a lift state back into a Haiku state dict shaped like ``like``.

    Args:
        state: the lift state (possibly updated).
        like: a Haiku state with the wanted modules and names (its values are unused).
        prefix: the prefix given to :func:`from_haiku`.
        strict: a key of ``state`` that ``like`` does not have is an error.

    Returns:
        ``{module_name: {name: value}}`` with the values of ``state``.

    Raises:
        LiftKeyError: a value of ``like`` has no key in ``state``.
        LiftValueError: ``state`` has unused keys (with ``strict``).

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift.haiku
        >>> hk_state = {"linear": {"counter": jnp.zeros((), "int32")}}
        >>> state = lift.haiku.from_haiku(hk_state)
        >>> lift.haiku.to_haiku(state, hk_state) == hk_state
        True
    """
    where = "`lift.haiku.to_haiku`"
    check_state(state, where)
    prefix = check_prefix(prefix, where)
    items = _items(like, where)
    keys = [_key(prefix, module, name) for module, name, _ in items]
    values = take(
        state, keys, where, made_by="from_haiku", owner="`like`", strict=strict
    )
    out: dict[str, dict[str, Any]] = {}
    for (module, name, _), value in zip(items, values, strict=True):
        out.setdefault(module, {})[name] = value
    return out


def lower(
    apply: Callable[..., tuple[Any, Any]],
    like: Mapping[str, Mapping[str, Any]],
    *,
    prefix: str = "",
) -> Callable[..., Any]:
    """Make a ``hk.transform_with_state`` apply function implicit.

    ``lower(apply, like)(params, *args)`` calls ``apply(params, state, *args)`` with
    the Haiku state built from the current frame's values of ``like``'s keys, and
    writes back each value that changed (checked like :func:`lift.set`). ``args`` are
    what ``apply`` takes after the state: ``rng, x`` for ``hk.transform_with_state``,
    ``x`` alone after ``hk.without_apply_rng``.

    Args:
        apply: ``transformed.apply``.
        like: a Haiku state of the model (from ``init``) naming its modules and
            values.
        prefix: the prefix given to :func:`from_haiku`.

    Returns:
        The implicit ``(params, *args) -> out``.

    Examples:
        >>> import haiku as hk, jax, jax.numpy as jnp
        >>> import lift, lift.haiku
        >>> def net(x):
        ...     return hk.BatchNorm(True, True, 0.9)(x, is_training=True)
        >>> f = hk.transform_with_state(net)
        >>> x = jnp.array([[0.0, 2.0], [2.0, 4.0]])
        >>> with jax.numpy_dtype_promotion("standard"):  # Haiku mixes int and float
        ...     params, hk_state = f.init(jax.random.key(0), x)
        ...     lowered = lift.haiku.lower(f.apply, hk_state)
        ...     _, state = lift.stateful(lowered)(
        ...         lift.haiku.from_haiku(hk_state), params, None, x)
        >>> average = state[lift.StateKey("['batch_norm/~/mean_ema']['average']")]
        >>> average.shape, bool(jnp.allclose(average, jnp.array([[1.0, 3.0]])))
        ((1, 2), True)
    """
    if not callable(apply):
        raise LiftTypeError(
            f"`lift.haiku.lower` takes `transformed.apply`; got {type(apply).__name__}."
        )
    prefix = check_prefix(prefix, "`lift.haiku.lower`")
    names = [(module, name) for module, name, _ in _items(like, "`lift.haiku.lower`")]
    keys = [_key(prefix, module, name) for module, name in names]
    label = f"`lift.haiku.lower({getattr(apply, '__qualname__', 'apply')})`"

    @functools.wraps(apply)
    def implicit(params: Any, *args: Any, **kwargs: Any) -> Any:
        def call(old: list[Any]) -> tuple[Any, list[Any]]:
            hk_state: dict[str, dict[str, Any]] = {}
            for (module, name), value in zip(names, old, strict=True):
                hk_state.setdefault(module, {})[name] = value
            out, new = unpack(
                apply(params, hk_state, *args, **kwargs),
                object,
                label,
                must="`apply` must return `(out, state)` as "
                "`hk.transform_with_state` makes it",
                fix="Pass `transformed.apply`.",
            )
            got = [(module, name) for module, name, _ in _items(new, label)]
            if got != names:
                added = sorted(set(got) ^ set(names))[:3]
                raise LiftValueError(
                    f"{label}: `apply` returned other state values than it was given "
                    f"({', '.join(str(_key(prefix, *n)) for n in added)}); state is "
                    "never added silently. Initialise it with `transformed.init` and "
                    "pass that state as `like`."
                )
            return out, [new[module][name] for module, name in names]

        return call_in_frame(keys, call, label, made_by="from_haiku")

    return implicit


del hk
