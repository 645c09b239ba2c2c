"""Lifted transforms: each threads a frame's state, and works at top level."""

from __future__ import annotations

import functools
import sys

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TraceCounter, make_counter, tick
from hypothesis import strategies as st
from jax import lax

import lift
from lift._jit import fast_path_enabled

W = np.array([0.5, -1.0, 2.0], np.float32)


@pytest.fixture
def model():
    """Parameters ``w``, a float ``acc`` vector and an int32 counter ``n``."""
    return lift.export_state(
        {
            "w": jnp.asarray(W),
            "acc": lift.StateEntry(jnp.zeros(3, jnp.float32)),
            "n": lift.StateEntry(jnp.zeros((), jnp.int32)),
        }
    )


def accumulate(tree, x):
    """Add ``w * x`` to ``acc``, tick ``n``; return the sum of the new ``acc``."""
    acc = lift.get(tree["acc"]) + tree["w"] * x
    lift.set(tree["acc"], acc)
    tick(tree)
    return jnp.sum(acc)


@pytest.fixture
def before_any_donation(monkeypatch):
    """The process as if no lifted ``jit`` had donated yet.

    From the first ``donate_state=True`` on, non-donating lifted jits check their
    arguments for consumed buffers in Python before every dispatch (a consumed
    multi-device array would crash XLA); before it, their calls are ``jax.jit``'s own.
    """
    import weakref

    from lift import _donation

    monkeypatch.setattr(_donation, "_UNCHECKED", weakref.WeakSet())
    donating = _donation.DONATING[0]
    _donation.DONATING[0] = False
    yield
    _donation.DONATING[0] = donating


# Tests of the C++ dispatch layer itself; the rest hold with it off too
# (`LIFT_JIT_FAST_PATH=0`).
fast_path_only = pytest.mark.skipif(
    not fast_path_enabled(), reason="the C++ dispatch layer is off"
)


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- jit


def test_jit_inside_frame_threads_state(model):
    tree, state = model
    step = lift.jit(lambda x: accumulate(tree, x))

    def two_steps(x):
        return step(x), step(2 * x)

    x = np.array([1.0, 2.0, 3.0], np.float32)
    (a, b), new = lift.stateful(two_steps)(state, x)
    assert_close(a, np.sum(W * x))
    assert_close(b, np.sum(3 * W * x))
    assert_close(new[tree["acc"]], 3 * W * x)
    assert int(new[tree["n"]]) == 2
    assert int(state[tree["n"]]) == 0


def test_jit_at_top_level(model):
    tree, state = model
    step = lift.jit(lift.stateful(lambda x: accumulate(tree, x)))
    x = jnp.ones(3)
    out, s1 = step(state, x)
    out2, s2 = step(s1, x)
    assert_close(out, np.sum(W))
    assert_close(out2, np.sum(2 * W))
    assert_close(s2[tree["acc"]], 2 * W)
    assert int(s2[tree["n"]]) == 2
    assert set(s2) == set(state)


def test_jit_of_pure_function_at_top_level_is_jax_jit():
    f = lift.jit(lambda x, y: x * y + 1)
    assert_close(f(jnp.arange(3.0), 2.0), np.arange(3.0) * 2 + 1)


def _python_calls_during(fn, *args):
    """The Python functions entered while ``fn(*args)`` runs (C ones not counted)."""
    entered = []

    def profile(frame, event, arg):
        if event == "call":
            entered.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return entered


@fast_path_only
def test_jit_of_stateful_runs_no_python_on_a_compiled_call(model, before_any_donation):
    # A pure function at top level, its signature compiled: the call is jax.jit's
    # own C++ dispatch, with no Python frame of lift's (or of anyone's) around it.
    tree, state = model
    step = lift.jit(lift.stateful(lambda x: accumulate(tree, x)))
    x = jnp.ones(3)
    _, state = step(state, x)
    assert _python_calls_during(step, state, x) == []
    # The plain jax.jit of the same pure function enters no Python code either.
    plain = jax.jit(lift.stateful(lambda x: accumulate(tree, x)))
    plain(state, x)
    assert _python_calls_during(plain, state, x) == []


@fast_path_only
def test_jit_of_stateful_is_a_jax_jit_function_named_like_it(model):
    tree, state = model

    def step(x):
        """Accumulate ``x``."""
        return accumulate(tree, x)

    jitted = lift.jit(lift.stateful(step))
    assert type(jitted) is type(jax.jit(step))
    assert jitted.__name__ == "step"
    assert jitted.__doc__ == step.__doc__
    # JAX's own staging works on it, as on any jax.jit function.
    text = jitted.lower(state, jnp.ones(3)).as_text()
    assert "stablehlo" in text
    # Donating, or not pure: lift's own object, which checks first.
    donating = lift.jit(lift.stateful(step), donate_state=True)
    assert not isinstance(donating, type(jitted))
    assert not isinstance(lift.jit(step), type(jitted))


def test_jit_of_stateful_inside_a_frame_keeps_both_states_apart(model):
    tree, state = model
    inner_tree, inner_state = lift.export_state({"k": lift.StateEntry(jnp.zeros(()))})

    def bump(x):
        lift.set(inner_tree["k"], lift.get(inner_tree["k"]) + x)
        return 2 * x

    step = lift.jit(lift.stateful(bump))
    step(inner_state, jnp.ones(()))  # compiled before any frame exists

    def outer(x):
        y, new_inner = step(inner_state, x)
        return accumulate(tree, y), new_inner

    (total, new_inner), new = lift.stateful(outer)(state, jnp.full((), 3.0))
    assert float(new_inner[inner_tree["k"]]) == 3.0
    assert set(new) == set(state)
    assert_close(new[tree["acc"]], 6 * W)
    assert_close(total, np.sum(6 * W))


def test_jit_of_a_wrapper_of_stateful_threads_the_enclosing_frame(model):
    # `functools.wraps` copies a stateful function's attributes onto a wrapper that
    # also uses the enclosing frame's state: lift.jit must still thread that state.
    tree, state = model
    inner_tree, inner_state = lift.export_state({"k": lift.StateEntry(jnp.zeros(()))})
    pure = lift.stateful(lambda x: x + lift.get(inner_tree["k"]))

    @functools.wraps(pure)
    def wrapper(x):
        out, _ = pure(inner_state, x)
        tick(tree)  # the enclosing frame's counter
        return out

    jitted = lift.jit(wrapper)
    _, new = lift.stateful(lambda x: jitted(x))(state, jnp.ones(()))
    assert int(new[tree["n"]]) == 1


@fast_path_only
def test_jit_takes_static_leaves_after_compiled_array_calls(model, before_any_donation):
    tree, state = model
    seen = []

    def g(x, scale):
        seen.append(type(scale))  # at trace time: a tracer, or the static value
        tick(tree)
        return x * scale

    f = lift.jit(lift.stateful(g))
    out, s1 = f(state, jnp.ones(3), jnp.float32(2))  # an array: dynamic, compiled
    out, s2 = f(s1, jnp.ones(3), jnp.float32(3))
    assert len(seen) == 1
    assert issubclass(seen[0], jax.core.Tracer)
    assert_close(out, 3 * np.ones(3))
    out, s3 = f(s2, jnp.ones(3), 4.0)  # a Python float: static from now on
    assert seen[1:] == [float]
    assert_close(out, 4 * np.ones(3))
    out, s4 = f(s3, jnp.ones(3), jnp.float32(5))  # compiled before: no trace
    assert len(seen) == 2
    assert_close(out, 5 * np.ones(3))
    out, s5 = f(s4, jnp.ones(3), jnp.full(3, 6.0))  # a new signature: traced
    assert len(seen) == 3
    assert issubclass(seen[-1], jax.core.Tracer)
    assert_close(out, 6 * np.ones(3))
    assert int(s5[tree["n"]]) == 5


def test_jit_under_disable_jit_returns_outputs_as_they_are(model):
    tree, state = model

    def g(x):
        return accumulate(tree, x), "tag"

    f = lift.jit(lift.stateful(g))
    with jax.disable_jit():
        (total, tag), new = f(state, jnp.ones(3))
    assert tag == "tag"
    assert_close(total, np.sum(W))
    assert int(new[tree["n"]]) == 1


def test_jit_without_the_cpp_hook_takes_the_general_path(model, monkeypatch):
    # A JAX whose jit offers no slow-path hook: every call takes lift's general path.
    monkeypatch.setattr(lift._jit, "with_cache_miss", lambda *a, **k: None)
    tree, state = model
    step = lift.jit(lift.stateful(lambda x, k: _static_step(tree, jnp.sin, "", k, x)))
    out, new = step(state, jnp.ones(3), 2)
    assert_close(out, np.sin(np.sin(np.ones(3, np.float32))))
    assert int(new[tree["n"]]) == 2
    out, newer = step(new, jnp.ones(3), 1)
    assert_close(out, np.sin(np.ones(3, np.float32)))
    assert int(newer[tree["n"]]) == 3


def _static_step(tree, fn, mode, k, x):
    for _ in range(k):  # k must be a Python int here
        x = fn(x)
    if mode == "double":  # a str compared in Python
        x = 2 * x
    lift.set(tree["acc"], lift.get(tree["acc"]) + x)
    tick(tree, k)
    return x


def test_jit_non_array_leaves_are_static(model):
    tree, state = model

    def g(fn, mode, k, x):
        assert isinstance(k, int)
        assert isinstance(mode, str)
        return _static_step(tree, fn, mode, k, x)

    f = lift.jit(lift.stateful(g))
    x = jnp.ones(3)
    out, new = f(state, jnp.sin, "double", 3, x)
    expected = 2 * np.sin(np.sin(np.sin(np.ones(3, np.float32))))
    assert_close(out, expected)
    assert_close(new[tree["acc"]], expected)
    assert int(new[tree["n"]]) == 3
    out, new = f(state, jnp.cos, "plain", 2, x)
    assert_close(out, np.cos(np.cos(np.ones(3, np.float32))))
    assert int(new[tree["n"]]) == 2


def test_jit_python_numbers_are_static_on_the_first_call(model):
    # A Python int is a valid JAX argument: only lift's look at the call's own
    # arguments (while `jax.jit` traces) can tell that it must be static.
    tree, state = model

    def g(x, k):
        assert isinstance(k, int)
        return _static_step(tree, jnp.negative, "plain", k, x)

    f = lift.jit(lift.stateful(g))
    out, new = f(state, jnp.ones(3), 3)
    assert_close(out, -np.ones(3))
    assert int(new[tree["n"]]) == 3
    out, new = lift.jit(lift.stateful(g))(state, jnp.ones(3), k=2)
    assert_close(out, np.ones(3))
    assert int(new[tree["n"]]) == 2


def test_jit_non_array_leaves_are_static_inside_frame(model):
    tree, state = model
    f = lift.jit(lambda fn, mode, k, x: _static_step(tree, fn, mode, k, x))

    def outer(x):
        return f(jnp.exp, "double", 1, x) + f(jnp.exp, "plain", 2, x)

    out, new = lift.stateful(outer)(state, jnp.zeros(3))
    assert_close(out, 2 * np.ones(3) + np.exp(1.0) * np.ones(3))
    assert int(new[tree["n"]]) == 3


def test_jit_caches_and_retraces_on_static_change(model):
    tree, state = model
    traces = TraceCounter()

    def g(mode, k, x):
        traces()
        return _static_step(tree, jnp.negative, mode, k, x)

    f = lift.jit(lift.stateful(g))
    x = jnp.ones(3)
    _, s1 = f(state, "plain", 1, x)
    assert traces.count == 1
    _, s2 = f(s1, "plain", 1, x + 1)  # same structure, new values
    assert traces.count == 1
    assert_close(s2[tree["acc"]], -np.ones(3) - 2 * np.ones(3))
    f(s2, "double", 1, x)  # a changed static str
    assert traces.count == 2
    f(s2, "double", 2, x)  # a changed static int
    assert traces.count == 3
    f(s2, "double", 2, x)
    f(state, "plain", 1, x)
    assert traces.count == 3


def test_jit_static_numbers_compare_by_type_and_exact_value():
    # 0.0 and -0.0 are equal under `==`, but 1/x tells them apart: a cached trace
    # for one must not serve the other (plain jax.jit gives -inf here too).
    traces = TraceCounter()

    def inverse(x):
        traces()
        return 1 / jnp.asarray(x, jnp.float32), type(x).__name__

    f = lift.jit(inverse)
    assert float(f(0.0)[0]) == np.inf
    assert float(f(-0.0)[0]) == -np.inf
    assert traces.count == 2
    # NaN equals itself as a static value: a second call is a cache hit.
    assert np.isnan(f(float("nan"))[0])
    assert np.isnan(f(float("nan"))[0])
    assert traces.count == 3
    # 1, 1.0 and True are three static values, each traced with its own type.
    assert [f(v)[1] for v in (1, True, 1.0)] == ["int", "bool", "float"]
    assert traces.count == 6
    f(1)
    f(-0.0)
    assert traces.count == 6


@hypothesis.given(
    a=st.one_of(st.floats(), st.integers(), st.booleans(), st.complex_numbers()),
    b=st.one_of(st.floats(), st.integers(), st.booleans(), st.complex_numbers()),
)
def test_static_equality_is_type_and_exact_value(a, b):
    from lift._static import Static

    def bits(v):
        if isinstance(v, float):
            return v.hex()
        if isinstance(v, complex):
            return (v.real.hex(), v.imag.hex())
        return v

    same = type(a) is type(b) and bits(a) == bits(b)
    assert (Static(a) == Static(b)) is same
    if same:
        assert hash(Static(a)) == hash(Static(b))
    assert Static(a) == Static(a)


def test_jit_caches_inside_frame(model):
    tree, state = model

    @chex.assert_max_traces(n=1)  # a second trace raises AssertionError
    def body(x):
        return accumulate(tree, x)

    f = lift.jit(body)
    run = lift.stateful(lambda x: f(x))
    _, s1 = run(state, jnp.ones(3))
    _, s2 = run(s1, jnp.ones(3))
    _, _ = run(s2, 2 * jnp.ones(3))
    assert int(s2[tree["n"]]) == 2


def test_jit_refuses_static_argnums():
    with pytest.raises(TypeError, match="static"):
        lift.jit(lambda x: x, static_argnums=0)


def test_jit_donate_state_top_level_reuse_raises(model):
    tree, state = model
    f = lift.jit(lift.stateful(lambda x: accumulate(tree, x)), donate_state=True)
    _, new = f(state, jnp.ones(3))
    assert_close(new[tree["acc"]], W)
    _, newer = f(new, jnp.ones(3))  # the returned state is fine
    assert_close(newer[tree["acc"]], 2 * W)
    with pytest.raises(lift.LiftError, match="donat"):
        f(state, jnp.ones(3))


def test_jit_consumed_state_into_another_jit_names_the_key(model):
    # A state consumed by a donating step, passed to a step that does not donate and
    # has no compiled signature for it yet: lift's error, naming the key.
    tree, state = model
    fn = lambda x: accumulate(tree, x)  # noqa: E731
    train = lift.jit(lift.stateful(fn), donate_state=True)
    evaluate = lift.jit(lift.stateful(fn))
    train(state, jnp.ones(3))
    with pytest.raises(lift.LiftError, match=r"donat.*\['acc'\]"):
        evaluate(state, jnp.ones(3))


@fast_path_only
def test_jit_after_a_donation_non_donating_calls_are_checked(model):
    tree, state = model
    step = lift.jit(lift.stateful(lambda x: accumulate(tree, x)))
    lift.jit(lift.stateful(lambda: None), donate_state=True)
    _, s1 = step(state, jnp.ones(3))
    _, s2 = step(s1, jnp.ones(3))  # checked in Python, then compiled code
    assert _python_calls_during(step, s2, jnp.ones(3)) != []
    assert_close(s2[tree["acc"]], 2 * W)


def test_jit_consumed_state_into_a_compiled_jit_names_the_key(model):
    # The same, once the non-donating step has compiled this signature: once a
    # donating lifted jit exists, non-donating ones check before C++ dispatch.
    tree, state = model
    fn = lambda x: accumulate(tree, x)  # noqa: E731
    train = lift.jit(lift.stateful(fn), donate_state=True)
    evaluate = lift.jit(lift.stateful(fn))
    fresh = jax.tree.map(jnp.copy, state)
    evaluate(fresh, jnp.ones(3))  # compiled for this signature
    train(fresh, jnp.ones(3))  # consumes `fresh`
    with pytest.raises(lift.LiftValueError, match=r"donat.*\['acc'\].*\['n'\]"):
        evaluate(fresh, jnp.ones(3))


@pytest.mark.parametrize("where", ["top level", "inside a frame"])
def test_jit_donate_state_one_buffer_under_two_keys(where):
    # One array used for two statistics: XLA refuses to donate a buffer twice, so
    # lift copies the duplicate; each key then evolves on its own.
    z = jnp.zeros(3)
    tree, state = lift.export_state(
        {"a": lift.StateEntry(z), "b": lift.StateEntry(z), "c": lift.StateEntry(z)}
    )

    def f(x):
        lift.set(tree["a"], lift.get(tree["a"]) + x)
        lift.set(tree["b"], lift.get(tree["b"]) - x)
        return x

    if where == "top level":
        step = lift.jit(lift.stateful(f), donate_state=True)
    else:
        step = lift.stateful(lift.jit(f, donate_state=True))
    _, new = step(state, jnp.ones(3))
    _, new = step(new, jnp.ones(3))
    assert_close(new[tree["a"]], 2 * np.ones(3))
    assert_close(new[tree["b"]], -2 * np.ones(3))
    assert_close(new[tree["c"]], np.zeros(3))
    assert z.is_deleted()  # the shared buffer was donated once, not copied
    with pytest.raises(lift.LiftValueError, match=r"donat.*\['a'\]"):
        step(state, jnp.ones(3))


def test_jit_donate_state_inside_frame_reuse_raises(model):
    tree, state = model
    f = lift.jit(lambda x: accumulate(tree, x), donate_state=True)
    run = lift.stateful(lambda x: f(x))
    _, new = run(state, jnp.ones(3))
    assert_close(new[tree["acc"]], W)
    with pytest.raises(lift.LiftError, match="donat"):
        run(state, jnp.ones(3))


def _sgd(tree, w, x):
    """A step whose parameters ``w`` come back updated: ``w - x`` and a tick."""
    tick(tree)
    return w - x


@pytest.mark.parametrize(
    ("donate", "call"),
    [
        ({"donate_argnums": 0}, "positional"),
        ({"donate_argnums": 0}, "keyword"),
        ({"donate_argnames": "w"}, "positional"),
        ({"donate_argnames": "w"}, "keyword"),
    ],
)
def test_jit_donate_argnums_top_level_counts_user_arguments(model, donate, call):
    # Positions and names are those of the user's function: the state aside.
    tree, state = model
    step = lift.jit(
        lift.stateful(lambda w, x: _sgd(tree, w, x)), donate_state=True, **donate
    )
    w, x = jnp.ones(3), jnp.ones(3)
    args, kwargs = ((w, x), {}) if call == "positional" else ((), {"w": w, "x": x})
    new_w, new = step(state, *args, **kwargs)
    assert_close(new_w, np.zeros(3))
    assert int(new[tree["n"]]) == 1
    assert w.is_deleted()
    assert not x.is_deleted()
    assert state[tree["n"]].is_deleted()
    # Reusing the donated parameters: lift's error, naming the argument.
    with pytest.raises(lift.LiftValueError) as info:
        step(new, *args, **kwargs)
    where = "argument 1" if call == "positional" else "argument 'w'"
    assert where in str(info.value)
    assert "donate_argnums" in str(info.value)
    # The returned values are live.
    newer_w, _ = step(new, new_w, x)
    assert_close(newer_w, -np.ones(3))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_jit_options_mean_the_same_on_both_paths(model, fast):
    # The C++ dispatch layer on or off (`LIFT_JIT_FAST_PATH`): same results, same
    # donation, same errors, same `lower`.
    from lift._jit import use_fast_path

    tree, state = model
    old = use_fast_path(fast)
    try:
        step = lift.jit(
            lift.stateful(lambda w, x, scale: _sgd(tree, w, scale * x)),
            donate_state=True,
            donate_argnums=0,
            keep_unused=True,
        )
    finally:
        use_fast_path(old)
    w = jnp.ones(3)
    hlo = step.lower(state, w, jnp.ones(3), jnp.float32(2)).as_text()
    assert "stablehlo" in hlo
    new_w, new = step(state, w, jnp.ones(3), 2.0)  # a Python number: static
    assert_close(new_w, -np.ones(3))
    assert int(new[tree["n"]]) == 1
    assert w.is_deleted()
    assert state[tree["n"]].is_deleted()
    with pytest.raises(lift.LiftValueError, match=r"donat.*\['acc'\]"):
        step(state, new_w, jnp.ones(3), 2.0)
    with pytest.raises(lift.LiftValueError, match=r"donat.*argument 1"):
        step(new, w, jnp.ones(3), 2.0)


def test_jit_donate_argnums_without_state():
    step = lift.jit(lambda w, x: w - x, donate_argnums=(0,))
    w = jnp.ones(3)
    assert_close(step(w, jnp.ones(3)), np.zeros(3))
    assert w.is_deleted()
    with pytest.raises(lift.LiftValueError, match=r"donat.*argument 0"):
        step(w, jnp.ones(3))


def test_jit_donate_argnums_inside_a_frame(model):
    tree, state = model
    step = lift.jit(lambda w, x: _sgd(tree, w, x), donate_argnums=0)
    w = jnp.ones(3)

    def outer(w, x):
        return step(w, x)

    new_w, new = lift.stateful(outer)(state, w, jnp.ones(3))
    assert_close(new_w, np.zeros(3))
    assert int(new[tree["n"]]) == 1
    assert not state[tree["n"]].is_deleted()  # the state was not donated
    assert w.is_deleted()
    with pytest.raises(lift.LiftValueError, match=r"donat.*argument 0"):
        lift.stateful(outer)(new, w, jnp.ones(3))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"donate_argnums": "w"}, lift.LiftTypeError),
        ({"donate_argnums": 1.0}, lift.LiftTypeError),
        ({"donate_argnames": [0]}, lift.LiftTypeError),
        ({"donate_argnums": -1}, lift.LiftValueError),
    ],
)
def test_jit_donate_argnums_bad_values(options, error):
    with pytest.raises(error, match="donate_arg"):
        lift.jit(lambda w: w, **options)


@pytest.mark.parametrize("stateful", [False, True])
def test_jit_donated_position_the_function_lacks_is_refused(model, stateful):
    # As `jax.jit` does, at wrap time: positions count the user's arguments.
    f = lift.stateful(lambda a: a) if stateful else (lambda a: a)
    with pytest.raises(lift.LiftValueError) as e:
        lift.jit(f, donate_argnums=5)
    msg = str(e.value)
    assert "<lambda>" in msg
    assert "donate_argnums=(5,)" in msg
    assert "position 5" in msg
    assert "1 positional argument (a)" in msg
    assert "state not counted" in msg
    assert "give positions 0 to 0" in msg
    # Donating the state and a non-pure function: its first parameter is the state.
    with pytest.raises(lift.LiftValueError, match=r"position 1.*\(a\)"):
        lift.jit(lambda state, a: a, donate_state=True, donate_argnums=1)
    # `*args` takes any position, as in JAX.
    lift.jit(lambda *a: a[0], donate_argnums=5)


@pytest.mark.parametrize("stateful", [False, True])
def test_jit_donated_name_the_function_lacks_is_refused(stateful):
    f = lift.stateful(lambda a: a) if stateful else (lambda a: a)
    with pytest.raises(lift.LiftValueError) as e:
        lift.jit(f, donate_argnames="zz")
    msg = str(e.value)
    assert "<lambda>" in msg
    assert "'zz'" in msg
    assert "its arguments are (a)" in msg
    assert "give names of its parameters" in msg
    lift.jit(lambda a, **kw: a, donate_argnames="zz")  # `**kwargs` takes any name


class _NoSignature:
    __signature__ = "unknown"  # inspect.signature raises TypeError

    def __call__(self, a):
        return a


@pytest.mark.parametrize("fast", [True, False])
def test_jit_donated_position_without_signature_checked_at_call(fast):
    from lift._jit import use_fast_path

    old = use_fast_path(fast)
    try:
        step = lift.jit(_NoSignature(), donate_argnums=1)
    finally:
        use_fast_path(old)
    with pytest.raises(lift.LiftValueError) as e:
        step(jnp.ones(2))
    msg = str(e.value)
    assert "_NoSignature" in msg
    assert "position 1" in msg
    assert "passes only 1 positional argument" in msg
    with pytest.raises(lift.LiftValueError, match="position 1"):
        lift.stateful(lambda x: step(x))({}, jnp.ones(2))


# ------------------------------------------------------------------------ vmap


def test_vmap_shared_state_batched_write_raises(model):
    tree, state = model

    def per_example(x):
        lift.set(tree["acc"], lift.get(tree["acc"]) + x)

    with pytest.raises(lift.LiftError) as info:
        lift.stateful(lift.vmap(per_example))(state, jnp.ones((4, 3)))
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "['acc']" in msg
    assert "axis_name" in msg
    assert "pmean" in msg


@pytest.mark.parametrize("batch", [1, 4])
def test_vmap_shared_state_with_pmean(model, batch):
    tree, state = model
    xs = np.arange(batch * 3, dtype=np.float32).reshape(batch, 3)

    def per_example(x):
        old = lift.get(tree["acc"])
        lift.set(tree["acc"], old + lax.pmean(x, "b"))
        tick(tree)  # unbatched write to shared state is fine
        return x * tree["w"] + old

    out, new = lift.stateful(lift.vmap(per_example, axis_name="b"))(state, xs)
    assert out.shape == (batch, 3)
    assert_close(out, xs * W)
    assert_close(new[tree["acc"]], xs.mean(0))
    assert new[tree["acc"]].shape == (3,)
    assert int(new[tree["n"]]) == 1


@pytest.mark.parametrize("batch", [1, 4])
def test_vmap_state_axes_int_maps_every_key(batch):
    tree, state = lift.export_state(
        {
            "acc": lift.StateEntry(jnp.zeros((batch, 3), jnp.float32)),
            "n": lift.StateEntry(jnp.arange(batch, dtype=jnp.int32)),
        }
    )
    xs = np.arange(batch * 3, dtype=np.float32).reshape(batch, 3)

    def per_example(x):
        lift.set(tree["acc"], lift.get(tree["acc"]) + x)
        return tick(tree, 10)

    out, new = lift.stateful(lift.vmap(per_example, state_axes=0))(state, xs)
    np.testing.assert_array_equal(out, np.arange(batch))
    np.testing.assert_array_equal(new[tree["n"]], np.arange(batch) + 10)
    assert_close(new[tree["acc"]], xs)


def test_vmap_state_axes_glob_maps_only_matching_keys():
    batch = 3
    tree, state = lift.export_state(
        {
            "cnt": lift.StateEntry(jnp.zeros(batch, jnp.int32)),
            "total": lift.StateEntry(jnp.zeros((), jnp.float32)),
        }
    )
    xs = np.array([1.0, -2.0, 5.0], np.float32)

    def per_example(x):
        lift.set(tree["cnt"], lift.get(tree["cnt"]) + (x > 0).astype(jnp.int32))
        lift.set(tree["total"], lift.get(tree["total"]) + lax.psum(x, "b"))
        return x

    f = lift.vmap(per_example, state_axes={"*.cnt": 0}, axis_name="b")
    _, new = lift.stateful(f)(state, xs)
    np.testing.assert_array_equal(new[tree["cnt"]], [1, 0, 1])
    assert float(new[tree["total"]]) == pytest.approx(4.0)
    _, new = lift.stateful(f)(new, xs)
    np.testing.assert_array_equal(new[tree["cnt"]], [2, 0, 2])
    assert float(new[tree["total"]]) == pytest.approx(8.0)


def test_vmap_state_axes_without_the_axis_raises(model):
    tree, state = model
    with pytest.raises(lift.LiftError, match=r"\['n'\]"):
        lift.stateful(lift.vmap(lambda x: tick(tree), state_axes=0))(state, jnp.ones(2))


def _make_member(key):
    return {
        "w": jax.random.normal(key, (3,)),
        "cnt": lift.StateEntry(jnp.zeros((), jnp.int32)),
        "sum": lift.StateEntry(jnp.zeros(3, jnp.float32)),
    }


def _member_step(member, x):
    lift.set(member["cnt"], lift.get(member["cnt"]) + 1)
    lift.set(member["sum"], lift.get(member["sum"]) + member["w"] * x)
    return jnp.sum(member["w"] * x)


@pytest.mark.parametrize("size", [1, 4])
def test_vmap_ensemble_maps_its_state_without_naming_axes(size):
    keys = jax.random.split(jax.random.key(0), size)
    ensemble = lift.vmap(_make_member)(keys)
    tree, state = lift.export_state(ensemble)
    assert state[tree["cnt"]].shape == (size,)
    assert state[tree["sum"]].shape == (size, 3)
    w = np.stack([np.asarray(jax.random.normal(k, (3,))) for k in keys])
    assert_close(tree["w"], w)

    step = lift.stateful(lift.vmap(_member_step, in_axes=(0, None)))
    out, s1 = step(state, tree, jnp.float32(2.0))
    out2, s2 = step(s1, tree, jnp.float32(-1.0))
    assert_close(out, (w * 2).sum(1))
    assert_close(out2, -w.sum(1))
    np.testing.assert_array_equal(s2[tree["cnt"]], np.full(size, 2))
    assert_close(s2[tree["sum"]], w)


def test_vmap_at_top_level():
    tree, state = make_counter()

    def step(x):
        return tick(tree, x)

    out, new = lift.vmap(lift.stateful(step), in_axes=(None, 0))(
        state, jnp.arange(4, dtype=jnp.int32)
    )
    np.testing.assert_array_equal(out, np.zeros(4))
    np.testing.assert_array_equal(new[tree["n"]], np.arange(4))


# ------------------------------------------------------------------------ scan


def test_scan_carries_state(model):
    tree, state = model
    xs = np.arange(12, dtype=np.float32).reshape(4, 3)

    def body(c, x):
        s = accumulate(tree, x)
        return c + s, lift.get(tree["n"])

    (c, ys), new = lift.stateful(lambda xs: lift.scan(body, 0.0, xs))(state, xs)
    acc = np.cumsum(W * xs, axis=0)
    assert_close(c, acc.sum(1).sum())
    np.testing.assert_array_equal(ys, [1, 2, 3, 4])
    assert_close(new[tree["acc"]], acc[-1])
    assert int(new[tree["n"]]) == 4


def test_scan_keeps_state_the_body_only_reads(model):
    tree, state = model
    start = jnp.array([1.0, 2.0, 3.0])

    def body(c, x):
        return c + jnp.sum(lift.get(tree["acc"])) * x, None

    def run(xs):
        lift.set(tree["acc"], start)  # written before the scan, only read inside
        return lift.scan(body, 0.0, xs)

    (c, _), new = lift.stateful(run)(state, jnp.arange(3.0))
    assert_close(c, 6.0 * 3.0)
    assert set(new) == set(state)
    assert_close(new[tree["acc"]], start)
    assert int(new[tree["n"]]) == 0


def test_scan_over_layers_restacks_state():
    layers = 4
    tree, state = lift.export_state(
        {
            "layer_stats": lift.StateEntry(jnp.zeros((layers, 3), jnp.float32)),
            "steps": lift.StateEntry(jnp.zeros((), jnp.int32)),
        }
    )
    scales = np.arange(1, layers + 1, dtype=np.float32)

    def layer(h, scale):
        lift.set(tree["layer_stats"], lift.get(tree["layer_stats"]) + h)
        tick({"n": tree["steps"]})
        return h * scale, jnp.sum(h)

    def run(h):
        return lift.scan(layer, h, scales, state_axes={"*layer_stats": 0})

    h0 = jnp.array([1.0, 2.0, 3.0])
    (h, sums), new = lift.stateful(run)(state, h0)
    inputs = np.stack([np.asarray(h0) * np.prod(scales[:i]) for i in range(layers)])
    assert_close(h, inputs[-1] * scales[-1])
    assert_close(sums, inputs.sum(1))
    assert new[tree["layer_stats"]].shape == (layers, 3)
    assert_close(new[tree["layer_stats"]], inputs)
    assert int(new[tree["steps"]]) == layers  # carried, not stacked
    # a second pass adds to each layer's own slice
    _, newer = lift.stateful(run)(new, h0)
    assert_close(newer[tree["layer_stats"]], 2 * inputs)


@pytest.mark.parametrize(
    ("xs", "length", "axes", "named", "lengths"),
    [
        (jnp.ones(5), None, {"a": 0}, ["['a']"], ["4 entries", "5 steps"]),
        (None, 6, {"a": 0}, ["['a']"], ["4 entries", "6 steps", "length=6"]),
        (jnp.ones(4), None, {"*": 0}, ["['b']"], ["3 entries", "4 steps"]),
        (None, None, {"*": 0}, ["['a']", "['b']"], ["3 entries", "has 4"]),
    ],
    ids=["xs", "length", "one-of-two", "keys-disagree"],
)
def test_scan_over_layers_length_mismatch_names_the_key(
    xs, length, axes, named, lengths
):
    tree, state = lift.export_state(
        {
            "a": lift.StateEntry(jnp.zeros((4, 3))),
            "b": lift.StateEntry(jnp.zeros((3, 3))),
        }
    )

    def layer(h, x):
        lift.set(tree["a"], lift.get(tree["a"]) + h)
        return h, None

    run = lift.stateful(
        lambda: lift.scan(layer, jnp.ones(3), xs, length, state_axes=axes)
    )
    with pytest.raises(lift.LiftValueError) as info:
        run(state)
    for needed in (*named, *lengths):
        assert needed in str(info.value)


def test_scan_reverse(model):
    tree, state = model
    xs = np.array([1.0, 10.0, 100.0], np.float32)

    def body(c, x):
        old = tick(tree)
        return c * 2 + x, old

    (c, ys), new = lift.stateful(lambda xs: lift.scan(body, 0.0, xs, reverse=True))(
        state, xs
    )
    assert_close(c, ((0 * 2 + 100) * 2 + 10) * 2 + 1)
    np.testing.assert_array_equal(ys, [2, 1, 0])  # ys[t] pairs with xs[t]
    assert int(new[tree["n"]]) == 3


def test_scan_length_without_xs(model):
    tree, state = model

    def body(c, x):
        assert x is None
        lift.set(tree["acc"], lift.get(tree["acc"]) + c)
        return c + 1.0, c

    (c, ys), new = lift.stateful(lambda: lift.scan(body, 1.0, None, length=5))(state)
    assert_close(c, 6.0)
    assert_close(ys, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert_close(new[tree["acc"]], np.full(3, 15.0))


@pytest.mark.parametrize("unroll", [1, 2, True])
def test_scan_unroll(model, unroll):
    tree, state = model
    xs = np.arange(15, dtype=np.float32).reshape(5, 3)

    def body(c, x):
        return c + accumulate(tree, x), None

    run = lift.stateful(lambda xs: lift.scan(body, 0.0, xs, unroll=unroll))
    (c, _), new = run(state, xs)
    acc = np.cumsum(W * xs, axis=0)
    assert_close(c, acc.sum())
    assert_close(new[tree["acc"]], acc[-1])
    assert int(new[tree["n"]]) == 5


def test_scan_at_top_level():
    def body(c, x):
        return c + x, c * x

    c, ys = lift.scan(body, 0.0, jnp.arange(4.0))
    c_ref, ys_ref = lax.scan(body, 0.0, jnp.arange(4.0))
    assert_close(c, c_ref)
    assert_close(ys, ys_ref)


def test_scan_under_jit(model):
    tree, state = model
    xs = np.ones((3, 3), np.float32)

    def run(xs):
        return lift.scan(lambda c, x: (c + accumulate(tree, x), None), 0.0, xs)[0]

    c, new = lift.jit(lift.stateful(run))(state, xs)
    assert_close(c, W.sum() * (1 + 2 + 3))
    assert int(new[tree["n"]]) == 3


# ------------------------------------------------------------------------ grad


def _loss(tree, w, x):
    pred = w * x
    lift.set(tree["acc"], pred)
    tick(tree)
    return jnp.sum(pred**2) + jnp.sum(lift.get(tree["acc"]))


def _loss_ref(w, x):
    pred = w * x
    return jnp.sum(pred**2) + jnp.sum(pred)


def test_grad_inside_frame_returns_updated_state(model):
    tree, state = model
    x = jnp.array([1.0, 2.0, 3.0])
    g, new = lift.stateful(lift.grad(lambda w, x: _loss(tree, w, x)))(state, W, x)
    assert_close(g, jax.grad(_loss_ref)(jnp.asarray(W), x))
    assert_close(new[tree["acc"]], W * np.asarray(x))
    assert int(new[tree["n"]]) == 1


def test_grad_argnums(model):
    tree, state = model
    x = jnp.array([1.0, 2.0, 3.0])
    f = lift.grad(lambda w, x: _loss(tree, w, x), argnums=(0, 1))
    (gw, gx), new = lift.stateful(f)(state, W, x)
    ref_w, ref_x = jax.grad(_loss_ref, argnums=(0, 1))(jnp.asarray(W), x)
    assert_close(gw, ref_w)
    assert_close(gx, ref_x)
    assert int(new[tree["n"]]) == 1


def test_value_and_grad_inside_frame(model):
    tree, state = model
    x = jnp.array([1.0, -2.0, 0.5])
    f = lift.value_and_grad(lambda w: _loss(tree, w, x))
    (value, g), new = lift.stateful(f)(state, jnp.asarray(W))
    ref_value, ref_g = jax.value_and_grad(_loss_ref)(jnp.asarray(W), x)
    assert_close(value, ref_value)
    assert_close(g, ref_g)
    assert int(new[tree["n"]]) == 1


def test_grad_has_aux(model):
    tree, state = model
    x = jnp.array([1.0, 2.0, 3.0])

    def loss(w):
        return _loss(tree, w, x), {"pred": w * x}

    (g, aux), new = lift.stateful(lift.grad(loss, has_aux=True))(state, W)
    assert_close(g, jax.grad(_loss_ref)(jnp.asarray(W), x))
    assert_close(aux["pred"], W * np.asarray(x))
    (v, aux2), g2 = lift.stateful(lift.value_and_grad(loss, has_aux=True))(state, W)[0]
    assert_close(v, _loss_ref(jnp.asarray(W), x))
    assert_close(aux2["pred"], aux["pred"])
    assert_close(g2, g)
    assert int(new[tree["n"]]) == 1


def test_grad_with_respect_to_state_dict_is_a_type_error(model):
    tree, state = model
    with pytest.raises(TypeError, match="state") as info:
        lift.grad(lift.stateful(lambda x: _loss(tree, tree["w"], x)))(state, W)
    assert isinstance(info.value, lift.LiftError)


def test_grad_with_respect_to_tree_with_entries_is_a_type_error():
    tree = {"w": jnp.ones(2), "s": lift.StateEntry(jnp.zeros(2))}
    with pytest.raises(TypeError, match="StateEntry"):
        lift.grad(lambda t: jnp.sum(t["w"]))(tree)


def test_grad_at_top_level_is_jax_grad():
    x = jnp.array([1.0, 2.0, 3.0])
    assert_close(lift.grad(_loss_ref)(jnp.asarray(W), x), jax.grad(_loss_ref)(W, x))


@pytest.mark.parametrize("transform", ["grad", "value_and_grad"])
def test_grad_of_python_scalar_is_jax_grad(transform):
    # Python numbers are differentiable inputs, as in JAX (not static values).
    lifted = getattr(lift, transform)(lambda x: x**2)(3.0)
    expected = getattr(jax, transform)(lambda x: x**2)(3.0)
    chex.assert_trees_all_equal(lifted, expected)
    assert float(jax.tree.leaves(lifted)[-1]) == 6.0
    # A Python number that is not differentiated stays a number, as in JAX.
    sized = lift.grad(lambda x, n: jnp.sum(jnp.ones(n) * x))(3.0, 4)
    assert float(sized) == 4.0


@pytest.mark.parametrize("transform", ["grad", "value_and_grad"])
@pytest.mark.parametrize(
    "options", [{}, {"argnums": (0,)}, {"has_aux": True}, {"argnums": (0, 1)}]
)
@pytest.mark.parametrize("x", [3.0, jnp.ones(())])
def test_grad_of_constant_output_is_zero_as_in_jax(transform, options, x):
    # The constant 2.0 is an output, not lift's static structure: gradient zero.
    if options.get("has_aux"):
        f = lambda x, y: (2.0, "aux")  # noqa: E731
    else:
        f = lambda x, y: 2.0  # noqa: E731
    lifted = getattr(lift, transform)(f, **options)(x, jnp.ones(2))
    expected = getattr(jax, transform)(f, **options)(x, jnp.ones(2))
    chex.assert_trees_all_equal(lifted, expected)
    grads = lifted[1] if transform == "value_and_grad" else lifted
    grads = grads[0] if transform == "grad" and options.get("has_aux") else grads
    assert all(float(jnp.sum(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))

    def inside(x, y):
        return getattr(lift, transform)(f, **options)(x, y)

    framed, _ = lift.stateful(inside)({}, x, jnp.ones(2))
    assert jax.tree.structure(framed) == jax.tree.structure(expected)
    chex.assert_trees_all_equal(framed, expected)


@pytest.mark.parametrize("transform", ["grad", "value_and_grad"])
@pytest.mark.parametrize("argnums", [0, (0,)])
@pytest.mark.parametrize("x", [3, True])
@pytest.mark.parametrize("framed", [False, True])
def test_grad_of_int_or_bool_input_is_jax_error(transform, argnums, x, framed):
    f = getattr(lift, transform)(lambda x: x**2 if type(x) is not bool else x, argnums)
    call = functools.partial(lift.stateful(f), {}) if framed else f
    with pytest.raises(TypeError, match="grad requires real- or complex-valued") as e:
        call(x)
    with pytest.raises(TypeError, match="grad requires real- or complex-valued"):
        getattr(jax, transform)(lambda x: x**2, argnums)(x)
    assert "Static" not in str(e.value)
    assert "allow_int" in str(e.value)  # JAX's message says how to fix it
    # With `allow_int`, a float0 gradient as in JAX.
    g = lift.grad(lambda x: 2.0 * jnp.asarray(x, jnp.float32), allow_int=True)(x)
    assert g.dtype == jax.dtypes.float0


def test_grad_state_is_not_differentiated(model):
    tree, state = model

    def loss(w):
        # state read into the loss is a constant for the gradient
        return jnp.sum(w * lift.get(tree["acc"])) + jnp.sum(w**2)

    state = {**state, tree["acc"]: jnp.array([1.0, 2.0, 3.0])}
    g, _ = lift.stateful(lift.grad(loss))(state, jnp.ones(3))
    assert_close(g, np.array([1.0, 2.0, 3.0]) + 2.0)


# ------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize("remat", [lift.checkpoint, lift.remat])
def test_checkpoint_under_grad_matches_plain(model, remat):
    tree, state = model
    x = jnp.array([0.3, -1.0, 2.0])

    def inner(w):
        return jnp.sin(_loss(tree, w, x))

    def plain(w):
        return lift.stateful(inner)(state, w)

    def remated(w):
        return lift.stateful(remat(inner))(state, w)

    g_ref, s_ref = jax.grad(plain, has_aux=True)(jnp.asarray(W))
    g, s = jax.grad(remated, has_aux=True)(jnp.asarray(W))
    assert_close(g, g_ref)
    assert_close(s[tree["acc"]], s_ref[tree["acc"]])
    assert int(s[tree["n"]]) == 1
    # lifted grad over a checkpointed body, inside the frame
    g2, s2 = lift.stateful(lift.grad(remat(inner)))(state, jnp.asarray(W))
    assert_close(g2, g_ref)
    assert int(s2[tree["n"]]) == 1


def test_checkpoint_at_top_level():
    f = lift.checkpoint(lambda x: jnp.sin(x) * x)
    assert_close(jax.grad(f)(1.5), jax.grad(lambda x: jnp.sin(x) * x)(1.5))


# ------------------------------------------------------------------------ cond


def _branches(tree):
    def yes(x):
        lift.set(tree["acc"], lift.get(tree["acc"]) + x)
        tick(tree)
        return x * 2

    def no(x):
        tick(tree, 100)
        return -x

    return yes, no


@pytest.mark.parametrize("jitted", [False, True])
@pytest.mark.parametrize("pred", [True, False])
def test_cond_branch_not_taken_never_writes(model, jitted, pred):
    tree, state = model
    yes, no = _branches(tree)

    def run(p, x):
        return lift.cond(p, yes, no, x)

    f = lift.stateful(run)
    if jitted:
        f = lift.jit(f)
    x = jnp.array([1.0, 2.0, 3.0])
    out, new = f(state, jnp.asarray(pred), x)
    if pred:
        assert_close(out, 2 * x)
        assert_close(new[tree["acc"]], x)
        assert int(new[tree["n"]]) == 1
    else:
        assert_close(out, -x)
        assert_close(new[tree["acc"]], np.zeros(3))
        assert int(new[tree["n"]]) == 100


def test_cond_with_python_bool(model):
    tree, state = model
    yes, no = _branches(tree)
    _, new = lift.stateful(lambda x: lift.cond(False, yes, no, x))(state, jnp.ones(3))
    assert_close(new[tree["acc"]], np.zeros(3))
    assert int(new[tree["n"]]) == 100


def test_cond_at_top_level():
    assert float(lift.cond(True, lambda x: x + 1, lambda x: x - 1, 1.0)) == 2.0
    assert float(lift.cond(False, lambda x: x + 1, lambda x: x - 1, 1.0)) == 0.0


@pytest.mark.parametrize("jitted", [False, True])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_switch_three_branches(model, jitted, index):
    tree, state = model

    def branch(i):
        def run(x):
            lift.set(tree["acc"], lift.get(tree["acc"]) + (i + 1) * x)
            tick(tree, 10**i)
            return x * i

        return run

    f = lift.stateful(lambda i, x: lift.switch(i, [branch(0), branch(1), branch(2)], x))
    if jitted:
        f = lift.jit(f)
    x = jnp.array([1.0, 2.0, 3.0])
    out, new = f(state, jnp.asarray(index), x)
    assert_close(out, index * x)
    assert_close(new[tree["acc"]], (index + 1) * x)
    assert int(new[tree["n"]]) == 10**index


def test_switch_at_top_level():
    fs = [lambda x: x, lambda x: x * 10, lambda x: x * 100]
    assert float(lift.switch(2, fs, 1.5)) == 150.0


# ----------------------------------------------------------------- loops


@pytest.mark.parametrize("jitted", [False, True])
def test_while_loop_cond_reads_state(model, jitted):
    tree, state = model

    def body(i):
        tick(tree, 2)
        lift.set(tree["acc"], lift.get(tree["acc"]) + i)
        return i + 1.0

    def run(limit):
        return lift.while_loop(lambda i: lift.get(tree["n"]) < limit, body, 0.0)

    f = lift.stateful(run)
    if jitted:
        f = lift.jit(f)
    i, new = f(state, jnp.int32(5))
    assert float(i) == 3.0  # n: 0 -> 2 -> 4 -> 6
    assert int(new[tree["n"]]) == 6
    assert_close(new[tree["acc"]], np.full(3, 0.0 + 1.0 + 2.0))


def test_while_loop_cond_cannot_write(model):
    tree, state = model

    def cond(i):
        tick(tree)
        return i < 3

    with pytest.raises(lift.FrameError):
        lift.stateful(lambda: lift.while_loop(cond, lambda i: i + 1, 0))(state)


def test_while_loop_at_top_level():
    assert int(lift.while_loop(lambda i: i < 7, lambda i: i + 2, 0)) == 8


@pytest.mark.parametrize("jitted", [False, True])
def test_fori_loop_threads_state(model, jitted):
    tree, state = model

    def body(i, total):
        lift.set(tree["acc"], lift.get(tree["acc"]) + i.astype(jnp.float32))
        tick(tree)
        return total * 2 + i

    f = lift.stateful(lambda: lift.fori_loop(1, 5, body, jnp.int32(0)))
    if jitted:
        f = lift.jit(f)
    total, new = f(state)
    assert int(total) == (((0 * 2 + 1) * 2 + 2) * 2 + 3) * 2 + 4
    assert_close(new[tree["acc"]], np.full(3, 1.0 + 2.0 + 3.0 + 4.0))
    assert int(new[tree["n"]]) == 4


def test_fori_loop_at_top_level():
    assert int(lift.fori_loop(0, 5, lambda i, c: c + i, 0)) == 10


# ------------------------------------------------------------------ eval_shape


def test_eval_shape_inside_frame_does_not_write(model):
    tree, state = model

    def f(x):
        acc = accumulate(tree, x)
        return jnp.outer(x, x), acc

    def run(x):
        shapes = lift.eval_shape(f, x)
        return shapes, lift.get(tree["n"])

    (shapes, n), new = lift.stateful(run)(state, jnp.ones(3))
    assert shapes[0] == jax.ShapeDtypeStruct((3, 3), jnp.float32)
    assert shapes[1].shape == ()
    assert int(n) == 0
    assert int(new[tree["n"]]) == 0
    assert_close(new[tree["acc"]], np.zeros(3))


def test_eval_shape_at_top_level(model):
    tree, state = model
    shapes = lift.eval_shape(lift.stateful(lambda x: accumulate(tree, x)), state, W)
    out, new = shapes
    assert out == jax.ShapeDtypeStruct((), jnp.float32)
    assert new[tree["acc"]] == jax.ShapeDtypeStruct((3,), jnp.float32)
    assert new[tree["n"]] == jax.ShapeDtypeStruct((), jnp.int32)


# --------------------------------------------------------------- lift_transform


def test_lift_transform_inside_frame(model):
    tree, state = model
    my_jit = lift.lift_transform(jax.jit)

    @chex.assert_max_traces(n=1)  # a second trace raises AssertionError
    def body(x):
        return accumulate(tree, x)

    f = my_jit(body)

    def run(x):
        return f(x) + f(x)

    out, new = lift.stateful(run)(state, jnp.ones(3))
    assert_close(out, W.sum() + 2 * W.sum())
    assert_close(new[tree["acc"]], 2 * W)
    assert int(new[tree["n"]]) == 2


def test_lift_transform_with_options(model):
    tree, state = model
    named = lift.lift_transform(jax.named_call)
    f = named(lambda x: accumulate(tree, x), name="accumulate")
    out, new = lift.stateful(f)(state, jnp.ones(3))
    assert_close(out, W.sum())
    assert int(new[tree["n"]]) == 1


def test_lift_transform_at_top_level():
    my_checkpoint = lift.lift_transform(jax.checkpoint)
    f = my_checkpoint(lambda x: jnp.sin(x) ** 2)
    assert_close(jax.grad(f)(0.7), jax.grad(lambda x: jnp.sin(x) ** 2)(0.7))


# ------------------------------------------------------------- outside a frame


def _outside_cases(f):
    """Each lifted transform applied to the implicit ``f``, called at top level."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()), ("d",))
    x = jnp.ones(8)
    return {
        "jit": lambda: lift.jit(f)(x),
        "vmap": lambda: lift.vmap(f)(x),
        "scan": lambda: lift.scan(lambda c, xi: (f(xi), None), 0.0, x),
        "grad": lambda: lift.grad(lambda x: jnp.sum(f(x)))(x),
        "value_and_grad": lambda: lift.value_and_grad(lambda x: jnp.sum(f(x)))(x),
        "cond": lambda: lift.cond(True, f, f, x),
        "switch": lambda: lift.switch(0, [f, f], x),
        "checkpoint": lambda: lift.checkpoint(f)(x),
        "while_loop": lambda: lift.while_loop(
            lambda c: jnp.sum(f(c)) < 3, lambda c: c + 1, x
        ),
        "fori_loop": lambda: lift.fori_loop(0, 2, lambda i, c: f(c), x),
        "eval_shape": lambda: lift.eval_shape(f, x),
        "shard_map": lambda: lift.shard_map(
            f, mesh=mesh, in_specs=P("d"), out_specs=P("d")
        )(x),
        "pmap": lambda: lift.pmap(f, "d")(x),
        "lift_transform": lambda: lift.lift_transform(jax.named_call)(f, name="g")(x),
    }


_OUTSIDE = list(_outside_cases(lambda x: x))


@pytest.mark.parametrize("what", ["get", "set"])
@pytest.mark.parametrize("transform", _OUTSIDE)
def test_transform_outside_a_frame_is_the_frame_error_of_get(model, transform, what):
    # Issue 16: not "the state is empty", but what a plain `lift.get` says.
    tree, _ = model

    def f(x):
        if what == "get":
            return x + jnp.sum(lift.get(tree["acc"]))
        lift.set(tree["acc"], jnp.ones(3))
        return x

    with pytest.raises(lift.FrameError) as info:
        lift.get(tree["acc"]) if what == "get" else lift.set(tree["acc"], W)
    plain = str(info.value)
    with pytest.raises(lift.FrameError) as info:
        _outside_cases(f)[transform]()
    assert str(info.value) == plain
    assert "['acc']" in plain
    assert "outside a frame" in plain
    assert "lift.stateful(f)(state, *args)" in plain


@pytest.mark.parametrize("transform", _OUTSIDE)
def test_transform_outside_a_frame_without_state_runs(transform):
    # Functions that touch no state work at top level, as their JAX transform does.
    out = _outside_cases(lambda x: 2 * x)[transform]()
    assert out is not None


# ---------------------------------------------------------------------- nesting


def test_nested_jit_scan_vmap_cond():
    batch, steps = 3, 4
    tree, state = lift.export_state(
        {
            "positives": lift.StateEntry(jnp.zeros(batch, jnp.int32)),
            "steps": lift.StateEntry(jnp.zeros((), jnp.int32)),
            "total": lift.StateEntry(jnp.zeros((), jnp.float32)),
        }
    )
    xs = np.array(
        [[1.0, -2.0, 3.0], [-1.0, -1.0, 2.0], [0.5, 4.0, -3.0], [2.0, 2.0, 2.0]],
        np.float32,
    )

    def pos(x):
        lift.set(tree["positives"], lift.get(tree["positives"]) + 1)
        return x

    def neg(x):
        return -2 * x

    def per_example(x):
        y = lift.cond(x > 0, pos, neg, x)
        lift.set(tree["total"], lift.get(tree["total"]) + lax.psum(y, "b"))
        return y

    vm = lift.vmap(per_example, state_axes={"*positives": 0}, axis_name="b")

    def body(c, row):
        tick({"n": tree["steps"]})
        ys = vm(row)
        return c + jnp.sum(ys), ys

    @lift.jit
    @lift.stateful
    def run(xs):
        return lift.scan(body, 0.0, xs)

    (c, ys), new = run(state, xs)
    expected_ys = np.where(xs > 0, xs, -2 * xs)
    assert_close(ys, expected_ys)
    assert_close(c, expected_ys.sum())
    np.testing.assert_array_equal(new[tree["positives"]], (xs > 0).sum(0))
    assert int(new[tree["steps"]]) == steps
    assert_close(new[tree["total"]], expected_ys.sum())


def _jit_made_with(fast, f, **options):
    """``lift.jit(f, **options)`` made with the C++ dispatch layer on or off."""
    from lift._jit import use_fast_path

    old = use_fast_path(fast)
    try:
        return lift.jit(f, **options)
    finally:
        use_fast_path(old)


class _GeneratorCall:
    def __call__(self, x):
        yield x


async def _coroutine(x):
    return x


async def _async_generator(x):
    yield x


def _generator(x):
    yield 2 * x


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
@pytest.mark.parametrize(
    ("f", "what"),
    [
        (_generator, "a generator function"),
        (_coroutine, "a coroutine function"),
        (_async_generator, "an async generator function"),
        (_GeneratorCall(), "a generator function"),
    ],
    ids=["generator", "coroutine", "async-generator", "callable-object"],
)
@pytest.mark.parametrize("donate", [False, True], ids=["plain", "donating"])
def test_jit_refuses_generator_and_coroutine_functions_when_decorating(
    fast, f, what, donate
):
    # Their body would run after the trace, with its tracers leaked: refused at
    # decoration, with `lift.stateful`'s message, before any call.
    with pytest.raises(lift.LiftTypeError, match=f"`lift.jit.*{what}") as info:
        _jit_made_with(fast, f, donate_state=donate)
    assert "outside the trace" in "".join(getattr(info.value, "__notes__", []))
    with pytest.raises(lift.LiftTypeError, match=what):
        lift.jit(donate_state=donate)(f)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
@pytest.mark.parametrize("donate", [False, True], ids=["plain", "donating"])
def test_jit_top_level_has_lower_trace_and_eval_shape(model, fast, donate):
    tree, state = model
    step = _jit_made_with(
        fast, lift.stateful(lambda x: accumulate(tree, x)), donate_state=donate
    )
    x = jnp.ones(3)
    out, new = step.eval_shape(state, x)
    assert (out.shape, out.dtype) == ((), jnp.float32)
    assert new[tree["acc"]].shape == (3,)
    assert set(new) == set(state)
    traced = step.trace(state, x)
    assert "stablehlo" in traced.lower().as_text()
    assert "stablehlo" in step.lower(state, x).as_text()
    # None of them ran the step: the state is intact and still usable.
    assert not state[tree["acc"]].is_deleted()
    (_, new) = step(state, x)
    assert int(new[tree["n"]]) == 1


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
@pytest.mark.parametrize("called_first", [False, True], ids=["fresh", "called"])
@pytest.mark.parametrize("donate", [False, True], ids=["plain", "donating"])
@pytest.mark.parametrize(
    "tail", [lambda x: (x, "tag"), lambda x: {"y": x, "step": 1}], ids=["str", "int"]
)
def test_jit_inspecting_a_non_array_output_is_a_lift_type_error(
    model, fast, called_first, donate, tail
):
    # The compiled program returns only arrays (lift adds the rest at call time):
    # `lower`, `trace` and `eval_shape` say so, before or after a call compiled it.
    tree, state = model
    step = _jit_made_with(
        fast, lift.stateful(lambda x: tail(accumulate(tree, x))), donate_state=donate
    )
    x = jnp.ones(3)
    if called_first:
        from lift._tracing import is_array

        out, state = step(state, x)
        statics = [v for v in jax.tree_util.tree_leaves(out) if not is_array(v)]
        assert statics == jax.tree_util.tree_leaves(tail(None))
    for stage in ("lower", "trace", "eval_shape"):
        with pytest.raises(lift.LiftTypeError, match="returns only arrays") as info:
            getattr(step, stage)(state, x)
        assert type(info.value) is lift.LiftTypeError
        assert "at call time" in str(info.value)
        assert f"`{stage}`" in str(info.value)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_jit_lower_takes_python_numbers_as_arguments(model, fast):
    # Documented: `lower` lowers as `jax.jit` does (a Python number is an argument of
    # the program); a call makes it static.
    tree, state = model
    step = _jit_made_with(fast, lift.stateful(lambda x, k: accumulate(tree, k * x)))
    lowered = step.lower(state, jnp.ones(3), 2.0)
    assert len(jax.tree_util.tree_leaves(lowered.args_info)) == len(state) + 2
    assert "as an argument of the program" in " ".join(step.lower.__doc__.split())


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
@pytest.mark.parametrize("donate", [False, True], ids=["plain", "donating"])
@pytest.mark.parametrize(
    "tail", [lambda y: (y, "tag"), lambda y: {"y": y, "step": 1}], ids=["str", "int"]
)
def test_jit_with_a_non_array_output_runs_the_body_once_per_signature(
    model, fast, donate, tail
):
    # User code never runs twice behind the user's back: the fast layer's trace of
    # the first call is the one its output comes from, and later calls reuse it.
    tree, state = model
    runs = []

    def body(x):
        runs.append(x.shape)
        return tail(accumulate(tree, x))

    step = _jit_made_with(fast, lift.stateful(body), donate_state=donate)
    out, state = step(state, jnp.ones(3))
    assert runs == [(3,)]
    total = out["y"] if isinstance(out, dict) else out[0]
    assert out == tail(total)
    assert_close(total, np.sum(W))
    for k in range(2, 4):
        out, state = step(state, jnp.full(3, k, jnp.float32))
    assert runs == [(3,)]
    out, state = step(state, jnp.ones(()))  # a new signature: one more trace
    out, state = step(state, jnp.ones(3))  # compiled before: no trace
    assert runs == [(3,), ()]
    assert int(state[tree["n"]]) == 5
    assert_close(state[tree["acc"]], (1 + 2 + 3 + 1 + 1) * W)
    if donate:
        consumed = state
        out, state = step(consumed, jnp.ones(3))
        with pytest.raises(lift.LiftValueError, match=r"donat.*\['acc'\]"):
            step(consumed, jnp.ones(3))
    assert jax.tree_util.tree_leaves(tail(None)) == [
        v for v in jax.tree_util.tree_leaves(out) if not isinstance(v, jax.Array)
    ]


@fast_path_only
def test_jit_non_array_outputs_leave_compiled_array_calls_in_cpp(
    model, before_any_donation
):
    # A signature compiled with only array outputs stays jax.jit's C++ dispatch
    # (no Python) after another signature returned a non-array leaf.
    tree, state = model

    def body(x):
        total = accumulate(tree, x)
        return (total, "scalar") if x.ndim == 0 else total

    step = lift.jit(lift.stateful(body))
    x = jnp.ones(3)
    _, state = step(state, x)
    out, state = step(state, jnp.ones(()))
    assert out[1] == "scalar"
    assert _python_calls_during(step, state, x) == []
    out, state = step(state, jnp.ones(()))
    assert out[1] == "scalar"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_jit_of_a_plain_function_with_a_non_array_output_runs_it_once(fast):
    runs = []

    def f(x):
        runs.append(1)
        return x, (x + 1, ("a", None))

    jitted = _jit_made_with(fast, f)
    for _ in range(3):
        out = jitted(jnp.ones(2))
    assert len(runs) == 1
    assert out[1][1] == ("a", None)
    assert_close(out[1][0], 2 * np.ones(2))
