"""Frames: ``stateful``, ``get``, ``set`` and ``lower``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_counter, tick
from hypothesis import given
from hypothesis import strategies as st

import lift


@pytest.fixture
def model():
    """A tree with a float vector, an int counter and a nested pair of entries."""
    return lift.export_state(
        {
            "w": jnp.arange(3.0),
            "ema": lift.StateEntry(jnp.zeros(3, jnp.float32)),
            "n": lift.StateEntry(jnp.zeros((), jnp.int32)),
            "pair": lift.StateEntry(
                (jnp.ones(2, jnp.float32), jnp.zeros((), jnp.int32))
            ),
        }
    )


# ---------------------------------------------------------------- stateful basics


def test_stateful_returns_out_and_new_state(model):
    tree, state = model

    def step(x):
        lift.set(tree["ema"], 0.5 * lift.get(tree["ema"]) + 0.5 * x)
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return x * tree["w"]

    x = jnp.array([1.0, 2.0, 4.0])
    result = lift.stateful(step)(state, x)
    assert isinstance(result, tuple)
    assert len(result) == 2
    out, new = result
    np.testing.assert_array_equal(out, x * jnp.arange(3.0))
    np.testing.assert_array_equal(new[tree["ema"]], 0.5 * x)
    assert int(new[tree["n"]]) == 1
    # a second call on the new state keeps threading
    _, newer = lift.stateful(step)(new, x)
    np.testing.assert_allclose(newer[tree["ema"]], 0.75 * x)
    assert int(newer[tree["n"]]) == 2


def test_input_state_is_never_mutated(model):
    tree, state = model
    before = dict(state)

    def step():
        tick(tree)
        lift.set(tree["ema"], jnp.full(3, 7.0))

    _, new = lift.stateful(step)(state)
    assert state == before  # same keys, same value objects
    for key in state:
        assert state[key] is before[key]
    assert int(state[tree["n"]]) == 0
    np.testing.assert_array_equal(state[tree["ema"]], jnp.zeros(3))
    assert new is not state


def test_output_has_exactly_the_input_keys(model):
    tree, state = model

    def step():
        tick(tree)

    _, new = lift.stateful(step)(state)
    assert set(new) == set(state)
    assert all(type(k) is lift.StateKey for k in new)


def test_unwritten_values_are_the_same_objects(model):
    tree, state = model

    def step():
        lift.get(tree["ema"])  # read, not written
        tick(tree)

    _, new = lift.stateful(step)(state)
    assert new[tree["ema"]] is state[tree["ema"]]
    assert new[tree["pair"]] is state[tree["pair"]]
    assert new[tree["n"]] is not state[tree["n"]]


def test_kwargs_are_passed_through(model):
    tree, state = model

    def step(x, *, scale):
        lift.set(tree["ema"], x * scale)
        return scale

    out, new = lift.stateful(step)(state, jnp.ones(3), scale=3.0)
    assert out == 3.0
    np.testing.assert_array_equal(new[tree["ema"]], jnp.full(3, 3.0))


def test_stateful_refuses_non_callable():
    with pytest.raises(lift.LiftError, match="callable"):
        lift.stateful(3)


def test_stateful_refuses_non_mapping_state(model):
    del model
    with pytest.raises(TypeError, match="state dict"):
        lift.stateful(lambda: None)([1, 2])


# ----------------------------------------------------- the first argument is state


def _train_step(model, x):
    """A step taking the model explicitly (its state is implicit)."""
    lift.set(model["n"], lift.get(model["n"]) + 1)
    return x * model["w"]


def test_step_called_without_its_state_names_what_was_passed(model):
    tree, _ = model
    step = lift.stateful(_train_step)
    with pytest.raises(lift.LiftTypeError) as info:
        step(tree, jnp.ones(3))  # the model where the state belongs
    msg = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "'w'" in msg  # what was passed: a dict with the key 'w'
    assert "step(state, *args)" in msg
    assert "_train_step" in msg


def test_step_called_with_model_and_state_swapped(model):
    tree, state = model
    step = lift.stateful(_train_step)
    with pytest.raises(lift.LiftTypeError, match=r"step\(state, \*args\)"):
        step(tree, state, jnp.ones(3))


def test_step_called_with_keyword_arguments_only(model):
    tree, state = model

    def fwd(model, x):
        return x

    step = lift.stateful(fwd)
    with pytest.raises(lift.LiftTypeError) as info:
        step(state=state, model=tree, x=1.0)
    msg = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "fwd" in msg
    assert "state=, model=, x=" in msg  # the keyword arguments it got
    assert "first positional argument" in msg
    assert "step(state, *args, **kwargs)" in msg
    assert step(state, model=tree, x=1.0) == (1.0, state)


def test_step_called_with_a_pure_dict_hints_from_pure_dict(model):
    _, state = model
    step = lift.stateful(lambda: None)
    with pytest.raises(lift.LiftTypeError) as info:
        step(lift.to_pure_dict(state))
    msg = str(info.value)
    assert "['w']" in msg or "['ema']" in msg or "['n']" in msg
    assert "lift.from_pure_dict(d, like=state)" in msg
    with pytest.raises(lift.LiftTypeError) as info:
        step({"w": 1})  # plain names, not key paths: no such hint
    assert "like=state" not in str(info.value)


def test_step_called_with_a_non_dict_model(model):
    tree, _ = model
    step = lift.stateful(lambda model, x: x)
    with pytest.raises(lift.LiftTypeError) as info:
        step([tree["w"], tree["n"]], 1.0)
    assert "list" in str(info.value)
    assert "step(state, *args)" in str(info.value)


def test_a_mapping_of_state_keys_to_models_is_refused(model):
    tree, state = model
    key = next(iter(state))

    class Frozen(dict):  # any Mapping other than a dict takes the full check
        pass

    with pytest.raises(lift.LiftTypeError) as info:
        lift.stateful(lambda: None)(Frozen({key: tree}))
    assert "['n']" in str(info.value) or "['ema']" in str(info.value)
    assert "model" in str(info.value)


def test_empty_and_mapping_states_are_valid(model):
    _, state = model
    assert lift.stateful(lambda: 1)({}) == (1, {})
    from types import MappingProxyType

    out, new = lift.stateful(lambda: 2)(MappingProxyType(state))
    assert out == 2
    assert new == dict(state)


def test_first_argument_check_adds_nothing_to_a_compiled_call(model):
    tree, state = model
    traces = []

    def step(x):
        traces.append(None)
        return _train_step(tree, x)

    f = lift.jit(lift.stateful(step))
    _, s1 = f(state, jnp.ones(3))
    _, s2 = f(s1, jnp.ones(3))
    assert len(traces) == 1
    assert int(s2[tree["n"]]) == 2
    with pytest.raises(lift.LiftTypeError, match=r"step\(state, \*args\)"):
        f(tree, jnp.ones(3))


# ------------------------------------------------- generators and coroutines


def _gen(tree):
    yield lift.get(tree["n"])


async def _coro(tree):
    return lift.get(tree["n"])


async def _agen(tree):
    yield lift.get(tree["n"])


class _GenCall:
    def __call__(self, tree):
        yield lift.get(tree["n"])


@pytest.mark.parametrize(
    ("fn", "what"),
    [
        (_gen, "a generator function"),
        (_coro, "a coroutine function"),
        (_agen, "an async generator function"),
        (_GenCall(), "a generator function"),
        (functools.partial(_gen), "a generator function"),
    ],
    ids=["generator", "coroutine", "async-generator", "callable-object", "partial"],
)
def test_stateful_refuses_generator_and_coroutine_functions(fn, what):
    with pytest.raises(lift.LiftTypeError) as info:
        lift.stateful(fn)
    msg = str(info.value)
    assert what in msg
    assert "frame has closed" in msg
    assert "regular function" in msg
    assert "step(state, x)" in msg


def test_a_returned_generator_cannot_write_another_calls_frame():
    # A regular function returning a generator that uses get/set lazily; iterated
    # inside another model's stateful call with the same paths (100 must not become
    # 101), the generator's get/set go to its own, closed frame.
    tree, state_a = make_counter(0)
    _, state_b = make_counter(100)

    def make_ticker():
        def ticker():
            while True:
                yield tick(tree)

        return ticker()

    ticker, new_a = lift.stateful(make_ticker)(state_a)

    def consume():
        return next(ticker)

    with pytest.raises(lift.FrameError) as info:
        lift.stateful(consume)(state_b)
    assert "['n']" in str(info.value)
    assert "has returned" in str(info.value)
    assert int(state_b[tree["n"]]) == 100
    assert int(new_a[tree["n"]]) == 0
    another, _ = lift.stateful(make_ticker)(state_a)
    with pytest.raises(lift.FrameError, match="has returned"):  # outside any frame
        next(another)


def test_a_returned_generator_not_using_state_still_works():
    tree, state = make_counter(3)

    def make():
        n = lift.get(tree["n"])  # read during the call: fine

        def numbers():
            received = yield int(n)
            while received is not None:
                received = yield received * 2
            return "done"

        return numbers()

    gen, _ = lift.stateful(make)(state)
    assert next(gen) == 3
    assert gen.send(5) == 10
    with pytest.raises(StopIteration) as stop:
        gen.send(None)
    assert stop.value.value == "done"
    gen2, _ = lift.stateful(make)(state)
    next(gen2)
    with pytest.raises(ValueError, match="thrown"):
        gen2.throw(ValueError("thrown"))


# ---------------------------------------------------------------- immutable frames


def test_immutable_frame_reads(model):
    tree, state = model
    out, new = lift.stateful(lambda: lift.get(tree["ema"]) + 1, mutable=False)(state)
    np.testing.assert_array_equal(out, jnp.ones(3))
    assert new == state


def test_immutable_frame_refuses_set(model):
    tree, state = model
    pure = lift.stateful(lambda: tick(tree), mutable=False)
    with pytest.raises(lift.FrameError, match="mutable") as info:
        pure(state)
    assert isinstance(info.value, lift.LiftError)
    assert "['n']" in str(info.value)


# ------------------------------------------------------------- outside a frame


def test_get_outside_frame_names_the_fix(model):
    tree, _ = model
    with pytest.raises(lift.FrameError, match="outside a frame") as info:
        lift.get(tree["n"])
    assert "lift.stateful" in str(info.value)
    assert isinstance(info.value, lift.LiftError)


def test_set_outside_frame_names_the_fix(model):
    tree, _ = model
    with pytest.raises(lift.FrameError, match="outside a frame") as info:
        lift.set(tree["n"], jnp.ones((), jnp.int32))
    assert "lift.stateful" in str(info.value)


def test_frame_is_gone_after_the_call(model):
    tree, state = model
    lift.stateful(lambda: lift.get(tree["n"]))(state)
    with pytest.raises(lift.FrameError):
        lift.get(tree["n"])


def test_frame_is_gone_after_an_exception(model):
    tree, state = model

    def boom():
        lift.get(tree["n"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lift.stateful(boom)(state)
    with pytest.raises(lift.FrameError):
        lift.get(tree["n"])


# ------------------------------------------------------------------ set checks


@pytest.mark.parametrize(
    ("name", "bad", "what"),
    [
        ("ema", jnp.zeros(4, jnp.float32), "shape"),
        ("ema", jnp.zeros((3, 1), jnp.float32), "shape"),
        ("ema", jnp.zeros(3, jnp.int32), "dtype"),
        ("n", jnp.zeros((), jnp.float32), "dtype"),
        ("pair", jnp.ones(2, jnp.float32), "structure"),
        ("pair", [jnp.ones(2, jnp.float32), jnp.zeros((), jnp.int32)], "structure"),
    ],
)
def test_set_checks_structure_shape_dtype_and_names_the_key(model, name, bad, what):
    tree, state = model

    def step():
        lift.set(tree[name], bad)

    with pytest.raises(lift.LiftError) as info:
        lift.stateful(step)(state)
    assert isinstance(info.value, ValueError)
    assert str(tree[name]) in str(info.value)
    assert what in str(info.value)


def test_set_unknown_key_is_a_key_error(model):
    _tree, state = model
    with pytest.raises(KeyError) as info:
        lift.stateful(lambda: lift.set(lift.StateKey("['emma']"), jnp.zeros(3)))(state)
    assert isinstance(info.value, lift.LiftError)
    assert "['ema']" in str(info.value)  # the closest existing path


def test_get_unknown_key_is_a_key_error(model):
    _tree, state = model
    with pytest.raises(KeyError, match=r"\['n'\]"):
        lift.stateful(lambda: lift.get(lift.StateKey("['nn']")))(state)


def test_python_scalar_is_cast_to_the_state_dtype(model):
    tree, state = model

    def step():
        lift.set(tree["ema"], lift.get(tree["ema"]) + 1.5)  # weak float → float32
        lift.set(tree["n"], 5)

    _, new = lift.stateful(step)(state)
    assert new[tree["ema"]].dtype == jnp.float32
    assert not new[tree["ema"]].weak_type
    np.testing.assert_array_equal(new[tree["ema"]], jnp.full(3, 1.5))
    assert isinstance(new[tree["n"]], jax.Array), type(new[tree["n"]])
    assert new[tree["n"]].dtype == jnp.int32
    assert not new[tree["n"]].weak_type
    assert int(new[tree["n"]]) == 5


def test_scalar_into_float32_scalar_state():
    tree, state = lift.export_state({"t": lift.StateEntry(jnp.zeros((), jnp.float32))})
    _, new = lift.stateful(lambda: lift.set(tree["t"], 2.0))(state)
    assert isinstance(new[tree["t"]], jax.Array), type(new[tree["t"]])
    assert new[tree["t"]].dtype == jnp.float32
    assert not new[tree["t"]].weak_type
    assert float(new[tree["t"]]) == 2.0


def test_weakly_typed_array_is_cast_to_the_state_dtype(model):
    tree, state = model
    _, new = lift.stateful(lambda: lift.set(tree["n"], jnp.asarray(5)))(state)
    assert new[tree["n"]].dtype == jnp.int32
    assert not new[tree["n"]].weak_type
    # so a jitted step sees the same input types on every call and never retraces
    traces = []

    def step():
        traces.append(None)
        tick(tree)

    f = lift.jit(lift.stateful(step))
    _, s1 = f(state)
    _, s2 = f(new)
    assert len(traces) == 1
    assert int(s1[tree["n"]]) == 1
    assert int(s2[tree["n"]]) == 6


def test_get_with_state_entry_says_export():
    entry = lift.StateEntry(jnp.zeros(()))
    with pytest.raises(TypeError, match="export") as info:
        lift.stateful(lambda: lift.get(entry))({})
    assert isinstance(info.value, lift.LiftError)


def test_set_with_state_entry_says_export():
    entry = lift.StateEntry(jnp.zeros(()))
    with pytest.raises(TypeError, match="export"):
        lift.stateful(lambda: lift.set(entry, 1.0))({})


def test_get_with_a_non_key_is_a_type_error(model):
    _, state = model
    with pytest.raises(TypeError, match="StateKey"):
        lift.stateful(lambda: lift.get(3))(state)


def test_plain_str_path_works_for_get(model):
    tree, state = model
    path = str(tree["ema"])
    assert type(path) is str
    out, _ = lift.stateful(lambda: lift.get(path))(state)
    assert out is state[tree["ema"]]


def test_plain_str_path_works_for_set(model):
    tree, state = model
    _, new = lift.stateful(lambda: lift.set("['n']", jnp.asarray(4, jnp.int32)))(state)
    assert int(new[tree["n"]]) == 4


# --------------------------------------------------------------------- nesting


def test_nested_stateful_frames_are_independent():
    outer_tree, outer_state = lift.export_state(
        {"n": lift.StateEntry(jnp.asarray(10, jnp.int32))}, prefix="outer"
    )
    inner_tree, inner_state = make_counter(100)

    def inner():
        # only the inner frame is visible here
        with pytest.raises(KeyError):
            lift.get(outer_tree["n"])
        return tick(inner_tree, 5)

    def outer():
        old = tick(outer_tree)
        inner_old, inner_new = lift.stateful(inner)(inner_state)
        # the outer frame is back after the inner call
        after = lift.get(outer_tree["n"])
        return old, inner_old, inner_new, after

    (old, inner_old, inner_new, after), new = lift.stateful(outer)(outer_state)
    assert int(old) == 10
    assert int(after) == 11
    assert int(inner_old) == 100
    assert int(inner_new[inner_tree["n"]]) == 105
    assert int(new[outer_tree["n"]]) == 11
    assert int(inner_state[inner_tree["n"]]) == 100


def test_nested_frame_with_the_same_keys_does_not_leak_writes():
    tree, state = make_counter(0)

    def outer():
        tick(tree, 1)
        _, inner_new = lift.stateful(lambda: tick(tree, 100))(state)
        return inner_new

    inner_new, new = lift.stateful(outer)(state)
    assert int(inner_new[tree["n"]]) == 100  # inner started from `state`, not outer's
    assert int(new[tree["n"]]) == 1


# ----------------------------------------------------------------------- lower


def test_lower_reads_and_writes_the_frame():
    tree, state = make_counter(3)

    def pure(s, x):
        n = s[tree["n"]]
        return n * x, {**s, tree["n"]: n + 2}

    def step(x):
        a = lift.lower(pure)(x)
        b = lift.lower(pure)(x)
        return a, b, lift.get(tree["n"])

    (a, b, n), new = lift.stateful(step)(state, 10)
    assert int(a) == 30
    assert int(b) == 50
    assert int(n) == 7
    assert int(new[tree["n"]]) == 7


def test_lower_of_stateful_behaves_like_f(model):
    tree, state = model

    def f(x):
        lift.set(tree["ema"], lift.get(tree["ema"]) + x)
        return tick(tree)

    direct = lift.stateful(lambda x: (f(x), f(2 * x)))(state, jnp.ones(3))
    lowered_f = lift.lower(lift.stateful(f))
    via_lower = lift.stateful(lambda x: (lowered_f(x), lowered_f(2 * x)))(
        state, jnp.ones(3)
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, via_lower, direct)
    assert int(via_lower[1][tree["n"]]) == 2
    np.testing.assert_array_equal(via_lower[1][tree["ema"]], jnp.full(3, 3.0))


def test_lower_of_immutable_stateful_stays_read_only():
    tree, state = make_counter()
    lowered = lift.lower(lift.stateful(lambda: tick(tree), mutable=False))
    with pytest.raises(lift.FrameError):
        lift.stateful(lowered)(state)


def test_lower_returning_an_unknown_key_raises_key_error():
    _tree, state = make_counter()

    def pure(s):
        return None, {**s, lift.StateKey("['new']"): jnp.zeros(())}

    with pytest.raises(KeyError, match="new") as info:
        lift.stateful(lift.lower(pure))(state)
    assert isinstance(info.value, lift.LiftError)


def test_lower_checks_the_values_it_writes():
    tree, state = make_counter()

    def pure(s):
        return None, {tree["n"]: jnp.zeros(2, jnp.int32)}

    with pytest.raises(ValueError, match=r"\['n'\]"):
        lift.stateful(lift.lower(pure))(state)


def test_lower_needs_an_out_state_pair():
    _tree, state = make_counter()
    with pytest.raises(ValueError, match=r"\(out, state\)"):
        lift.stateful(lift.lower(lambda s: s))(state)


def test_lower_outside_a_frame_raises():
    lowered = lift.lower(lambda s: (1, s))
    with pytest.raises(lift.FrameError, match="outside a frame"):
        lowered()


# ----------------------------------------------------------------------- leaks


def test_escaped_tracer_from_finished_vmap_raises_trace_error():
    tree, state = make_counter()
    leaked = []

    def grab(x):
        leaked.append(x)
        return x

    def step():
        jax.vmap(grab)(jnp.arange(3, dtype=jnp.int32))
        lift.set(tree["n"], leaked[0])

    with pytest.raises(lift.TraceError) as info:
        lift.stateful(step)(state)
    assert isinstance(info.value, lift.LiftError)
    assert "['n']" in str(info.value)


def test_escaped_tracer_from_finished_jit_raises_trace_error():
    tree, state = make_counter()
    leaked = []

    @jax.jit
    def grab(x):
        leaked.append(x + 1)
        return x

    def step():
        grab(jnp.zeros((), jnp.int32))
        lift.set(tree["n"], leaked[0])

    with pytest.raises(lift.TraceError, match=r"\['n'\]"):
        lift.stateful(step)(state)


def test_a_returned_coroutine_cannot_use_another_calls_frame():
    import asyncio

    tree, state_a = make_counter(0)
    _, state_b = make_counter(100)
    coro, new_a = lift.stateful(lambda: _coro(tree))(state_a)

    def consume():  # awaits it while another frame (B, same paths) is current
        return asyncio.run(coro)

    with pytest.raises(lift.FrameError, match=r"has returned") as info:
        lift.stateful(consume)(state_b)
    assert "['n']" in str(info.value)
    assert int(new_a[tree["n"]]) == 0

    async def plain():
        await asyncio.sleep(0)
        return 7

    returned, _ = lift.stateful(lambda: plain())(state_a)
    assert asyncio.run(returned) == 7  # a coroutine not using state still works


@given(
    keys=st.lists(
        st.one_of(
            st.text(max_size=5).map(lambda s: lift.StateKey(f"[{s!r}]")),
            st.text(max_size=5),
            st.integers(),
        ),
        max_size=5,
        unique_by=lambda k: (type(k) is lift.StateKey, k),
    )
)
def test_the_first_argument_check(keys):
    # Cheap by design: a dict is checked by its first key (a model's keys are never
    # StateKeys); the full check runs only when that one fails.
    state = {}
    for k in keys:
        state.setdefault(k, jnp.zeros(()))
    pure = lift.stateful(lambda: None)
    if all(type(k) is lift.StateKey for k in state):
        assert pure(state) == (None, state)
    elif type(next(iter(state))) is not lift.StateKey:
        with pytest.raises(lift.LiftTypeError, match=r"step\(state, \*args\)") as info:
            pure(state)
        bad = next(k for k in state if type(k) is not lift.StateKey)
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    "transform",
    [lift.grad, lift.value_and_grad, lift.checkpoint, lift.vmap, lift.jit],
    ids=["grad", "value_and_grad", "checkpoint", "vmap", "jit"],
)
def test_user_arguments_named_state_or_pures_pass_through_every_transform(transform):
    # The combinator's own parameters are positional-only: a user keyword with the
    # same name is the user's.
    tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})

    def f(params, state=None, pures=None):
        lift.set(tree["n"], lift.get(tree["n"]) + 1)
        return jnp.sum(params * state * pures)

    run = lift.stateful(lambda p, s: transform(f)(p, state=s, pures=s))
    _, new = run(state, jnp.ones(2), 2 * jnp.ones(2))
    assert new[tree["n"]] == 1


class _Layer:  # not a pytree
    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return x * self.w


class _Config:  # not a pytree, no arrays: a fine static argument
    def __init__(self, scale):
        self.scale = scale


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_a_non_pytree_argument_holding_arrays_is_refused_not_made_stale(fast):
    from lift._jit import use_fast_path

    old = use_fast_path(fast)
    try:
        apply = lift.jit(lambda layer, x: layer(x))
        scale = lift.jit(lambda cfg, x: x * cfg.scale)
    finally:
        use_fast_path(old)
    x = jnp.ones(3)
    for arg in (_Layer(jnp.ones(3)), _Layer(jnp.ones(3)).__call__):
        with pytest.raises(lift.LiftTypeError, match=r"_Layer.*holding JAX arrays"):
            apply(arg, x)
    assert scale(_Config(2.0), x).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "transform", [lift.jit, lift.vmap, lift.checkpoint], ids=["jit", "vmap", "ckpt"]
)
def test_a_non_pytree_output_holding_tracers_is_refused(transform):
    tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})

    def f(x):
        lift.set(tree["n"], lift.get(tree["n"]) + jnp.sum(x))
        return _Config(x * 2)

    with pytest.raises(lift.TraceError, match=r"_Config.*traced JAX values"):
        lift.stateful(transform(f))(state, jnp.ones(3))
