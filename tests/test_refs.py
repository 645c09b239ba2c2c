"""Third-party loops: raw ``lax`` loops whose bodies use lift's state.

A solver you do not control calls ``jax.lax.scan``/``while_loop``/``fori_loop``
itself; state read and written in its callbacks must thread exactly as with lift's
own loops (through JAX array references), eager and under ``lift.jit``, and the
user's Python body runs once per call.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import lift

RAW = SimpleNamespace(scan=lax.scan, while_loop=lax.while_loop, fori_loop=lax.fori_loop)
LIFTED = SimpleNamespace(
    scan=lift.scan, while_loop=lift.while_loop, fori_loop=lift.fori_loop
)


@pytest.fixture
def model():
    """A float ``acc`` vector and an int32 counter ``n``."""
    return lift.export_state(
        {
            "acc": lift.StateEntry(jnp.zeros(3, jnp.float32)),
            "n": lift.StateEntry(jnp.zeros((), jnp.int32)),
        }
    )


def solver(tree, loops, xs):
    """Scan, then a while loop and a fori loop, each body reading and writing state."""

    def scan_body(c, x):
        lift.set(tree["acc"], lift.get(tree["acc"]) + x)
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return c + jnp.sum(x), lift.get(tree["n"])

    total, counts = loops.scan(scan_body, jnp.float32(0), xs)

    def while_body(carry):
        value, i = carry
        lift.set(tree["acc"], lift.get(tree["acc"]) * 0.5)
        lift.set(tree["n"], lift.get(tree["n"]) + 3)
        return value * 2, i + 1

    total, _ = loops.while_loop(lambda c: c[1] < 3, while_body, (total, jnp.int32(0)))

    def fori_body(i, value):
        lift.set(tree["acc"], lift.get(tree["acc"]) + i.astype(jnp.float32))
        return value + jnp.sum(lift.get(tree["acc"]))

    total = loops.fori_loop(0, 4, fori_body, total)
    return total, counts


def solver_reference(xs):
    """The same computation in NumPy, state threaded by hand."""
    acc, n, total, counts = np.zeros(3, np.float32), 0, np.float32(0), []
    for x in xs:
        acc, n = acc + x, n + 1
        total += x.sum()
        counts.append(n)
    for _ in range(3):
        acc, n, total = acc * 0.5, n + 3, total * 2
    for i in range(4):
        acc = acc + i
        total += acc.sum()
    return total, np.array(counts), acc, n


XS = np.arange(12, dtype=np.float32).reshape(4, 3) / 4


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_raw_loops_match_lifted_loops(model, jitted):
    tree, state = model

    def run(loops):
        f = lift.stateful(lambda xs: solver(tree, loops, xs))
        if jitted:
            f = lift.jit(f)
        return f(state, XS)

    (raw_total, raw_counts), raw_state = run(RAW)
    (lift_total, lift_counts), lift_state = run(LIFTED)
    np.testing.assert_allclose(raw_total, lift_total, rtol=1e-6)
    np.testing.assert_array_equal(raw_counts, lift_counts)
    assert set(raw_state) == set(state)
    np.testing.assert_allclose(raw_state[tree["acc"]], lift_state[tree["acc"]])
    assert int(raw_state[tree["n"]]) == int(lift_state[tree["n"]])

    total, counts, acc, n = solver_reference(XS)
    np.testing.assert_allclose(raw_total, total, rtol=1e-6)
    np.testing.assert_array_equal(raw_counts, counts)
    np.testing.assert_allclose(raw_state[tree["acc"]], acc, rtol=1e-6)
    assert int(raw_state[tree["n"]]) == n
    assert raw_state[tree["acc"]].dtype == jnp.float32
    assert raw_state[tree["n"]].dtype == jnp.int32


def test_raw_loops_repeated_calls_keep_threading(model):
    tree, state = model
    f = lift.stateful(lambda xs: solver(tree, RAW, xs))
    _, s1 = f(state, XS)
    _, s2 = f(s1, XS)
    g = lift.stateful(lambda xs: solver(tree, LIFTED, xs))
    _, r1 = g(state, XS)
    _, r2 = g(r1, XS)
    np.testing.assert_allclose(s2[tree["acc"]], r2[tree["acc"]], rtol=1e-6)
    assert int(s2[tree["n"]]) == int(r2[tree["n"]]) == 2 * (4 + 9)
    assert int(state[tree["n"]]) == 0  # the input state is untouched


def fixed_point(f, x0, iterations):
    """A third-party routine: iterate ``f`` with a raw while loop."""

    def body(carry):
        x, i = carry
        return f(x), i + 1

    return lax.while_loop(lambda c: c[1] < iterations, body, (x0, 0))[0]


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_state_written_in_a_third_party_callback(model, jitted):
    tree, state = model

    def update(x):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        lift.set(tree["acc"], jnp.maximum(lift.get(tree["acc"]), x))
        return jnp.cos(x)

    f = lift.stateful(lambda x0: fixed_point(update, x0, 6))
    if jitted:
        f = lift.jit(f)
    x, new = f(state, jnp.array([0.0, 1.0, 2.0]))
    xs = [np.array([0.0, 1.0, 2.0], np.float32)]
    for _ in range(6):
        xs.append(np.cos(xs[-1]))
    np.testing.assert_allclose(x, xs[-1], rtol=1e-6)
    np.testing.assert_allclose(new[tree["acc"]], np.max(xs[:-1], axis=0), rtol=1e-6)
    assert int(new[tree["n"]]) == 6


def test_raw_scan_reverse_matches_lifted(model):
    tree, state = model

    def body(c, x):
        old = lift.get(tree["n"])
        lift.set(tree["n"], old + 1)
        lift.set(tree["acc"], lift.get(tree["acc"]) * 2 + x)
        return c, old

    def run(scan):
        return lift.stateful(lambda xs: scan(body, 0.0, xs, reverse=True))(state, XS)

    (_, raw_ys), raw = run(lax.scan)
    (_, lift_ys), lifted = run(lift.scan)
    np.testing.assert_array_equal(raw_ys, [3, 2, 1, 0])
    np.testing.assert_array_equal(raw_ys, lift_ys)
    np.testing.assert_allclose(raw[tree["acc"]], lifted[tree["acc"]])


def test_raw_loop_only_reading_state(model):
    tree, state = model
    state = {**state, tree["acc"]: jnp.array([1.0, 2.0, 3.0])}

    def body(c, x):
        return c + jnp.sum(lift.get(tree["acc"]) * x), None

    (c, _), new = lift.stateful(lambda xs: lax.scan(body, 0.0, xs))(state, XS)
    np.testing.assert_allclose(c, (XS * [1.0, 2.0, 3.0]).sum(), rtol=1e-6)
    np.testing.assert_array_equal(new[tree["acc"]], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_raw_while_cond_reading_state_the_body_writes_is_refused(model, jitted):
    """A raw ``while_loop`` whose condition reads state its body writes.

    JAX 0.10.2 gives such a condition the value from loop entry: a TraceError that
    names the key and ``lift.while_loop``, never a loop that runs on a stale value.
    """
    tree, state = model

    def body(i):
        lift.set(tree["n"], lift.get(tree["n"]) + 3)
        return i + 1

    def run(while_loop):
        def loop():
            # `i < 50` bounds the loop should the condition read a stale value
            return while_loop(lambda i: (lift.get(tree["n"]) < 10) & (i < 50), body, 0)

        f = lift.stateful(loop)
        return (lift.jit(f) if jitted else f)(state)

    lifted_i, lifted = run(lift.while_loop)
    assert int(lifted_i) == 4
    assert int(lifted[tree["n"]]) == 12
    with pytest.raises(lift.TraceError) as info:
        run(lax.while_loop)
    msg = str(info.value)
    assert "['n']" in msg
    assert "lift.while_loop" in msg


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_raw_while_cond_reading_state_the_body_does_not_write(model, jitted):
    tree, state = model
    state = {**state, tree["n"]: jnp.asarray(4, jnp.int32)}

    def loop():
        def body(i):
            lift.set(tree["acc"], lift.get(tree["acc"]) + 1.0)
            return i + 1

        return lax.while_loop(lambda i: i < lift.get(tree["n"]), body, 0)

    f = lift.stateful(loop)
    i, new = (lift.jit(f) if jitted else f)(state)
    assert int(i) == 4
    np.testing.assert_array_equal(new[tree["acc"]], np.full(3, 4.0))


@pytest.mark.xfail(
    strict=True,
    reason="JAX 0.10.2: an array reference read in a raw `lax.while_loop`'s cond_fun "
    "sees its value at loop entry. When JAX fixes it, this passes: lift can then let "
    "such loops run (test above, docs/transforms/third-party-loops.md).",
)
def test_jax_while_cond_sees_reference_writes():
    """Plain JAX, no lift: the canary for the refusal above."""

    @jax.jit
    def run():
        ref = jax.new_ref(jnp.int32(0))

        def body(i):
            ref[...] = ref[...] + 3
            return i + 1

        i = lax.while_loop(lambda i: (ref[...] < 10) & (i < 50), body, 0)
        return i, ref[...]

    i, n = run()
    assert (int(i), int(n)) == (4, 12)


# -------------------------------------------------------------------- raw vmap


def test_raw_vmap_writing_batched_state_raises_trace_error(model):
    tree, state = model

    def per_example(x):
        lift.set(tree["acc"], lift.get(tree["acc"]) + x)
        return x

    with pytest.raises(lift.TraceError) as info:
        lift.stateful(lambda xs: jax.vmap(per_example)(xs))(state, XS)
    assert isinstance(info.value, lift.LiftError)
    msg = str(info.value)
    assert "['acc']" in msg
    assert "lift.vmap" in msg
    assert "state_axes=" in msg
    assert "axis_name=" in msg
    assert "lax.pmean" in msg
    # only what a lift user can do: no JAX hint about moving references, and no
    # advice against raw lax.scan, which works
    assert "Move the array reference" not in msg
    assert "lax.scan" not in msg
    assert "reference" not in msg


def test_raw_vmap_writing_batched_state_raises_under_jit(model):
    tree, state = model

    def per_example(x):
        lift.set(tree["n"], lift.get(tree["n"]) + x)
        return x

    f = lift.jit(lift.stateful(lambda xs: jax.vmap(per_example)(xs)))
    with pytest.raises(lift.TraceError, match=r"\['n'\]"):
        f(state, jnp.arange(3, dtype=jnp.int32))


def test_raw_vmap_reading_state(model):
    tree, state = model
    state = {**state, tree["acc"]: jnp.array([1.0, 2.0, 3.0])}
    out, new = lift.stateful(
        lambda xs: jax.vmap(lambda x: x * lift.get(tree["acc"]))(xs)
    )(state, XS)
    np.testing.assert_allclose(out, XS * [1.0, 2.0, 3.0])
    assert new[tree["acc"]] is state[tree["acc"]]


# ------------------------------------------------------------ user code runs once


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_next_batch_before_a_raw_loop_is_consumed_once(model, jitted):
    tree, state = model
    batches = [np.full(3, i, np.float32) for i in range(1, 5)]
    data = iter(batches)
    runs = []

    def step():
        runs.append(None)
        batch = next(data)

        def body(c, _):
            lift.set(tree["acc"], lift.get(tree["acc"]) + batch)
            lift.set(tree["n"], lift.get(tree["n"]) + 1)
            return c, None

        lax.scan(body, 0.0, None, length=2)
        return batch

    f = lift.stateful(step)
    if jitted:
        f = lift.jit(f)
    out, new = f(state)
    np.testing.assert_array_equal(out, batches[0])  # the first batch, not the second
    assert len(runs) == 1
    assert next(data) is batches[1]  # exactly one batch was consumed
    np.testing.assert_array_equal(new[tree["acc"]], 2 * batches[0])
    assert int(new[tree["n"]]) == 2


@pytest.mark.parametrize("loop", ["scan", "while_loop", "fori_loop"])
def test_python_body_runs_once_per_eager_call(model, loop):
    tree, state = model
    calls = []

    def step():
        calls.append(None)

        def bump():
            lift.set(tree["n"], lift.get(tree["n"]) + 1)

        if loop == "scan":
            lax.scan(lambda c, _: (bump(), (c, None))[1], 0, None, length=3)
        elif loop == "while_loop":
            lax.while_loop(lambda i: i < 3, lambda i: (bump(), i + 1)[1], 0)
        else:
            lax.fori_loop(0, 3, lambda i, c: (bump(), c)[1], 0)

    f = lift.stateful(step)
    for call in range(1, 4):
        _, state = f(state)
        assert len(calls) == call
        assert int(state[tree["n"]]) == 3 * call


def test_no_lift_base_exception_is_left():
    import lift._frame as frame_module

    internal = [
        name
        for name, obj in vars(frame_module).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and not issubclass(obj, Exception)
    ]
    assert internal == []


def nested_solver(tree, loops, xs):
    """A raw loop inside a raw loop, both writing state."""

    def inner(c, x):
        lift.set(tree["acc"], lift.get(tree["acc"]) + x)
        return c + 1, None

    def outer(c, x):
        c, _ = loops.scan(inner, c, xs)
        lift.set(tree["n"], lift.get(tree["n"]) + c)
        return c, lift.get(tree["n"])

    return loops.scan(outer, jnp.int32(0), xs)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_nested_raw_loops_match_lifted(model, jitted):
    tree, state = model

    def run(loops):
        f = lift.stateful(lambda xs: nested_solver(tree, loops, xs))
        return (lift.jit(f) if jitted else f)(state, XS)

    raw_out, raw = run(RAW)
    lifted_out, lifted = run(LIFTED)
    jax.tree_util.tree_map(np.testing.assert_array_equal, raw_out, lifted_out)
    np.testing.assert_allclose(raw[tree["acc"]], lifted[tree["acc"]], rtol=1e-6)
    np.testing.assert_allclose(raw[tree["acc"]], 4 * XS.sum(0), rtol=1e-6)
    assert int(raw[tree["n"]]) == int(lifted[tree["n"]]) == 4 + 8 + 12 + 16


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_raw_jax_jit_inside_a_frame_threads_state(model, jitted):
    tree, state = model

    def step(xs):
        @jax.jit
        def inner(x):
            lift.set(tree["acc"], lift.get(tree["acc"]) + x)
            return jnp.sum(lift.get(tree["acc"]))

        first = inner(xs[0])
        second = lax.scan(lambda c, x: (c + inner(x), None), 0.0, xs[1:])[0]
        return first, second

    f = lift.stateful(step)
    (first, second), new = (lift.jit(f) if jitted else f)(state, XS)
    np.testing.assert_allclose(first, XS[0].sum(), rtol=1e-6)
    expected = sum(XS[: i + 1].sum() for i in range(1, 4))
    np.testing.assert_allclose(second, expected, rtol=1e-6)
    np.testing.assert_allclose(new[tree["acc"]], XS.sum(0), rtol=1e-6)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_raw_grad_inside_a_frame_threads_undifferentiated_state(model, jitted):
    tree, state = model

    def loss(w):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)  # a counter: not differentiated
        return jnp.sum(w**2)

    f = lift.stateful(lambda w: jax.grad(loss)(w))
    g, new = (lift.jit(f) if jitted else f)(state, jnp.arange(3.0))
    np.testing.assert_allclose(g, 2 * np.arange(3.0))
    assert int(new[tree["n"]]) == 1


def test_raw_grad_writing_a_differentiated_value_names_the_key_and_the_fix(model):
    tree, state = model

    def loss(w):
        lift.set(tree["acc"], w)
        return jnp.sum(w**2)

    with pytest.raises(lift.TraceError) as info:
        lift.stateful(lambda w: jax.grad(loss)(w))(state, jnp.arange(3.0))
    msg = str(info.value)
    assert "['acc']" in msg
    assert "lift.grad" in msg
    assert "stop_gradient" in msg
    assert "Move the array reference" not in msg

    def fixed(w):  # the fix the message gives
        lift.set(tree["acc"], lax.stop_gradient(w))
        return jnp.sum(w**2)

    g, new = lift.stateful(lambda w: jax.grad(fixed)(w))(state, jnp.arange(3.0))
    np.testing.assert_allclose(g, 2 * np.arange(3.0))
    np.testing.assert_array_equal(new[tree["acc"]], np.arange(3.0))


@given(
    lengths=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    start=st.integers(-5, 5),
)
def test_raw_loop_sequences_match_lifted(lengths, start):
    tree, state = lift.export_state(
        {"n": lift.StateEntry(jnp.asarray(start, jnp.int32))}
    )

    def solver(loops):
        def body(c, _):
            old = lift.get(tree["n"])
            lift.set(tree["n"], old * 2 - c)
            return c + 1, old

        return [loops.scan(body, jnp.int32(1), None, length=n)[1] for n in lengths]

    raw_ys, raw = lift.stateful(lambda: solver(RAW))(state)
    lifted_ys, lifted = lift.stateful(lambda: solver(LIFTED))(state)
    for a, b in zip(raw_ys, lifted_ys, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(raw[tree["n"]]) == int(lifted[tree["n"]])
    assert raw[tree["n"]].dtype == jnp.int32


# ------------------------------------------------- checkpoint and custom_jvp in grad


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_raw_checkpoint_writing_state_under_lift_grad_names_lift_checkpoint(
    model, jitted
):
    tree, state = model

    def layer(x):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return jnp.sin(x)

    f = lift.stateful(lift.grad(lambda x: jax.checkpoint(layer)(x)))
    with pytest.raises(lift.TraceError) as info:
        (lift.jit(f) if jitted else f)(state, jnp.float32(1.0))
    msg = str(info.value)
    assert "['n']" in msg
    assert "lift.checkpoint" in msg


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_lift_checkpoint_writing_state_under_lift_grad_works(model, jitted):
    tree, state = model

    def layer(x):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return jnp.sin(x)

    f = lift.stateful(lift.grad(lambda x: lift.checkpoint(layer)(x)))
    g, new = (lift.jit(f) if jitted else f)(state, jnp.float32(1.0))
    np.testing.assert_allclose(g, np.cos(1.0), rtol=1e-6)
    assert int(new[tree["n"]]) == 1


def test_raw_checkpoint_under_raw_grad_never_replays_writes(model):
    # JAX would run the checkpointed writes twice (forward, then recompute): n == 2
    tree, state = model

    def layer(x):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return jnp.sin(x)

    with pytest.raises(lift.TraceError, match=r"\['n'\].*lift\.checkpoint"):
        lift.stateful(lambda x: jax.grad(jax.checkpoint(layer))(x))(state, 1.0)


def _counting_sin(tree):
    @jax.custom_jvp
    def counting_sin(x):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return jnp.sin(x)

    @counting_sin.defjvp
    def _(primals, tangents):
        return counting_sin(primals[0]), jnp.cos(primals[0]) * tangents[0]

    return counting_sin


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_custom_jvp_writing_state_under_lift_grad_raises_trace_error(model, jitted):
    tree, state = model
    f = lift.stateful(lift.grad(_counting_sin(tree)))
    with pytest.raises(lift.TraceError) as info:
        (lift.jit(f) if jitted else f)(state, jnp.float32(1.0))
    msg = str(info.value)
    assert "['n']" in msg
    assert "custom_jvp" in msg
    assert "pass it in as an argument" in msg


def test_custom_jvp_writing_state_eagerly_works(model):
    tree, state = model
    out, new = lift.stateful(_counting_sin(tree))(state, jnp.float32(1.0))
    np.testing.assert_allclose(out, np.sin(1.0), rtol=1e-6)
    assert int(new[tree["n"]]) == 1


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_custom_jvp_reading_state_under_lift_grad_works(model, jitted):
    tree, state = model
    state = {**state, tree["acc"]: jnp.array([1.0, 2.0, 3.0])}

    @jax.custom_jvp
    def scaled(x):
        return jnp.sum(lift.get(tree["acc"]) * x)

    @scaled.defjvp
    def _(primals, tangents):
        return scaled(primals[0]), jnp.sum(lift.get(tree["acc"]) * tangents[0])

    f = lift.stateful(lift.grad(scaled))
    g, new = (lift.jit(f) if jitted else f)(state, jnp.ones(3))
    np.testing.assert_allclose(g, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(new[tree["acc"]], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_custom_jvp_read_inside_a_raw_loop_that_writes_the_key_is_refused(
    model, jitted
):
    # JAX traces the custom_jvp function apart: its read could not see the loop's
    # writes and would return the pre-loop value on every iteration.
    tree, state = model

    @jax.custom_jvp
    def current(x):
        return x * 0 + lift.get(tree["n"])

    @current.defjvp
    def _(primals, tangents):
        return current(primals[0]), tangents[0]

    def body(c, x):
        seen = current(x)
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return c, seen

    f = lift.stateful(lambda xs: lax.scan(body, 0, xs)[1])
    with pytest.raises(lift.TraceError) as info:
        (lift.jit(f) if jitted else f)(state, jnp.arange(3, dtype=jnp.int32))
    msg = str(info.value)
    assert "['n']" in msg
    assert "custom_jvp" in msg
    assert "pass it in as an argument" in msg


def _module_level_body(tree, x):
    lift.set(tree["acc"], lift.get(tree["acc"]) + x)
    return jnp.sum(lift.get(tree["acc"]))


@pytest.mark.parametrize("rewrap", [False, True], ids=["one-jit", "new-jit-per-call"])
def test_a_cached_raw_jit_using_state_fails_loudly_in_a_later_call(model, rewrap):
    # JAX reuses the code it compiled for a function, with the array references of the
    # first call closed over: a later call must not read or write that call's state.
    tree, state = model
    body = functools.partial(_module_level_body, tree)
    once = jax.jit(body)
    f = lift.stateful(lambda x: (jax.jit(body) if rewrap else once)(x))
    out, s1 = f(state, jnp.ones(3))
    assert float(out) == 3.0
    np.testing.assert_array_equal(s1[tree["acc"]], np.ones(3))
    with pytest.raises(lift.TraceError) as info:
        f(s1, jnp.ones(3))
    msg = str(info.value)
    assert "lift.jit" in msg
    assert "earlier call" in msg
    np.testing.assert_array_equal(s1[tree["acc"]], np.ones(3))  # never written
    # lift.jit in its place threads each call's state
    g = lift.stateful(lift.jit(body))
    _, t1 = g(state, jnp.ones(3))
    _, t2 = g(t1, jnp.ones(3))
    np.testing.assert_array_equal(t2[tree["acc"]], 2 * np.ones(3))


def _raw_control_flow(tree, kind, x):
    def bump(by):
        lift.set(tree["acc"], lift.get(tree["acc"]) + by)
        return jnp.sum(lift.get(tree["acc"]))

    if kind == "cond":
        return lax.cond(x[0] > 0, lambda: bump(x), lambda: bump(10 * x))
    if kind == "switch":
        return lax.switch(1, [lambda: bump(x), lambda: bump(5 * x)])
    return lax.map(lambda row: bump(row), jnp.stack([x, 2 * x]))


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    ("kind", "factor"), [("cond", 1.0), ("switch", 5.0), ("map", 3.0)]
)
def test_raw_cond_switch_and_map_write_state(model, jitted, kind, factor):
    tree, state = model
    f = lift.stateful(lambda x: _raw_control_flow(tree, kind, x))
    _, new = (lift.jit(f) if jitted else f)(state, XS[1])
    np.testing.assert_allclose(new[tree["acc"]], factor * XS[1], rtol=1e-6)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_raw_loop_inside_lift_vmap_writes_per_example_state(jitted):
    tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(3, jnp.float32))})

    def per_example(x):
        def body(c, _):
            lift.set(tree["n"], lift.get(tree["n"]) + x)
            return c + x, None

        return lax.scan(body, 0.0, None, length=2)[0]

    f = lift.stateful(lambda xs: lift.vmap(per_example, state_axes=0)(xs))
    out, new = (lift.jit(f) if jitted else f)(state, jnp.arange(3.0))
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(new[tree["n"]], [0.0, 2.0, 4.0])


def test_raw_loop_inside_lift_vmap_writing_shared_state_is_a_lift_error(model):
    # JAX batches every reference made under a vmap, so shared state written in a raw
    # loop there comes back batched: a lift error naming the key, never a wrong value.
    tree, state = model

    def per_example(x):
        def body(c, _):
            lift.set(tree["n"], lift.get(tree["n"]) + 1)
            return c + x, None

        return lax.scan(body, 0.0, None, length=2)[0]

    with pytest.raises(lift.LiftError, match=r"\['n'\]"):
        lift.stateful(lambda xs: lift.vmap(per_example)(xs))(state, jnp.arange(3.0))


def _assert_shared_raw_loop_error(info, key):
    msg = str(info.value)
    assert key in msg
    assert "raw" in msg
    assert "vmap" in msg
    assert "lift.fori_loop" in msg
    assert "lift.scan" in msg
    assert "lift.while_loop" in msg
    # never JAX's hint, never the advice that cannot help here
    assert "Move the array reference" not in msg
    assert "differs across the batch" not in msg


def _raw_fori_add_one(tree):
    def body(i, c):
        lift.set(tree["acc"], lift.get(tree["acc"]) + 1.0)
        return c

    return lambda: lax.fori_loop(0, 2, body, 0)


@pytest.mark.parametrize(
    "variant", ["eager", "scan", "jit", "pmean", "unbatched_input", "raw_vmap"]
)
def test_raw_loop_writing_shared_state_under_vmap_is_a_trace_error(model, variant):
    # JAX batches a reference made under a vmap, and refuses a batched write into one
    # made outside it: shared state cannot ride a raw loop there, even when every
    # example writes the same value.
    tree, state = model
    loop = _raw_fori_add_one(tree)

    def per_example(x):
        if variant == "scan":
            body = lambda c, _: (loop(), (c, None))[1]  # noqa: E731
            lax.scan(body, 0, None, length=1)
        elif variant == "pmean":

            def body(i, c):
                acc = lift.get(tree["acc"])
                lift.set(tree["acc"], lax.pmean(acc + x, "b"))
                return c

            lax.fori_loop(0, 2, body, 0)
        else:
            loop()
        return x

    if variant == "pmean":
        f = lift.stateful(lambda xs: lift.vmap(per_example, axis_name="b")(xs))
    elif variant == "unbatched_input":
        f = lift.stateful(
            lambda xs: lift.vmap(per_example, in_axes=None, axis_size=3)(xs[0])
        )
    elif variant == "raw_vmap":
        f = lift.stateful(lambda xs: jax.vmap(per_example)(xs))
    else:
        f = lift.stateful(lambda xs: lift.vmap(per_example)(xs))
    if variant == "jit":
        f = lift.jit(f)
    with pytest.raises(lift.TraceError) as info:
        f(state, XS)
    _assert_shared_raw_loop_error(info, "['acc']")


def test_the_same_raw_loop_body_works_in_lift_fori_loop_under_vmap(model):
    tree, state = model

    def body(i, c):
        lift.set(tree["acc"], lift.get(tree["acc"]) + 1.0)
        return c

    def per_example(x):
        lift.fori_loop(0, 2, body, 0)
        return x

    # each of the 3 examples adds 2 to the shared entry's same starting value
    _, new = lift.stateful(lambda xs: lift.vmap(per_example)(xs))(state, XS)
    np.testing.assert_array_equal(new[tree["acc"]], state[tree["acc"]] + 2.0)


def test_a_raw_loop_body_reused_under_lift_vmap_in_a_later_call_is_a_trace_error():
    # JAX caches the traced body of a raw loop per Python function; under a vmap it
    # closes over the first call's reference, a tracer of a finished trace.
    tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(3, jnp.float32))})

    def body(i, c):
        lift.set(tree["n"], lift.get(tree["n"]) + 1.0)
        return c

    def per_example(x):
        lax.fori_loop(0, 2, body, 0)
        return x

    f = lift.stateful(lambda xs: lift.vmap(per_example, state_axes=0)(xs))
    _, new = f(state, jnp.ones(3))
    np.testing.assert_array_equal(new[tree["n"]], [2.0, 2.0, 2.0])
    with pytest.raises(lift.TraceError) as info:
        f(new, jnp.ones(3))
    msg = str(info.value)
    assert "earlier call" in msg
    assert "lift.fori_loop" in msg
    assert "per_example" in msg or "lambda" in msg  # the function that was called


def test_a_cached_raw_jit_in_a_nested_stateful_call_is_reported_once(model):
    tree, state = model
    once = jax.jit(functools.partial(_module_level_body, tree))
    inner = lift.stateful(lambda x: once(x))
    inner(state, jnp.ones(3))
    outer = lift.stateful(lambda x: inner(state, x))
    with pytest.raises(lift.TraceError) as info:
        outer(state, jnp.ones(3))
    assert str(info.value).count("earlier call") == 1
    assert not isinstance(info.value.__cause__, lift.LiftError)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("raw", ["shard_map", "pmap"])
def test_raw_shard_map_reads_state_and_a_write_names_lift_shard_map(model, jitted, raw):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    tree, state = model
    state = {**state, tree["n"]: jnp.asarray(5, jnp.int32)}
    mesh = Mesh(jax.devices(), ("d",))
    xs = jnp.arange(len(jax.devices()), dtype=jnp.int32)

    def run(body):
        if raw == "pmap":
            mapped = jax.pmap(body)
        else:
            mapped = jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
        f = lift.stateful(lambda x: mapped(x))
        return (lift.jit(f) if jitted else f)(state, xs)

    out, new = run(lambda x: x + lift.get(tree["n"]))
    np.testing.assert_array_equal(out, np.arange(len(jax.devices())) + 5)
    assert new[tree["n"]] is state[tree["n"]] or int(new[tree["n"]]) == 5

    def write(x):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return x

    with pytest.raises(lift.TraceError) as info:
        run(write)
    assert "['n']" in str(info.value)
    assert f"lift.{raw}" in str(info.value)
