"""Multi-device transforms: ``shard_map`` that threads state, and its core ``sharded``.

``lift.shard_map`` and ``lift.pmap`` (:mod:`lift._pmap`, built on :func:`sharded`) are
instances of :class:`~lift._lifting.Lifted`, like ``lift.jit`` and ``lift.vmap``: a
``run`` applies :func:`jax.shard_map` to the pure function, with the
state as one more argument (and one more output) whose partition specs are given per
key. State is replicated unless said otherwise, and a replicated state may only take
values that are the same on every device: JAX tracks which values vary across a mesh
axis (``check_vma=True``), so a write of a per-device value (batch statistics not yet
``pmean``-ed) is caught while tracing and reported with the key's path.

Nothing here assumes a single process: a mesh over ``jax.devices()`` spans every host
after ``jax.distributed.initialize()``, and the same code runs on each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from ._errors import LiftTypeError, LiftValueError, describe
from ._export import State
from ._keys import StateKey
from ._lifting import Lifted, Pure, refuse_varying_writes
from ._mapping import per_key, prefix_leaves

__all__ = ["pmap", "shard_map", "sharded"]

_REPLICATED = PartitionSpec()


# ------------------------------------------------------------------ varying values


def varying_axes(x: Any) -> frozenset:
    """The mesh axes over which ``x`` may differ, as JAX tracks them inside shard_map.

    JAX 0.10 keeps them in the abstract value's ``manual_axis_type.varying`` (earlier
    releases called the set ``vma``); outside shard_map, or with ``check_vma=False``,
    the set is empty.
    """
    try:
        aval = jax.typeof(x)
    except TypeError:
        return frozenset()
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def _spec_axes(spec: Any) -> frozenset:
    """The mesh axis names a partition spec shards over."""
    names: set = set()
    for part in spec:
        if part is None or part is PartitionSpec.UNCONSTRAINED:
            continue
        names.update(part if isinstance(part, tuple) else (part,))
    return frozenset(names)


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _leaf_specs(spec: Any, value: Any) -> list[tuple[Any, PartitionSpec]]:
    """Each array leaf of ``value`` with its spec (``spec`` is a prefix of it)."""
    pairs = prefix_leaves(spec, value, is_leaf=_is_spec)
    return [(leaf, s or _REPLICATED) for leaf, s in pairs]


def _check_replicated(
    new: State, specs: Mapping[StateKey, Any], what: str, fix: str
) -> None:
    """Refuse a write of a device-varying value into state replicated over an axis."""

    def error(key: StateKey, leaf: Any, spec: Any, extra: frozenset) -> Exception:
        axis = sorted(map(str, extra))[0]
        return LiftValueError(
            f"`lift.{what}`: the new value of {str(key)!r} ({describe(leaf)}) "
            f"differs across the devices of mesh axis {axis!r}, but that state "
            f"is replicated over it (its spec is {spec}), so one value "
            "per device cannot be written to it. Reduce it over the axis first "
            f"(`lax.pmean(value, {axis!r})`), or keep one value per device "
            f"with {fix.format(key=str(key), axis=axis)}."
        )

    refuse_varying_writes(
        (
            (key, leaf, leaf_spec)
            for key, spec in specs.items()
            for leaf, leaf_spec in _leaf_specs(spec, new[key])
        ),
        lambda leaf, spec: varying_axes(leaf) - _spec_axes(spec),
        error,
    )


# ---------------------------------------------------------------------- shard_map


def _state_specs(state: State, state_specs: Any) -> dict[StateKey, Any]:
    return per_key(
        state,
        state_specs,
        whole=PartitionSpec,
        default=lambda _: _REPLICATED,
        what="lift.shard_map(state_specs=...)",
        expected="None (all state replicated), a PartitionSpec for all state",
    )


def sharded(
    fn: Callable[..., tuple[Any, State]],
    specs: dict[StateKey, Any],
    *,
    mesh: Any,
    in_specs: Any,
    out_specs: Any,
    check_vma: bool,
    what: str,
    fix: str,
    axis_names: Any = frozenset(),
) -> Callable[[State, tuple], tuple[Any, State]]:
    """:func:`jax.shard_map` of ``fn(state, *args) -> (out, new_state)``.

    The state is one more argument and output, partitioned by ``specs`` per key; a
    write of a device-varying value into state replicated over an axis is refused
    (while JAX tracks varying values, ``check_vma``). Shared by ``shard_map`` and
    ``pmap``; the result is called as ``(state, args)``.
    """

    def body(state: State, args: tuple) -> tuple[Any, State]:
        out, new = fn(state, *args)
        if check_vma:
            _check_replicated(new, specs, what, fix)
        return out, new

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(specs, in_specs),
        out_specs=(out_specs, specs),
        axis_names=axis_names,
        check_vma=check_vma,
    )


def shard_map(
    f: Callable[..., Any] | None = None,
    /,
    *,
    mesh: Mesh | Any = None,
    in_specs: Any,
    out_specs: Any,
    state_specs: Any = None,
    axis_names: Any = frozenset(),
    check_vma: bool = True,
) -> Any:
    """:func:`jax.shard_map` that threads state.

    ``f`` runs once per device on its block of each argument, as in JAX. The state is
    one more argument and output: ``state_specs`` is ``None`` (every key replicated,
    ``P()``), a ``PartitionSpec`` for every key, or ``{filter: spec}`` with the filters
    of :func:`lift.filter_state` (keys no filter matches are replicated). The mesh's
    axis names are usable inside ``f`` (``lax.pmean(mean, "data")``).

    A replicated state must come out the same on every device: writing a value that
    varies across a mesh axis (a per-device batch statistic, not yet reduced) is an
    error naming the key. JAX tracks this with ``check_vma=True`` (the default); with
    ``check_vma=False`` nothing is tracked and each device's value is taken on trust.

    Args:
        f: the implicit function; ``lift.shard_map(mesh=..., ...)`` without it gives a
            decorator.
        mesh: the device mesh (``None``: the mesh set by :func:`jax.set_mesh`).
        in_specs: partition specs of the positional arguments, as in JAX.
        out_specs: partition specs of the output, as in JAX.
        state_specs: partition specs of the state, per key or filter.
        axis_names: the mesh axes ``f`` is manual over (default: all of them).
        check_vma: let JAX track device-varying values (and lift check state writes).

    Returns:
        The implicit function, called like ``f`` on global arrays.

    Raises:
        LiftValueError: a device-varying value was written into replicated state.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jax import lax
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> import lift
        >>> from lift import shard_map
        >>> mesh = Mesh(jax.devices(), ("data",))
        >>> tree, state = lift.export_state({"mean": lift.StateEntry(jnp.zeros(()))})
        >>> @lift.stateful
        ... @shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        ... def center(x):
        ...     mean = lax.pmean(jnp.mean(x), "data")
        ...     lift.set(tree["mean"], mean)
        ...     return x - mean
        >>> out, state = center(state, jnp.arange(16.0))
        >>> state[tree["mean"]]
        Array(7.5, dtype=float32)
    """
    if f is None:
        return lambda g: shard_map(
            g,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            state_specs=state_specs,
            axis_names=axis_names,
            check_vma=check_vma,
        )
    fix = "`state_specs={{StateKey({key!r}): P({axis!r})}}`"

    def run(pures: Sequence[Pure], state: State, /, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise LiftTypeError(
                "`lift.shard_map` passes positional arguments only (as `jax.shard_map` "
                f"does); got keyword arguments {sorted(kwargs)}. Pass them "
                "positionally and give their specs in `in_specs`."
            )
        specs = _state_specs(state, state_specs)
        pure = pures[0]

        def build() -> Callable[..., Any]:
            return sharded(
                pure,
                specs,
                mesh=mesh,
                in_specs=_per_arg(in_specs, len(args)),
                out_specs=out_specs,
                check_vma=check_vma,
                what="shard_map",
                fix=fix,
                axis_names=axis_names,
            )

        # Specs given as unhashable pytree prefixes make an unhashable key: no cache.
        return pure.built(tuple(specs.items()), build)(state, args)

    return Lifted((f,), run, name="shard_map")


def _per_arg(in_specs: Any, n: int) -> Any:
    # JAX reads a tuple `in_specs` as one spec per argument, anything else as a spec
    # for all of them; the arguments arrive here as one tuple.
    if isinstance(in_specs, list):
        in_specs = tuple(in_specs)
    if isinstance(in_specs, tuple) and len(in_specs) != n:
        raise LiftValueError(
            f"`lift.shard_map`: in_specs has {len(in_specs)} entries but the function "
            f"got {n} positional arguments; give one spec (or spec tree) per argument."
        )
    return in_specs


# `pmap` is built on `sharded` above; importable from here as well.
from ._pmap import pmap  # noqa: E402
