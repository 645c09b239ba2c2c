"""Random stateful programs: their syntax, and a reference interpreter without lift.

A *program* is a block: a tuple of statements run in order on a running value ``x``
(float32, shape ``(3,)``) and a state of five keys:

* ``a``, ``b``, ``c``: float32 ``(3,)``, shared by every batch;
* ``e``: float32 ``(4, 3)``, one row per member of an ensemble: a ``Vmap(mapped=True)``
  maps it over its rows (``state_axes``), a ``Scan(stacked=True)`` scans over them
  (scan over layers); elsewhere it reads as the mean of its rows and is written as
  one row broadcast to all;
* ``n``: an int32 counter, bumped by ``Incr`` and by every ``While`` iteration.

Under a ``Vmap`` every write is the mean over the batch axes that do not map the key
(``lax.pmean`` in lift), so shared state never takes a batched value.

The reference interpreter here threads the state by hand as a dict in and out of every
statement, runs loops as Python loops, and runs ``Vmap`` without any ``vmap``: values
carry their batch axes explicitly (``x`` has shape ``(*batch, 3)``), the elementwise
expressions broadcast, and a write to shared state is a ``mean`` over those axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

ROWS = 4
CLIP = 3.0
STATE_KEYS = ("a", "b", "c", "e", "n")
VECTOR_KEYS = ("a", "b", "c", "e")

# ------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class X:
    """The running value."""


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Get:
    key: str  # one of VECTOR_KEYS


@dataclass(frozen=True)
class Count:
    """The counter as a float: ``0.1 * n``."""


@dataclass(frozen=True)
class Unary:
    op: str  # "sin" | "tanh"
    arg: Any


@dataclass(frozen=True)
class Binary:
    op: str  # "add" | "mul"
    left: Any
    right: Any


# -------------------------------------------------------------------- statements


@dataclass(frozen=True)
class Set:
    key: str  # one of VECTOR_KEYS
    expr: Any


@dataclass(frozen=True)
class Let:
    """``x = expr``."""

    expr: Any


@dataclass(frozen=True)
class Incr:
    """``n += 1``."""


@dataclass(frozen=True)
class Jit:
    block: tuple


@dataclass(frozen=True)
class Checkpoint:
    block: tuple


@dataclass(frozen=True)
class Vmap:
    """Run ``block`` on ``size`` variants of ``x``; ``x`` becomes their mean.

    ``mapped``: the rows of ``e`` are mapped over the batch (then ``size == ROWS``).
    """

    block: tuple
    size: int
    mapped: bool


@dataclass(frozen=True)
class Scan:
    """``n`` steps of ``x = block(x + 0.1 * i)``; ``x`` becomes (last + mean) / 2.

    ``stacked``: scan over the rows of ``e`` (then ``n == ROWS``).
    """

    block: tuple
    n: int
    stacked: bool


@dataclass(frozen=True)
class Cond:
    """``then`` if ``sum(pred) > 0`` else ``other``; ``pred`` is never batched."""

    pred: Any
    then: tuple
    other: tuple


@dataclass(frozen=True)
class While:
    """``limit = n + count``; while ``n < limit``: bump ``n``, run ``block``."""

    count: int
    block: tuple


@dataclass(frozen=True)
class Fori:
    """``count`` steps of ``x = block(x + 0.1 * i)``."""

    count: int
    block: tuple


@dataclass(frozen=True)
class Ctx:
    """Where a statement runs.

    ``levels``: the batch sizes of the enclosing ``Vmap``s, outermost first.
    ``e_mode``: ``"full"`` (``e`` is ``(ROWS, 3)``), ``"slice"`` (``e`` is one row, in a
    stacked ``Scan``) or the index of the level that maps ``e``.
    """

    levels: tuple[int, ...] = ()
    e_mode: str | int = "full"


def variants(x: Any, size: int, axis: int) -> Any:
    """The ``size`` inputs a ``Vmap`` runs on, stacked along ``axis``."""
    return jnp.stack([x * (1.0 + 0.5 * i) + 0.1 * i for i in range(size)], axis=axis)


def initial(seed: int) -> tuple[dict[str, Any], Any]:
    """A state (by name) and an input drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    state = {k: jnp.asarray(rng.uniform(-1, 1, 3), jnp.float32) for k in "abc"}
    state["e"] = jnp.asarray(rng.uniform(-1, 1, (ROWS, 3)), jnp.float32)
    state["n"] = jnp.asarray(rng.integers(0, 5), jnp.int32)
    return state, jnp.asarray(rng.uniform(-1, 1, 3), jnp.float32)


# ----------------------------------------------------------- reference interpreter


def _shape(ctx: Ctx) -> tuple[int, ...]:
    return (*ctx.levels, 3)


def evaluate(expr: Any, ctx: Ctx, state: dict[str, Any], x: Any) -> Any:
    """The value of ``expr``, with the batch axes of ``ctx``: shape ``(*batch, 3)``."""
    kind = type(expr)
    if kind is X:
        return x
    if kind is Const:
        return jnp.full(_shape(ctx), expr.value, jnp.float32)
    if kind is Count:
        return jnp.broadcast_to(state["n"].astype(jnp.float32) * 0.1, _shape(ctx))
    if kind is Get:
        value = state[expr.key]
        if expr.key == "e" and ctx.e_mode == "full":
            value = jnp.mean(value, axis=0)
        elif expr.key == "e" and isinstance(ctx.e_mode, int):
            shape = [1] * len(ctx.levels) + [3]
            shape[ctx.e_mode] = ROWS
            value = value.reshape(shape)
        return jnp.broadcast_to(value, _shape(ctx))
    if kind is Unary:
        arg = evaluate(expr.arg, ctx, state, x)
        return jnp.sin(arg) if expr.op == "sin" else jnp.tanh(arg)
    if kind is Binary:
        left = evaluate(expr.left, ctx, state, x)
        right = evaluate(expr.right, ctx, state, x)
        return left + right if expr.op == "add" else left * right
    raise TypeError(f"not an expression: {expr!r}")


def _value(expr: Any, ctx: Ctx, state: dict[str, Any], x: Any) -> Any:
    return jnp.clip(evaluate(expr, ctx, state, x), -CLIP, CLIP)


def _write(key: str, value: Any, ctx: Ctx) -> Any:
    """The value a write of the batched ``value`` leaves in state ``key``."""
    batch_axes = tuple(range(len(ctx.levels)))
    if key == "e" and isinstance(ctx.e_mode, int):
        others = tuple(a for a in batch_axes if a != ctx.e_mode)
        return jnp.mean(value, axis=others) if others else value
    reduced = jnp.mean(value, axis=batch_axes) if batch_axes else value
    if key == "e" and ctx.e_mode == "full":
        return jnp.broadcast_to(reduced, (ROWS, 3))
    return reduced


def run_block(
    block: tuple, ctx: Ctx, state: dict[str, Any], x: Any
) -> tuple[Any, dict[str, Any]]:
    """Run ``block``: the new running value and a new state dict (inputs untouched)."""
    for stmt in block:
        x, state = run_statement(stmt, ctx, state, x)
    return x, state


def run_statement(
    stmt: Any, ctx: Ctx, state: dict[str, Any], x: Any
) -> tuple[Any, dict[str, Any]]:
    """Run one statement with explicit state threading."""
    kind = type(stmt)
    if kind is Set:
        value = _write(stmt.key, _value(stmt.expr, ctx, state, x), ctx)
        return x, {**state, stmt.key: value}
    if kind is Let:
        return _value(stmt.expr, ctx, state, x), state
    if kind is Incr:
        return x, {**state, "n": state["n"] + 1}
    if kind in (Jit, Checkpoint):
        return run_block(stmt.block, ctx, state, x)
    if kind is Vmap:
        level = len(ctx.levels)
        inner = Ctx((*ctx.levels, stmt.size), level if stmt.mapped else ctx.e_mode)
        out, state = run_block(
            stmt.block, inner, state, variants(x, stmt.size, axis=level)
        )
        return jnp.mean(out, axis=level), state
    if kind is Scan:
        if stmt.stacked:
            rows, ys = [], []
            inner = Ctx(ctx.levels, "slice")
            for i in range(stmt.n):
                sliced = {**state, "e": state["e"][i]}
                x, sliced = run_block(stmt.block, inner, sliced, x + 0.1 * i)
                rows.append(sliced["e"])
                ys.append(x)
                state = {**sliced, "e": state["e"]}
            state = {**state, "e": jnp.stack(rows)}
        else:
            ys = []
            for i in range(stmt.n):
                x, state = run_block(stmt.block, ctx, state, x + 0.1 * i)
                ys.append(x)
        return 0.5 * (x + jnp.mean(jnp.stack(ys), axis=0)), state
    if kind is Cond:
        # A batch-free predicate: every batch element holds the same value.
        value = evaluate(stmt.pred, ctx, state, x).reshape(-1, 3)[0]
        pred = jnp.sum(value)
        branch = stmt.then if bool(pred > 0) else stmt.other
        return run_block(branch, ctx, state, x)
    if kind is While:
        limit = state["n"] + stmt.count
        while bool(state["n"] < limit):
            state = {**state, "n": state["n"] + 1}
            x, state = run_block(stmt.block, ctx, state, x)
        return x, state
    if kind is Fori:
        for i in range(stmt.count):
            x, state = run_block(stmt.block, ctx, state, x + 0.1 * i)
        return x, state
    raise TypeError(f"not a statement: {stmt!r}")


def run_reference(
    program: tuple, state: dict[str, Any], x: Any
) -> tuple[Any, dict[str, Any]]:
    """Run a whole program from the top level."""
    return run_block(program, Ctx(), dict(state), x)
