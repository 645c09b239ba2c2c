"""Differential tests: random stateful programs run by lift and by a plain reference.

Hypothesis builds small programs (``tests/reference.py`` defines their syntax) that
read and write state under nested ``Jit``, ``Vmap``, ``Scan``, ``Cond``, ``While``,
``Fori`` and ``Checkpoint``. lift runs them with ``lift.get``/``lift.set`` and its
lifted transforms inside ``lift.stateful``; the reference threads a state dict by hand
with Python loops and explicit batch axes. Outputs and final states must agree, eagerly
and with the whole program under ``lift.jit``.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jax import lax

import lift

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

MAX_DEPTH = 3
# The example count comes from the hypothesis profile (``dev`` 20, ``ci`` 100).
SETTINGS = settings(
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # shrinking recompiles: too slow
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The retrace properties need fewer programs: half of the profile's count.
HALF = settings(SETTINGS, max_examples=max(5, settings().max_examples // 2))

# --------------------------------------------------------------------- strategies


def _leaves(ctx: ref.Ctx, batch_free: bool) -> st.SearchStrategy:
    keys = [
        k
        for k in ref.VECTOR_KEYS
        if not (batch_free and k == "e" and isinstance(ctx.e_mode, int))
    ]
    options = [
        st.builds(ref.Const, st.sampled_from([-1.5, -0.5, 0.25, 1.0, 2.0])),
        st.builds(ref.Get, st.sampled_from(keys)),
        st.just(ref.Count()),
    ]
    if not (batch_free and ctx.levels):
        options.append(st.just(ref.X()))
    return st.one_of(options)


def expressions(ctx: ref.Ctx, *, batch_free: bool = False) -> st.SearchStrategy:
    """Expressions valid in ``ctx``; ``batch_free`` ones never vary over a batch."""
    return st.recursive(
        _leaves(ctx, batch_free),
        lambda inner: st.one_of(
            st.builds(ref.Unary, st.sampled_from(["sin", "tanh"]), inner),
            st.builds(ref.Binary, st.sampled_from(["add", "mul"]), inner, inner),
        ),
        max_leaves=4,
    )


def statements(ctx: ref.Ctx, depth: int) -> st.SearchStrategy:
    simple = [
        st.builds(ref.Set, st.sampled_from(ref.VECTOR_KEYS), expressions(ctx)),
        st.builds(ref.Let, expressions(ctx)),
        st.just(ref.Incr()),
    ]
    if depth >= MAX_DEPTH:
        return st.one_of(simple)

    def sub(inner: ref.Ctx = ctx) -> st.SearchStrategy:
        return st.deferred(lambda: blocks(inner, depth + 1))

    nested = [
        st.builds(ref.Jit, sub()),
        st.builds(ref.Checkpoint, sub()),
        st.integers(2, 3).flatmap(
            lambda size: st.builds(
                ref.Vmap,
                sub(ref.Ctx((*ctx.levels, size), ctx.e_mode)),
                st.just(size),
                st.just(False),
            )
        ),
        st.builds(ref.Scan, sub(), st.integers(1, 3), st.just(False)),
        st.builds(ref.Cond, expressions(ctx, batch_free=True), sub(), sub()),
        st.builds(ref.While, st.integers(0, 3), sub()),
        st.builds(ref.Fori, st.integers(1, 3), sub()),
    ]
    if ctx.e_mode == "full":
        mapped = ref.Ctx((*ctx.levels, ref.ROWS), len(ctx.levels))
        nested.append(
            st.builds(ref.Vmap, sub(mapped), st.just(ref.ROWS), st.just(True))
        )
        sliced = ref.Ctx(ctx.levels, "slice")
        nested.append(
            st.builds(ref.Scan, sub(sliced), st.just(ref.ROWS), st.just(True))
        )
    return st.one_of(*simple, *nested)


def blocks(ctx: ref.Ctx, depth: int) -> st.SearchStrategy:
    return st.lists(statements(ctx, depth), min_size=1, max_size=3).map(tuple)


programs = blocks(ref.Ctx(), 1)

# ------------------------------------------------------------- lift interpreter


class LiftInterpreter:
    """Runs programs with ``lift.get``/``lift.set`` and lift's transforms.

    ``jit_traces`` counts the Python executions of blocks under a ``Jit``, so a test
    can tell that compiled code was not traced again. (``chex.assert_max_traces``
    cannot count these: it keys its counter on where a function is defined, and the
    ``Jit`` blocks of one program are all defined by the same line below.)
    """

    def __init__(self, keys: dict[str, lift.StateKey]) -> None:
        self.keys = keys
        self.jit_traces = 0
        self._jitted: dict[Any, Any] = {}

    def evaluate(self, expr: Any, ctx: ref.Ctx, x: Any) -> Any:
        kind = type(expr)
        if kind is ref.X:
            return x
        if kind is ref.Const:
            return jnp.full((3,), expr.value, jnp.float32)
        if kind is ref.Count:
            count = lift.get(self.keys["n"]).astype(jnp.float32) * 0.1
            return jnp.broadcast_to(count, (3,))
        if kind is ref.Get:
            value = lift.get(self.keys[expr.key])
            return jnp.mean(value, axis=0) if value.ndim == 2 else value
        if kind is ref.Unary:
            arg = self.evaluate(expr.arg, ctx, x)
            return jnp.sin(arg) if expr.op == "sin" else jnp.tanh(arg)
        left = self.evaluate(expr.left, ctx, x)
        right = self.evaluate(expr.right, ctx, x)
        return left + right if expr.op == "add" else left * right

    def value(self, expr: Any, ctx: ref.Ctx, x: Any) -> Any:
        return jnp.clip(self.evaluate(expr, ctx, x), -ref.CLIP, ref.CLIP)

    def block(self, block: tuple, ctx: ref.Ctx, x: Any) -> Any:
        for stmt in block:
            x = self.statement(stmt, ctx, x)
        return x

    def jit_block(self, block: tuple, ctx: ref.Ctx, x: Any) -> Any:
        self.jit_traces += 1
        return self.block(block, ctx, x)

    def write(self, key: str, value: Any, ctx: ref.Ctx) -> None:
        names = [
            _axis(level)
            for level in range(len(ctx.levels))
            if not (key == "e" and level == ctx.e_mode)
        ]
        if names:
            value = lax.pmean(value, tuple(names))
        if key == "e" and ctx.e_mode == "full":
            value = jnp.broadcast_to(value, (ref.ROWS, 3))
        lift.set(self.keys[key], value)

    def statement(self, stmt: Any, ctx: ref.Ctx, x: Any) -> Any:
        kind = type(stmt)
        if kind is ref.Set:
            self.write(stmt.key, self.value(stmt.expr, ctx, x), ctx)
            return x
        if kind is ref.Let:
            return self.value(stmt.expr, ctx, x)
        if kind is ref.Incr:
            lift.set(self.keys["n"], lift.get(self.keys["n"]) + 1)
            return x
        if kind is ref.Jit:
            fn = self._jitted.get((stmt, ctx))
            if fn is None:
                fn = self._jitted[stmt, ctx] = lift.jit(
                    lambda x: self.jit_block(stmt.block, ctx, x)
                )
            return fn(x)
        if kind is ref.Checkpoint:
            return lift.checkpoint(lambda x: self.block(stmt.block, ctx, x))(x)
        if kind is ref.Vmap:
            level = len(ctx.levels)
            inner = ref.Ctx(
                (*ctx.levels, stmt.size), level if stmt.mapped else ctx.e_mode
            )
            out = lift.vmap(
                lambda x: self.block(stmt.block, inner, x),
                axis_name=_axis(level),
                state_axes={self.keys["e"]: 0} if stmt.mapped else None,
            )(ref.variants(x, stmt.size, axis=0))
            return jnp.mean(out, axis=0)
        if kind is ref.Scan:
            inner = ref.Ctx(ctx.levels, "slice") if stmt.stacked else ctx

            def body(c: Any, i: Any) -> Any:
                c = self.block(stmt.block, inner, c + 0.1 * i)  # i: float32
                return c, c

            last, ys = lift.scan(
                body,
                x,
                jnp.arange(stmt.n, dtype=jnp.float32),
                state_axes={self.keys["e"]: 0} if stmt.stacked else None,
            )
            return 0.5 * (last + jnp.mean(ys, axis=0))
        if kind is ref.Cond:
            pred = jnp.sum(self.evaluate(stmt.pred, ctx, x))
            return lift.cond(
                pred > 0,
                lambda x: self.block(stmt.then, ctx, x),
                lambda x: self.block(stmt.other, ctx, x),
                x,
            )
        if kind is ref.While:
            n = self.keys["n"]
            limit = lift.get(n) + stmt.count

            def body(x: Any) -> Any:
                lift.set(n, lift.get(n) + 1)
                return self.block(stmt.block, ctx, x)

            return lift.while_loop(lambda _: lift.get(n) < limit, body, x)
        if kind is ref.Fori:
            return lift.fori_loop(
                0,
                stmt.count,
                lambda i, x: self.block(
                    stmt.block, ctx, x + 0.1 * i.astype(jnp.float32)
                ),
                x,
            )
        raise TypeError(f"not a statement: {stmt!r}")

    def pure(self, program: tuple) -> Any:
        """The program as the pure ``(state, x) -> (out, state)`` lift makes of it."""
        return lift.stateful(lambda x: self.block(program, ref.Ctx(), x))


def _axis(level: int) -> str:
    return f"batch{level}"


def _setup(seed: int) -> tuple[LiftInterpreter, dict, dict, Any]:
    named, x = ref.initial(seed)
    tree, state = lift.export_state({k: lift.StateEntry(v) for k, v in named.items()})
    return LiftInterpreter(tree), named, state, x


def _by_name(interp: LiftInterpreter, state: dict) -> dict[str, Any]:
    assert set(state) == set(interp.keys.values())
    return {name: state[key] for name, key in interp.keys.items()}


def _assert_same(got: tuple, want: tuple, interp: LiftInterpreter) -> None:
    """Outputs and states (by name) agree: same names, shapes, dtypes, close values."""
    (out, state), (want_out, want_state) = got, want
    chex.assert_trees_all_close(
        (out, _by_name(interp, state)),
        (want_out, {name: want_state[name] for name in ref.STATE_KEYS}),
        rtol=2e-5,
        atol=2e-5,
        strict=True,
    )


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["eager", "jit"])
@SETTINGS
@given(program=programs, seed=st.integers(0, 2**16))
def test_lift_matches_reference(mode: str, program: tuple, seed: int) -> None:
    interp, named, state, x = _setup(seed)
    pure = interp.pure(program)
    if mode == "jit":
        pure = lift.jit(pure)
    got = pure(state, x)
    _assert_same(got, ref.run_reference(program, named, x), interp)


@HALF
@given(program=programs, seed=st.integers(0, 2**16))
def test_second_call_does_not_retrace(program: tuple, seed: int) -> None:
    interp, named, state, x = _setup(seed)
    # Chex counts traces per definition site, across examples: start each at zero.
    chex.clear_trace_counter()
    step = lift.jit(chex.assert_max_traces(interp.pure(program), n=1))
    out, new_state = step(state, x)
    # Same structure, new values: the state the first call returned, a new input.
    # A second trace of the program would raise chex's AssertionError here.
    again = step(new_state, 2.0 * x)
    _, named_new = ref.run_reference(program, named, x)
    _assert_same(again, ref.run_reference(program, named_new, 2.0 * x), interp)
    jax.block_until_ready(out)


def test_the_trace_limit_catches_a_retrace() -> None:
    # Guards the test above against passing vacuously: a new input shape retraces
    # the same lift.jit step, and the limit says so.
    program = (ref.Set("a", ref.X()),)
    interp, _, state, x = _setup(0)
    chex.clear_trace_counter()
    step = lift.jit(chex.assert_max_traces(interp.pure(program), n=1))
    _, new_state = step(state, x)
    step(new_state, 2.0 * x)
    with pytest.raises(AssertionError, match="traced > 1 times"):
        step(new_state, jnp.stack([x, x]))


@HALF
@given(program=programs, seed=st.integers(0, 2**16))
def test_inner_jit_blocks_trace_once(program: tuple, seed: int) -> None:
    # Eagerly, the program's Python runs on every call, but a `lift.jit` inside the
    # frame must reuse its compiled function: same structure, only new values.
    interp, named, state, x = _setup(seed)
    pure = interp.pure(program)
    _, new_state = pure(state, x)
    traced = interp.jit_traces
    again = pure(new_state, 2.0 * x)
    assert interp.jit_traces == traced, "a lift.jit block was traced again"
    _, named_new = ref.run_reference(program, named, x)
    _assert_same(again, ref.run_reference(program, named_new, 2.0 * x), interp)


def test_generator_reaches_every_statement_kind() -> None:
    seen: set[type] = set()

    def walk(block: tuple) -> None:
        for stmt in block:
            seen.add(type(stmt))
            for attr in ("block", "then", "other"):
                if hasattr(stmt, attr):
                    walk(getattr(stmt, attr))

    @settings(max_examples=80, derandomize=True, database=None, deadline=None)
    @given(programs)
    def collect(program: tuple) -> None:
        walk(program)

    collect()
    kinds = {
        ref.Set,
        ref.Let,
        ref.Incr,
        ref.Jit,
        ref.Checkpoint,
        ref.Vmap,
        ref.Scan,
        ref.Cond,
        ref.While,
        ref.Fori,
    }
    assert kinds <= seen, kinds - seen
