"""``lift.pmap``: :func:`jax.pmap` that threads state, over lift's ``shard_map``.

One device per index of the mapped axis: mapped axes move to the front, the shared
:func:`~lift._shard.sharded` (the code of ``lift.shard_map``) splits them into blocks
of one over a one-axis mesh, and the per-device function squeezes them away. The state
is one more argument whose keys are mapped or replicated, as in :func:`lift.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ._errors import LiftValueError
from ._export import State
from ._lifting import Lifted, Pure
from ._mapping import mapped_axes, prefix_leaves
from ._shard import _REPLICATED, sharded

__all__ = ["pmap"]


def _leaf_axes(prefix: Any, tree: Any) -> list[int | None]:
    """The axis of each leaf of ``tree``, from an axis spec that is a prefix of it."""
    pairs = prefix_leaves(prefix, tree, is_leaf=lambda x: x is None or type(x) is int)
    return [axis for _, axis in pairs]


def _norm(axis: int | None, ndim: int) -> int | None:
    return axis if axis is None or axis >= 0 else axis + ndim


def _block(value: Any, mapped: bool, *, squeeze: bool) -> Any:
    """A mapped state value's per-device block without (or with) its axis of one."""
    if not mapped:
        return value
    return jax.tree_util.tree_map(lambda x: x[0] if squeeze else x[None], value)


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
        >>> from lift import pmap
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
        state_leaves, state_def = jax.tree_util.tree_flatten(state)
        arg_leaves, args_def = jax.tree_util.tree_flatten((args, kwargs))
        leaves = state_leaves + arg_leaves
        leaf_axes = (
            [a for k in sorted(keys) for a in _leaf_axes(axes[k], state[k])]
            + _leaf_axes(spec, args)
            + _leaf_axes(0, kwargs)
        )
        leaf_axes = [
            _norm(a, jnp.ndim(x)) for x, a in zip(leaves, leaf_axes, strict=True)
        ]
        arg_axes = leaf_axes[len(state_leaves) :]
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
        # One device per index: mapped axes move to the front, where shard_map splits
        # them into blocks of one, which `local` squeezes away.
        n_state = len(leaves) - len(arg_axes)
        mapped = {k for k in keys if axes[k] is not None}
        moved = [
            x if a is None else jnp.moveaxis(x, a, 0)
            for x, a in zip(leaves, leaf_axes, strict=True)
        ]
        moved_state = jax.tree_util.tree_unflatten(state_def, moved[:n_state])
        specs = {k: PartitionSpec(name) if k in mapped else _REPLICATED for k in keys}
        out_prefix = jax.tree_util.tree_map(
            lambda a: _REPLICATED if a is None else PartitionSpec(name),
            out_axes,
            is_leaf=lambda x: x is None,
        )

        def local(state: State, flat: list) -> tuple[Any, State]:
            flat = [
                x if a is None else x[0] for x, a in zip(flat, arg_axes, strict=True)
            ]
            args, kwargs = jax.tree_util.tree_unflatten(args_def, flat)
            state = {k: _block(v, k in mapped, squeeze=True) for k, v in state.items()}
            out, new = pure(state, *args, **kwargs)
            out_leaves, out_def = jax.tree_util.tree_flatten(out)
            out_leaves = [
                x if a is None else x[None]
                for x, a in zip(out_leaves, _leaf_axes(out_axes, out), strict=True)
            ]
            new = {k: _block(v, k in mapped, squeeze=False) for k, v in new.items()}
            return jax.tree_util.tree_unflatten(out_def, out_leaves), new

        out, new = sharded(
            local,
            specs,
            mesh=mesh,
            in_specs=(
                [_REPLICATED if a is None else PartitionSpec(name) for a in arg_axes],
            ),
            out_specs=out_prefix,
            check_vma=check,
            what="pmap",
            fix=fix,
        )(moved_state, (moved[n_state:],))
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

    def run(pures: Sequence[Pure], state: State, /, *args: Any, **kwargs: Any) -> Any:
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
