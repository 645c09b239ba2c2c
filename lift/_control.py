"""Control flow that threads state: ``scan``, ``cond``, ``switch`` and the loops."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax import lax

from ._errors import LiftTypeError, LiftValueError, describe
from ._export import State
from ._keys import StateKey
from ._lifting import Lifted, Pure
from ._mapping import resolve_axes
from ._static import unmask

__all__ = ["cond", "fori_loop", "scan", "switch", "while_loop"]


def _split_scanned(state: State, state_axes: Any) -> tuple[State, dict[StateKey, int]]:
    """The scanned keys (with their axes) and the carried rest."""
    if state_axes is None:
        return dict(state), {}
    if not isinstance(state_axes, Mapping):
        raise LiftTypeError(
            "`lift.scan(state_axes=...)` must be None (carry all state) or a dict "
            "{filter: axis} naming the state stacked per step (scan over layers); got "
            f"{type(state_axes).__name__}."
        )
    resolved = resolve_axes(state, state_axes, {}, "scan")
    axes = {k: a for k, a in resolved.items() if a is not None}
    return {k: v for k, v in state.items() if k not in axes}, axes


def _check_lengths(
    stacked: State, axes: Mapping[StateKey, int], xs: Any, length: int | None
) -> None:
    """Refuse stacked state whose length is not the number of steps, naming the key.

    Also refuse a leaf of ``xs`` with no leading axis (a scalar), naming it: there
    is no number of steps to read from it.
    """
    leaves = jax.tree_util.tree_leaves_with_path(xs)
    for path, leaf in leaves:
        if not jax.numpy.shape(leaf):
            where = f"`xs{jax.tree_util.keystr(path)}`" if path else "`xs`"
            raise LiftValueError(
                f"`lift.scan`: {where} is {describe(leaf)}, which has no leading "
                "axis to scan over. Every leaf of `xs` needs one entry per step "
                "along its axis 0: stack it, or pass a value that is the same at "
                "every step through `init` or a closure instead."
            )
    if length is not None:
        steps, source = length, f"`length={length}`"
    else:
        steps = jax.numpy.shape(leaves[0][1])[0] if leaves else None
        source = "the leading axis of `xs`"
    first: tuple[StateKey, int] | None = None
    for key, value in stacked.items():
        for leaf in jax.tree_util.tree_leaves(value):
            n = leaf.shape[0]
            where = f"the state {str(key)!r} has {n} entries along its axis {axes[key]}"
            if steps is not None and n != steps:
                raise LiftValueError(
                    f"`lift.scan`: {where}, but the scan runs {steps} steps (from "
                    f"{source}). Scanned state (`state_axes`) needs one slice per "
                    "step: stack it with as many entries as steps, or carry it "
                    f"instead (`state_axes={{StateKey({str(key)!r}): None}}`)."
                )
            if first is None:
                first = (key, n)
            elif n != first[1]:
                raise LiftValueError(
                    f"`lift.scan`: {where}, but the state {str(first[0])!r} has "
                    f"{first[1]}: all scanned state (`state_axes`) needs one slice per "
                    "step. Stack both with the same number of entries, or carry one "
                    f"(`state_axes={{StateKey({str(key)!r}): None}}`)."
                )


def _moveaxis(tree: Any, src: int, dst: int) -> Any:
    if src == dst:
        return tree
    return jax.tree_util.tree_map(lambda x: jax.numpy.moveaxis(x, src, dst), tree)


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    state_axes: Any = None,
) -> tuple[Any, Any]:
    """:func:`jax.lax.scan` that carries state.

    All state is carried through the loop by default, including state the body only
    reads. ``state_axes={filter: axis}`` scans over state stacked along ``axis`` instead
    (one slice per step, as in scan over layers) and restacks the new values.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def body(carry, x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + 1)
        ...     return carry + x, carry
        >>> run = lambda xs: lift.scan(body, 0.0, xs)
        >>> (total, _), state = lift.stateful(run)(state, jnp.arange(4.0))
        >>> total, state[tree["n"]]
        (Array(6., dtype=float32), Array(4., dtype=float32))
    """

    def run(pures: Sequence[Pure], state: State, init: Any, xs: Any) -> Any:
        carried, axes = _split_scanned(state, state_axes)
        stacked = {k: _moveaxis(state[k], a, 0) for k, a in axes.items()}
        _check_lengths(stacked, axes, xs, length)

        def body(carry: Any, x: Any) -> Any:
            (c, carried), (xi, sliced) = carry, x
            (c, y), new = pures[0]({**carried, **sliced}, c, xi)
            return (c, {k: new[k] for k in carried}), (y, {k: new[k] for k in sliced})

        (c, carried), (ys, stacked) = lax.scan(
            body,
            (init, carried),
            (xs, stacked),
            length=length,
            reverse=reverse,
            unroll=unroll,
        )
        stacked = {k: _moveaxis(v, 0, axes[k]) for k, v in stacked.items()}
        return (c, ys), {**carried, **stacked}

    return Lifted((f,), run, name="scan", static_args=False, keep_scalars=True)(
        init, xs
    )


def cond(pred: Any, true_fun: Callable, false_fun: Callable, *operands: Any) -> Any:
    """:func:`jax.lax.cond` that threads state: the branch not taken never writes.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def bump(x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + x)
        ...     return x
        >>> f = lambda p, x: lift.cond(p, bump, lambda x: -x, x)
        >>> lift.stateful(f)(state, False, 2.0)[1][tree["n"]]
        Array(0., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, pred: Any, *ops: Any) -> Any:
        return lax.cond(unmask(pred), pures[0], pures[1], state, *ops)

    return Lifted((true_fun, false_fun), run, name="cond", keep_scalars=True)(
        pred, *operands
    )


def switch(index: Any, branches: Sequence[Callable], *operands: Any) -> Any:
    """:func:`jax.lax.switch` that threads state: only the chosen branch writes.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def put(v):
        ...     return lambda: lift.set(tree["n"], jnp.asarray(v, jnp.float32))
        >>> pick = lift.stateful(lambda i: lift.switch(i, [put(1), put(2), put(3)]))
        >>> pick(state, 1)[1][tree["n"]]
        Array(2., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, index: Any, *ops: Any) -> Any:
        return lax.switch(unmask(index), list(pures), state, *ops)

    return Lifted(tuple(branches), run, name="switch", keep_scalars=True)(
        index, *operands
    )


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any) -> Any:
    """:func:`jax.lax.while_loop` that carries state; ``cond_fun`` may read it.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def body(i):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + 2)
        ...     return i + 1
        >>> loop = lambda: lift.while_loop(lambda i: lift.get(tree["n"]) < 5, body, 0)
        >>> lift.stateful(loop)(state)
        (Array(3, dtype=int32, weak_type=True),
         {StateKey("['n']"): Array(6., dtype=float32)})
    """

    def run(pures: Sequence[Pure], state: State, init: Any) -> Any:
        test = Pure(
            pures[0].f,
            mutable=False,
            name=pures[0].name,
            keep_scalars=True,
            why="it runs the `cond_fun` of `lift.while_loop`, which may read state but "
            "not write it. Move the write into `body_fun`.",
            frameless=pures[0].frameless,
        )
        return lax.while_loop(
            lambda c: test.on_carry(c)[0], pures[1].on_carry, (init, state)
        )

    return Lifted(
        (cond_fun, body_fun),
        run,
        name="while_loop",
        static_args=False,
        keep_scalars=True,
    )(init_val)


def fori_loop(
    lower: Any, upper: Any, body_fun: Callable, init_val: Any, *, unroll: Any = None
) -> Any:
    """:func:`jax.lax.fori_loop` that carries state.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def body(i, acc):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + i)
        ...     return acc + 1
        >>> lift.stateful(lambda: lift.fori_loop(0, 4, body, 0))(state)[1][tree["n"]]
        Array(6., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, init: Any) -> Any:
        return lax.fori_loop(
            lower, upper, pures[0].on_carry, (init, state), unroll=unroll
        )

    return Lifted(
        (body_fun,), run, name="fori_loop", static_args=False, keep_scalars=True
    )(init_val)
