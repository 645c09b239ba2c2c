"""update_state, merge_states, filter_state and partition_state on state dicts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lift
from lift import (
    StateEntry,
    StateKey,
    export_state,
    filter_state,
    merge_states,
    partition_state,
    update_state,
)
from lift._keys import matches
from tests.corpus import CASES
from tests.strategies import Pair, filters, mutations, states


def model_state() -> dict[StateKey, object]:
    tree = {
        "layers": [
            {"bn": {"mean": StateEntry(jnp.zeros(2)), "var": StateEntry(jnp.ones(2))}},
            {"bn": {"mean": StateEntry(jnp.zeros(2)), "var": StateEntry(jnp.ones(2))}},
        ],
        "bn": {"mean": StateEntry(jnp.zeros(3))},
        "step": StateEntry(jnp.zeros((), "int32")),
        "ema": StateEntry(Pair(jnp.zeros(2), jnp.zeros(2))),
    }
    return export_state(tree)[1]


K = StateKey


# -------------------------------------------------------------------- update_state


def test_update_returns_a_new_dict_and_leaves_the_input_alone():
    state = model_state()
    before = dict(state)
    new_step = jnp.ones((), "int32")
    new = update_state(state, {K("['step']"): new_step})
    assert new is not state
    assert new[K("['step']")] is new_step
    assert state == before  # the same keys and value objects as before
    assert all(state[k] is before[k] for k in state)
    assert all(new[k] is state[k] for k in state if k != "['step']")


def test_update_unknown_key_names_the_closest_path():
    state = model_state()
    with pytest.raises(KeyError) as info:
        update_state(state, {K("['layers'][0]['bn']['maen']"): jnp.zeros(2)})
    assert isinstance(info.value, lift.LiftError)
    message = str(info.value)
    assert "['layers'][0]['bn']['maen']" in message
    assert "['layers'][0]['bn']['mean']" in message  # the closest existing path
    assert "merge_states" in message  # how to add a key instead


def test_update_shape_change_names_the_key_and_both_shapes():
    state = model_state()
    with pytest.raises(ValueError, match=r"\['bn'\]\['mean'\]") as info:
        update_state(state, {K("['bn']['mean']"): jnp.zeros(4)})
    assert isinstance(info.value, lift.LiftError)
    message = str(info.value)
    assert "float32[4]" in message
    assert "float32[3]" in message
    assert "reshape" in message


def test_update_dtype_change_names_the_key_and_both_dtypes():
    state = model_state()
    with pytest.raises(ValueError, match=r"\['step'\]") as info:
        update_state(state, {K("['step']"): jnp.zeros((), "float32")})
    message = str(info.value)
    assert "float32[]" in message
    assert "int32[]" in message
    assert ".astype(int32)" in message


def test_update_structure_change_names_the_key():
    state = model_state()
    with pytest.raises(ValueError, match=r"\['ema'\]") as info:
        update_state(state, {K("['ema']"): (jnp.zeros(2), jnp.zeros(2))})
    assert isinstance(info.value, lift.LiftError)
    assert "Pair" in str(info.value)
    assert "structure" in str(info.value)


@pytest.mark.parametrize("scalar", [1, 1.5, True])
def test_update_python_scalar_into_float32_is_cast(scalar):
    state = export_state({"x": StateEntry(jnp.zeros((), "float32"))})[1]
    new = update_state(state, {K("['x']"): scalar})
    value = new[K("['x']")]
    assert isinstance(value, jax.Array)
    assert value.dtype == jnp.float32
    assert not value.weak_type
    assert float(value) == float(scalar)


def test_update_python_int_into_int32_is_cast():
    state = export_state({"n": StateEntry(jnp.zeros((), "int32"))})[1]
    value = update_state(state, {K("['n']"): 3})[K("['n']")]
    assert isinstance(value, jax.Array)
    assert value.dtype == jnp.int32
    assert int(value) == 3


def test_update_python_float_into_bfloat16_is_cast_a_float32_array_refused():
    state = export_state({"x": StateEntry(jnp.zeros((), "bfloat16"))})[1]
    cast = update_state(state, {K("['x']"): 2.5})[K("['x']")]
    assert isinstance(cast, jax.Array)
    assert cast.dtype == jnp.bfloat16
    assert float(cast) == 2.5
    with pytest.raises(ValueError, match="bfloat16") as info:
        update_state(state, {K("['x']"): jnp.asarray(2.5, "float32")})
    assert "['x']" in str(info.value)


@pytest.mark.parametrize("scalar", [1.5, 2.0])
def test_update_python_float_into_int32_is_refused_not_truncated(scalar):
    # JAX would promote int32 with a Python float to float32: not a harmless cast.
    state = export_state({"n": StateEntry(jnp.zeros((), "int32"))})[1]
    with pytest.raises(ValueError, match=r"\['n'\]") as info:
        update_state(state, {K("['n']"): scalar})
    assert isinstance(info.value, lift.LiftError)
    assert "int32" in str(info.value)


def test_update_python_complex_into_float32_is_refused():
    state = export_state({"x": StateEntry(jnp.zeros((), "float32"))})[1]
    with pytest.raises(ValueError, match=r"\['x'\]") as info:
        update_state(state, {K("['x']"): 1.5j})
    assert isinstance(info.value, lift.LiftError)
    assert "float32" in str(info.value)


def test_update_scalar_into_a_vector_state_is_refused():
    state = export_state({"x": StateEntry(jnp.zeros(3))})[1]
    with pytest.raises(ValueError, match=r"\['x'\]"):
        update_state(state, {K("['x']"): 1.0})


def test_update_with_a_failing_value_leaves_the_input_alone():
    state = model_state()
    before = dict(state)
    with pytest.raises(ValueError, match="step"):
        update_state(
            state, {K("['bn']['mean']"): jnp.ones(3), K("['step']"): jnp.ones(2)}
        )
    assert state.keys() == before.keys()
    assert all(state[k] is before[k] for k in state)


# ---------------------------------------- values keep their type: set and update_state


def _by_update(state, key, value):
    return update_state(state, {key: value})


def _by_set(state, key, value):
    return lift.stateful(lambda: lift.set(key, value))(state)[1]


WRITERS = pytest.mark.parametrize("write", [_by_update, _by_set], ids=["update", "set"])


def _one(dtype: str = "float32", shape: tuple[int, ...] = (3,)):
    tree, state = export_state({"x": StateEntry(jnp.zeros(shape, dtype))})
    return tree["x"], state


@WRITERS
def test_numpy_float64_into_float32_state_is_cast_when_exact(write):
    key, state = _one()
    value = write(state, key, np.ones(3))[key]
    assert value.dtype == np.float32  # never float64
    np.testing.assert_array_equal(np.asarray(value), np.ones(3, np.float32))


@WRITERS
def test_numpy_float64_that_float32_cannot_hold_is_refused(write):
    key, state = _one()
    with pytest.raises(lift.LiftValueError, match=r"\['x'\]") as info:
        write(state, key, np.full(3, 0.1))  # 0.1 is not a float32
    assert "float32" in str(info.value)
    assert "astype" in str(info.value)


@WRITERS
def test_numpy_int64_into_int32_state_is_cast_in_range_refused_out_of_it(write):
    key, state = _one("int32")
    value = write(state, key, np.array([1, -2, 3]))[key]
    assert value.dtype == np.int32
    assert np.asarray(value).tolist() == [1, -2, 3]
    with pytest.raises(lift.LiftValueError, match=r"\['x'\]"):
        write(state, key, np.array([1, 2**40, 3]))


@WRITERS
@pytest.mark.parametrize(
    ("dtype", "number"),
    [("int8", 300), ("int8", -129), ("uint8", -1), ("int32", 2**40)],
)
def test_python_int_out_of_range_is_refused_not_wrapped(write, dtype, number):
    key, state = _one(dtype, ())
    with pytest.raises(lift.LiftValueError, match=r"\['x'\]") as info:
        write(state, key, number)
    assert dtype in str(info.value)
    assert str(number) in str(info.value)


@WRITERS
def test_python_int_in_range_is_cast_to_the_exact_dtype(write):
    key, state = _one("int8", ())
    value = write(state, key, -128)[key]
    assert value.dtype == jnp.int8
    assert int(value) == -128


@WRITERS
def test_python_float_that_would_overflow_is_refused(write):
    key, state = _one("float32", ())
    with pytest.raises(lift.LiftValueError, match=r"\['x'\]"):
        write(state, key, 1e300)
    assert float(write(state, key, float("inf"))[key]) == float("inf")
    assert write(state, key, 0.1)[key].dtype == jnp.float32  # rounding is fine


@WRITERS
def test_weak_array_out_of_range_is_refused(write):
    key, state = _one("int8", ())
    with pytest.raises(lift.LiftValueError, match=r"\['x'\]"):
        write(state, key, jnp.asarray(300))  # weakly typed int32


@WRITERS
@pytest.mark.parametrize(
    "value",
    [
        "abc",
        b"abc",
        object(),
        np.array([1, None, 2], dtype=object),
        np.array(["a", "b", "c"]),
        jax.ShapeDtypeStruct((3,), jnp.float32),
    ],
    ids=["str", "bytes", "object", "object-array", "str-array", "shape-dtype-struct"],
)
def test_non_arrays_are_refused_naming_the_key(write, value):
    key, state = _one()
    with pytest.raises(lift.LiftTypeError, match=r"\['x'\]"):
        write(state, key, value)


@WRITERS
def test_a_tracer_of_a_finished_transform_is_refused(write):
    key, state = _one()
    leaked = []
    jax.jit(lambda x: leaked.append(x) or x)(jnp.ones(3))
    with pytest.raises(lift.TraceError, match=r"\['x'\]"):
        write(state, key, leaked[0])


@WRITERS
def test_prng_key_state_takes_new_keys_and_refuses_raw_key_data(write):
    tree, state = export_state({"rng": StateEntry(jax.random.key(0))})
    key = tree["rng"]
    new_key = jax.random.split(state[key])[0]
    stored = write(state, key, new_key)[key]
    assert stored is new_key
    with pytest.raises(lift.LiftValueError, match=r"\['rng'\]"):
        write(state, key, jax.random.key_data(new_key))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(width=32, allow_nan=False),  # exact in float32
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        min_size=3,
        max_size=3,
    )
)
def test_property_numpy_float64_is_stored_exactly_or_refused(values):
    key, state = _one()
    value = np.array(values, np.float64)
    with np.errstate(over="ignore"):
        exact = np.array_equal(value.astype(np.float32).astype(np.float64), value)
    for write in (_by_update, _by_set):
        if exact:
            stored = write(state, key, value)[key]
            assert stored.dtype == np.float32
            assert np.array_equal(np.asarray(stored, np.float64), value)
        else:
            with pytest.raises(lift.LiftValueError, match=r"\['x'\]"):
                write(state, key, value)


def test_a_live_tracer_is_accepted_under_jit():
    key, state = _one()
    new = jax.jit(lambda s, v: update_state(s, {key: v}))(state, jnp.ones(3))
    assert new[key].dtype == jnp.float32
    assert new[key].tolist() == [1.0, 1.0, 1.0]


def test_an_array_of_the_same_dtype_and_shape_is_stored_as_it_is():
    key, state = _one()
    value = jnp.ones(3)
    assert update_state(state, {key: value})[key] is value
    assert _by_set(state, key, value)[key] is value


@pytest.mark.parametrize(
    "value",
    [np.ones(3), np.ones(3, np.float32), jnp.ones(3), 2.0, 2, True, jnp.asarray(2.0)],
    ids=["f64", "np-f32", "jax", "float", "int", "bool", "weak"],
)
def test_set_and_update_state_store_the_same_thing(value):
    key, state = _one("float32", () if np.ndim(value) == 0 else (3,))
    by_update = update_state(state, {key: value})[key]
    by_set = _by_set(state, key, value)[key]
    assert type(by_update) is type(by_set)
    assert by_update.dtype == by_set.dtype == jnp.float32
    assert not getattr(by_update, "weak_type", False)
    np.testing.assert_array_equal(np.asarray(by_update), np.asarray(by_set))


def test_save_and_load_like_the_original_after_setting_a_numpy_float64(tmp_path):
    tree, state = export_state({"w": StateEntry(jnp.zeros(3))})
    _, new = lift.stateful(lambda t: lift.set(t["w"], np.ones(3)))(state, tree)
    path = tmp_path / "state.lift"
    lift.save_state(path, new)
    loaded = lift.load_state(path, like=state)
    assert loaded[tree["w"]].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(loaded[tree["w"]]), np.ones(3))


@settings(max_examples=40, deadline=None)
@given(states().flatmap(lambda s: st.tuples(st.just(s), mutations(s))))
def test_property_update_state_is_pure(drawn):
    state, mutation = drawn
    before = dict(state)
    new = update_state(state, mutation)
    assert state.keys() == before.keys()
    assert all(state[k] is before[k] for k in state)
    assert new.keys() == state.keys()
    for key in state:
        if key in mutation:
            assert new[key] is mutation[key]
        else:
            assert new[key] is state[key]


@settings(max_examples=40, deadline=None)
@given(states(), st.data())
def test_property_update_refuses_a_shape_change(state, data):
    keys = [k for k in state if jax.tree_util.tree_leaves(state[k])]
    if not keys:
        return
    key = data.draw(st.sampled_from(sorted(keys)))
    grown = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state[key])
    before = dict(state)
    with pytest.raises(ValueError, match="reshape") as info:
        update_state(state, {key: grown})
    assert repr(str(key)) in str(info.value)
    assert all(state[k] is before[k] for k in state)


# -------------------------------------------------------------------- merge_states


def test_merge_collision_raises_and_overwrites_nothing():
    a = {K("['x']"): jnp.zeros(1)}
    b = {K("['x']"): jnp.ones(1), K("['y']"): jnp.ones(1)}
    before_a, before_b = dict(a), dict(b)
    with pytest.raises(ValueError, match=r"\['x'\]") as info:
        merge_states(a, b)
    assert isinstance(info.value, lift.LiftError)
    assert "prefix=" in str(info.value)
    assert a == before_a
    assert b == before_b


def test_merge_of_disjoint_states_keeps_the_value_objects():
    a = {K("a"): jnp.zeros(1)}
    b = {K("b"): jnp.ones(1)}
    merged = merge_states(a, b)
    assert merged[K("a")] is a[K("a")]
    assert merged[K("b")] is b[K("b")]
    assert merge_states() == {}
    assert merge_states(a) == a
    assert merge_states(a) is not a


def test_merge_refuses_a_non_dict():
    with pytest.raises(TypeError, match="argument 1") as info:
        merge_states({}, [1, 2])  # type: ignore[arg-type]
    assert isinstance(info.value, lift.LiftError)


# --------------------------------------------------------- filter and partition


def test_filter_by_glob_anywhere():
    # `*` matches the empty string too, so `*.bn.*` finds `bn` at any depth.
    state = model_state()
    assert sorted(filter_state(state, "*.bn.*")) == [
        "['bn']['mean']",
        "['layers'][0]['bn']['mean']",
        "['layers'][0]['bn']['var']",
        "['layers'][1]['bn']['mean']",
        "['layers'][1]['bn']['var']",
    ]


def test_filter_by_glob_at_the_root():
    state = model_state()
    assert sorted(filter_state(state, "bn.*")) == ["['bn']['mean']"]
    assert sorted(filter_state(state, "layers.1.*")) == [
        "['layers'][1]['bn']['mean']",
        "['layers'][1]['bn']['var']",
    ]
    assert sorted(filter_state(state, "*mean")) == [
        "['bn']['mean']",
        "['layers'][0]['bn']['mean']",
        "['layers'][1]['bn']['mean']",
    ]


def test_filter_by_glob_on_attribute_paths():
    _, state = export_state(CASES["equinox_model"].build())
    assert sorted(filter_state(state, "*.bn.*")) == [
        ".layers[0].bn.mean",
        ".layers[0].bn.var",
        ".layers[1].bn.mean",
        ".layers[1].bn.var",
    ]
    assert list(filter_state(state, "step")) == [".step"]
    assert list(filter_state(state, ".step")) == [".step"]


def test_filter_by_state_key_matches_exactly_that_key():
    state = model_state()
    key = K("['layers'][0]['bn']['mean']")
    assert list(filter_state(state, key)) == [key]
    # A StateKey is exact, not a glob, even when it looks like one.
    odd = {K("*"): 1, K("a"): 2}
    assert list(filter_state(odd, K("*"))) == ["*"]
    assert sorted(filter_state(odd, "*")) == ["*", "a"]


def test_filter_by_type_of_the_value():
    state = model_state()
    assert list(filter_state(state, Pair)) == ["['ema']"]
    assert len(filter_state(state, jax.Array)) == len(state) - 1


def test_filter_by_predicate():
    state = model_state()
    picked = filter_state(state, lambda k, v: getattr(v, "ndim", None) == 0)
    assert list(picked) == ["['step']"]


def test_filter_with_several_filters_is_their_union():
    state = model_state()
    both = filter_state(state, "bn.*", K("['step']"))
    assert sorted(both) == ["['bn']['mean']", "['step']"]
    assert all(both[k] is state[k] for k in both)


def test_bad_filter_is_a_type_error():
    with pytest.raises(TypeError, match="pattern") as info:
        filter_state(model_state(), 3)  # type: ignore[arg-type]
    assert isinstance(info.value, lift.LiftError)


def test_partition_goes_to_the_first_matching_filter():
    state = model_state()
    layer0, bn, rest = partition_state(state, "layers.0.*", "*bn*")
    assert sorted(layer0) == [
        "['layers'][0]['bn']['mean']",
        "['layers'][0]['bn']['var']",
    ]
    assert sorted(bn) == [
        "['bn']['mean']",
        "['layers'][1]['bn']['mean']",
        "['layers'][1]['bn']['var']",
    ]
    assert sorted(rest) == ["['ema']", "['step']"]
    assert merge_states(layer0, bn, rest) == state


def test_partition_without_filters_is_everything_in_the_rest():
    state = model_state()
    (rest,) = partition_state(state)
    assert rest == state
    assert rest is not state


def test_glob_matching_raw_and_dotted_forms():
    assert matches(".layers[0].bn.mean", "*.bn.*")
    assert matches("['bn']['var']", "bn.*")
    assert matches("['bn']['var']", "['bn']['var']")
    assert not matches("['bnx']['var']", "bn.*")
    assert matches("[\"it's\"]['x']", "it's.x")


@settings(max_examples=50, deadline=None)
@given(
    states().flatmap(lambda s: st.tuples(st.just(s), st.lists(filters(s), max_size=3)))
)
def test_property_partition_then_merge_is_the_identity(drawn):
    state, fs = drawn
    parts = partition_state(state, *fs)
    assert len(parts) == len(fs) + 1
    merged = merge_states(*parts)  # disjoint: never raises
    assert merged.keys() == state.keys()
    assert all(merged[k] is state[k] for k in state)


@settings(max_examples=50, deadline=None)
@given(
    states().flatmap(lambda s: st.tuples(st.just(s), st.lists(filters(s), max_size=3)))
)
def test_property_partition_laws(drawn):
    state, fs = drawn
    parts = partition_state(state, *fs)
    only = [filter_state(state, f) for f in fs]
    for i, part in enumerate(parts[:-1]):
        # Part i: what filter i matches, minus what an earlier filter took.
        earlier = set().union(*(only[j] for j in range(i)))
        assert part.keys() == only[i].keys() - earlier
    assert parts[-1].keys() == state.keys() - set(filter_state(state, *fs))
    assert filter_state(state, *fs).keys() == set().union(*(p for p in parts[:-1]))
    if fs:
        assert filter_state(state, fs[0]) == parts[0]


@settings(max_examples=40, deadline=None)
@given(states(prefix="a"), states(prefix="b"))
def test_property_merge_of_prefixed_states_never_collides(a, b):
    merged = merge_states(a, b)
    assert len(merged) == len(a) + len(b)
    assert filter_state(merged, lambda k, v: k in a) == a


def test_an_eager_stateful_call_with_consumed_state_names_the_keys():
    # JAX's bare "Array has been deleted" named no key and no fix.
    model, state = export_state(
        {"a": StateEntry(jnp.zeros(3)), "b": {"c": StateEntry(jnp.ones(2))}}
    )

    def f(x):
        lift.set(model["a"], lift.get(model["a"]) + x)
        return x

    # JAX's own error depends on whether the primitive was compiled before (a
    # ValueError "Buffer has been deleted or donated") or not ("Array has been
    # deleted"); an add of this shape is compiled here, as in any real program.
    _ = jnp.zeros(3) + 1.0
    _, new = lift.jit(lift.stateful(f), donate_state=True)(state, 1.0)
    with pytest.raises(lift.LiftValueError) as info:
        lift.stateful(f)(state, 1.0)
    message = str(info.value)
    assert message.startswith("`stateful(")
    assert "consumed" in message
    assert "deleted buffers at \"['a']\", \"['b']['c']\"" in message
    assert "Pass the state that donating step returned" in message
    assert isinstance(info.value.__cause__, (RuntimeError, ValueError))
    _, again = lift.stateful(f)(new, 1.0)
    assert again[model["a"]].tolist() == [2.0, 2.0, 2.0]


def test_an_eager_runtime_error_with_intact_state_is_not_rewritten(monkeypatch):
    import lift._refs
    import lift._tracing

    # As in a process where no raw loop or raw jit ever retired a reference (an
    # earlier test may have): then nothing suggests a stale reference either.
    monkeypatch.setattr(lift._tracing, "RETIRED", [False])
    monkeypatch.setattr(lift._refs, "RETIRED", lift._tracing.RETIRED)
    _, state = export_state({"a": StateEntry(jnp.zeros(3))})

    def f():
        raise RuntimeError("Array has been deleted elsewhere")

    with pytest.raises(RuntimeError, match="deleted elsewhere") as info:
        lift.stateful(f)(state)
    assert not isinstance(info.value, lift.LiftError)


def test_a_lossless_numpy_cast_keeps_the_state_a_jax_array():
    tree, state = lift.export_state({"f": lift.StateEntry(jnp.zeros(3))})
    new = lift.update_state(state, {tree["f"]: np.arange(3.0)})  # float64 numpy
    assert isinstance(new[tree["f"]], jax.Array)
    assert new[tree["f"]].dtype == jnp.float32


def test_a_key_of_another_implementation_is_refused_without_an_astype_hint():
    tree, state = lift.export_state({"rng": lift.StateEntry(jax.random.key(0))})
    other = jax.random.key(1, impl="rbg")
    with pytest.raises(lift.LiftValueError, match="wrap_key_data") as info:
        lift.update_state(state, {tree["rng"]: other})
    assert ".astype(key" not in str(info.value)
