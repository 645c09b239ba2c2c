"""Multi-device transforms: ``shard_map`` and ``pmap`` that thread state.

Both are instances of :class:`~lift._lifting.Lifted`, like ``lift.jit`` and
``lift.vmap``: a ``run`` applies :func:`jax.shard_map` to the pure function, with the
state as one more argument (and one more output) whose partition specs are given per
key. State is replicated unless said otherwise, and a replicated state may only take
values that are the same on every device: JAX tracks which values vary across a mesh
axis (``check_vma=True``), so a write of a per-device value (batch statistics not yet
``pmean``-ed) is caught while tracing and reported with the key's path.

Nothing here assumes a single process: a mesh over ``jax.devices()`` spans every host
after ``jax.distributed.initialize()``, and the same code runs on each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ._errors import LiftTypeError, LiftValueError, describe
from ._export import State
from ._keys import StateKey
from ._lifting import Lifted, Pure
from ._mapping import mapped_axes, per_key

__all__ = ["pmap", "shard_map"]

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
    if spec is None or isinstance(spec, PartitionSpec):
        spec = _REPLICATED if spec is None else spec
        return [(leaf, spec) for leaf in jax.tree_util.tree_leaves(value)]
    specs, treedef = jax.tree_util.tree_flatten(spec, is_leaf=_is_spec)
    pairs = []
    for sub, s in zip(treedef.flatten_up_to(value), specs, strict=True):
        pairs += [(leaf, s or _REPLICATED) for leaf in jax.tree_util.tree_leaves(sub)]
    return pairs


def _check_replicated(
    new: State, specs: Mapping[StateKey, Any], what: str, fix: str
) -> None:
    """Refuse a write of a device-varying value into state replicated over an axis."""
    for key, spec in specs.items():
        for leaf, leaf_spec in _leaf_specs(spec, new[key]):
            extra = varying_axes(leaf) - _spec_axes(leaf_spec)
            if extra:
                axis = sorted(map(str, extra))[0]
                raise LiftValueError(
                    f"`lift.{what}`: the new value of {str(key)!r} ({describe(leaf)}) "
                    f"differs across the devices of mesh axis {axis!r}, but that state "
                    f"is replicated over it (its spec is {leaf_spec}), so one value "
                    "per device cannot be written to it. Reduce it over the axis first "
                    f"(`lax.pmean(value, {axis!r})`), or keep one value per device "
                    f"with {fix.format(key=str(key), axis=axis)}."
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
        >>> from lift._shard import shard_map
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

    def run(pures: Sequence[Pure], state: State, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise LiftTypeError(
                "`lift.shard_map` passes positional arguments only (as `jax.shard_map` "
                f"does); got keyword arguments {sorted(kwargs)}. Pass them "
                "positionally and give their specs in `in_specs`."
            )
        specs = _state_specs(state, state_specs)
        pure = pures[0]

        def build() -> Callable[..., Any]:
            def body(state: State, args: tuple) -> Any:
                out, new = pure(state, *args)
                if check_vma:
                    _check_replicated(new, specs, "shard_map", fix)
                return out, new

            return jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(specs, _per_arg(in_specs, len(args))),
                out_specs=(out_specs, specs),
                axis_names=axis_names,
                check_vma=check_vma,
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


# --------------------------------------------------------------------------- pmap


def _leaf_axes(prefix: Any, tree: Any) -> list[int | None]:
    """The axis of each leaf of ``tree``, from an axis spec that is a prefix of it."""
    n = len(jax.tree_util.tree_leaves(tree))
    if prefix is None or isinstance(prefix, int):
        return [prefix] * n
    axes, treedef = jax.tree_util.tree_flatten(prefix, is_leaf=lambda x: x is None)
    out: list[int | None] = []
    for sub, axis in zip(treedef.flatten_up_to(tree), axes, strict=True):
        out += [axis] * len(jax.tree_util.tree_leaves(sub))
    return out


def _norm(axis: int | None, ndim: int) -> int | None:
    return axis if axis is None or axis >= 0 else axis + ndim


def _unmap(x: Any, axis: int | None) -> Any:
    """Move the mapped axis (leading after shard_map) to ``axis``."""
    return x if axis is None else jnp.moveaxis(x, 0, axis)


def pmap(
    f: Callable[..., Any],
    axis_name: Hashable | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    state_axes: Any = None,
    devices: Sequence[Any] | None = None,
    axis_size: int | None = None,
    check_vma: bool | None = None,
) -> Lifted:
    """:func:`jax.pmap` that threads state: one device per index of the mapped axis.

    ``state_axes`` is as in :func:`lift.vmap`: ``None`` (state replicated on every
    device), an int (every key mapped over that axis, one slice per device), or
    ``{filter: axis}``; keys found inside a mapped argument are mapped over its axis.
    Replicated state is broadcast in and must come out the same on every device:
    writing a per-device value into it is an error; reduce it with
    ``lax.pmean(value, axis_name)`` first.

    This is :func:`jax.shard_map` over a one-axis mesh of ``devices`` (default: the
    first local devices), compiled with :func:`jax.jit`, which is how JAX 0.10
    implements ``jax.pmap`` too. Arguments are global arrays of this process's devices;
    to span several hosts, use :func:`lift.shard_map` with a mesh over
    ``jax.devices()``.

    Unlike ``jax.pmap``, lift keeps JAX's tracking of device-varying values on, to
    check state writes. JAX cannot track them through a collective over the device
    axis and a vmapped axis together (``lax.pmean(x, ("dev", "batch"))`` with
    ``lift.vmap(..., axis_name="batch")`` inside): with ``check_vma=None`` (the
    default) lift then traces ``f`` once more without tracking, as ``jax.pmap`` does,
    and keeps that choice for later calls; so ``f``'s Python runs twice while it is
    first traced, and writes into replicated state are taken on trust (each device
    must write the same value). Pass ``check_vma=False`` to skip the first attempt, or
    ``True`` to make such a collective an error.

    Args:
        f: the implicit function.
        axis_name: the name of the mapped axis, for collectives inside ``f``.
        in_axes: an int, ``None`` or a tree of them per positional argument (keyword
            arguments are mapped over axis 0).
        out_axes: an int, ``None`` or a tree of them for the output.
        state_axes: ``None``, an int, or ``{filter: axis}``.
        devices: the devices to run on, one per index of the mapped axis.
        axis_size: the size of the mapped axis when no argument is mapped.
        check_vma: track device-varying values to check writes into replicated
            state: ``True``, ``False``, or ``None`` (track when JAX can).

    Returns:
        The implicit function.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jax import lax
        >>> import lift
        >>> from lift._shard import pmap
        >>> tree, state = lift.export_state({"total": lift.StateEntry(jnp.zeros(()))})
        >>> def add(x):
        ...     lift.set(tree["total"], lift.get(tree["total"]) + lax.psum(x, "i"))
        ...     return 2 * x
        >>> out, state = lift.stateful(pmap(add, "i"))(state, jnp.arange(4.0))
        >>> out, state[tree["total"]]
        (Array([0., 2., 4., 6.], dtype=float32), Array(6., dtype=float32))
    """
    name = "_lift_pmap_axis" if axis_name is None else axis_name
    fix = "`state_axes={{StateKey({key!r}): 0}}`"
    untracked: set[Pure] = set()  # functions JAX could not trace with check_vma

    def call(pure: Pure, state: State, args: tuple, kwargs: dict, check: bool) -> Any:
        spec, axes = mapped_axes(state, state_axes, in_axes, args, kwargs, "pmap")
        keys = list(state)
        values = [state[k] for k in keys]
        leaves, treedef = jax.tree_util.tree_flatten((values, args, kwargs))
        leaf_axes = (
            [a for k in keys for a in _leaf_axes(axes[k], state[k])]
            + _leaf_axes(spec, args)
            + _leaf_axes(0, kwargs)
        )
        leaf_axes = [
            _norm(a, jnp.ndim(x)) for x, a in zip(leaves, leaf_axes, strict=True)
        ]
        sizes = {
            x.shape[a] for x, a in zip(leaves, leaf_axes, strict=True) if a is not None
        }
        if axis_size is not None:
            sizes.add(axis_size)
        if len(sizes) != 1:
            raise LiftValueError(
                "`lift.pmap`: "
                + (
                    "the mapped axes have different sizes " + str(sorted(sizes))
                    if sizes
                    else "no argument is mapped and `axis_size` is not given"
                )
                + "; map arguments (and state) of one size, one index per device."
            )
        (size,) = sizes
        devs = list(devices) if devices is not None else jax.local_devices()[:size]
        if len(devs) != size:
            raise LiftValueError(
                f"`lift.pmap`: the mapped axis has size {size} but "
                f"{len(devs)} devices are available to map it over; map at most "
                f"{len(jax.local_devices())} (the local device count), or pass "
                "`devices`."
            )
        mesh = Mesh(np.asarray(devs), (name,))
        moved = [
            x if a is None else jnp.moveaxis(x, a, 0)
            for x, a in zip(leaves, leaf_axes, strict=True)
        ]
        in_specs = [
            _REPLICATED if a is None else PartitionSpec(name) for a in leaf_axes
        ]
        mapped_keys = {k for k in keys if axes[k] is not None}
        state_specs = {
            k: PartitionSpec(name) if k in mapped_keys else _REPLICATED for k in keys
        }
        out_prefix = jax.tree_util.tree_map(
            lambda a: _REPLICATED if a is None else PartitionSpec(name),
            out_axes,
            is_leaf=lambda x: x is None,
        )

        def body(flat: list) -> Any:
            flat = [
                x if a is None else x[0] for x, a in zip(flat, leaf_axes, strict=True)
            ]
            values, args, kwargs = jax.tree_util.tree_unflatten(treedef, flat)
            local = dict(zip(keys, values, strict=True))
            out, new = pure(local, *args, **kwargs)
            if check:
                _check_replicated(
                    new,
                    {k: s for k, s in state_specs.items() if k not in mapped_keys},
                    "pmap",
                    fix,
                )
            out_leaves, out_def = jax.tree_util.tree_flatten(out)
            out_leaves = [
                x if a is None else x[None]
                for x, a in zip(out_leaves, _leaf_axes(out_axes, out), strict=True)
            ]
            new = {
                k: jax.tree_util.tree_map(lambda x: x[None], v)
                if k in mapped_keys
                else v
                for k, v in new.items()
            }
            return jax.tree_util.tree_unflatten(out_def, out_leaves), new

        out, new = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(in_specs,),
            out_specs=(out_prefix, state_specs),
            check_vma=check,
        )(moved)
        out_leaves, out_def = jax.tree_util.tree_flatten(out)
        out_leaves = [
            _unmap(x, a)
            for x, a in zip(out_leaves, _leaf_axes(out_axes, out), strict=True)
        ]
        new = {
            k: jax.tree_util.tree_map(lambda x, a=axes[k]: _unmap(x, a), v)
            for k, v in new.items()
        }
        return jax.tree_util.tree_unflatten(out_def, out_leaves), new

    def build(pure: Pure, check: bool) -> Callable[..., Any]:
        return jax.jit(
            lambda state, args, kwargs: call(pure, state, args, kwargs, check)
        )

    def run(pures: Sequence[Pure], state: State, *args: Any, **kwargs: Any) -> Any:
        pure = pures[0]
        check = check_vma is not False and pure not in untracked
        try:
            return pure.built(check, lambda: build(pure, check))(state, args, kwargs)
        except ValueError as err:
            if not (check and check_vma is None and _untrackable(err)):
                raise
        untracked.add(pure)
        return pure.built(False, lambda: build(pure, False))(state, args, kwargs)

    return Lifted((f,), run, name="pmap")


def _untrackable(err: ValueError) -> bool:
    """Whether JAX refused a collective because it cannot track its axes' varying."""
    return "can only accept axis_name which corresponds to one of" in str(err)
