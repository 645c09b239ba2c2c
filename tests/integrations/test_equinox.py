"""lift.equinox: Equinox models under lift give Equinox's numbers, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import lift  # noqa: E402
import lift.equinox as le  # noqa: E402
from tests.integrations.parity import assert_same  # noqa: E402

STEPS = 3
BATCH = 4


# ------------------------------------------------------------------ the layers


class Counter(eqx.Module):
    """Equinox's custom stateful layer example: adds how often it was called."""

    index: eqx.nn.StateIndex

    def __init__(self) -> None:
        self.index = eqx.nn.StateIndex(jnp.array(0.0))

    def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        value = state.get(self.index)
        return x + value, state.set(self.index, value + 1)


class VmappedCounters(eqx.Module):
    """Equinox's vmapped-stateful-layers example, verbatim in spirit."""

    linear: eqx.nn.Linear
    counter: Counter
    v_counter: Counter

    def __init__(self, key: jax.Array) -> None:
        self.linear = eqx.nn.Linear(2, 2, key=key)
        self.counter = Counter()
        self.v_counter = eqx.filter_vmap(Counter, axis_size=2)()

    def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        x = self.linear(x)
        x, state = self.counter(x, state)
        substate = state.substate(self.v_counter)
        x, substate = eqx.filter_vmap(self.v_counter)(x, substate)
        return x, state.update(substate)


@dataclass
class Case:
    """A model, its Equinox state, an input batch, and whether it needs ``vmap``."""

    name: str
    make: Callable[[], tuple[Any, Any]]
    features: int
    needs_batch: bool


def _spectral() -> tuple[Any, Any]:
    linear = eqx.nn.Linear(3, 3, key=jax.random.key(0))
    return eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        linear, "weight", key=jax.random.key(1)
    )


CASES = [
    Case(
        "bn_ema",
        lambda: eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, "batch", mode="ema", momentum=0.9
        ),
        3,
        True,
    ),
    Case(
        "bn_batch",
        lambda: eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, "batch", mode="batch", momentum=0.9
        ),
        3,
        True,
    ),
    Case("spectral_norm", _spectral, 3, False),
    Case("counter", lambda: eqx.nn.make_with_state(Counter)(), 3, False),
    Case(
        "vmapped_counters",
        lambda: eqx.nn.make_with_state(VmappedCounters)(jax.random.key(2)),
        2,
        False,
    ),
]


def batches(case: Case, steps: int = STEPS) -> jax.Array:
    return jax.random.normal(jax.random.key(7), (steps, BATCH, case.features))


def lifted_values(tree: Any, eqx_state: Any) -> dict:
    """The values of an ``eqx.nn.State`` under the lift keys of ``tree``."""
    return {key: eqx_state.get(index) for index, key in _indices_with_keys(tree)}


def _indices_with_keys(tree: Any) -> list[tuple[Any, lift.StateKey]]:
    seen, out = set(), []
    model = eqx.nn.delete_init_state(tree)
    original = jax.tree_util.tree_leaves(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    )
    converted = jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    )
    for plain, conv in zip(original, converted, strict=True):
        if isinstance(conv, eqx.nn.StateIndex) and conv.marker not in seen:
            seen.add(conv.marker)
            out.append((plain, conv.init))
    return out


# --------------------------------------------------------------- parity per mode

MODES = ["stateful", "jit", "vmap", "scan"]


def run_equinox(case: Case, mode: str, model: Any, state: Any, xs: jax.Array):
    """Equinox's own way: returns the outputs of each step and the final state."""
    batched = case.needs_batch or mode in ("vmap", "scan")

    def call(model: Any, x: jax.Array, state: Any) -> Any:
        if batched:
            model = jax.vmap(
                model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )
        return model(x, state)

    if mode == "scan":

        @eqx.filter_jit
        def loop(model: Any, state: Any, xs: jax.Array) -> Any:
            def body(state: Any, x: jax.Array) -> Any:
                y, state = call(model, x, state)
                return state, y

            return lax.scan(body, state, xs)

        state, ys = loop(model, state, xs)
        return ys, state
    step = eqx.filter_jit(call) if mode in ("jit", "vmap") else call
    ys = []
    for x in xs:
        y, state = step(model, x if batched else x[0], state)
        ys.append(y)
    return jnp.stack(ys), state


def run_lift(case: Case, mode: str, tree: Any, state: dict, xs: jax.Array):
    """The same steps through lift: ``lower`` and lift's transforms."""
    batched = case.needs_batch or mode in ("vmap", "scan")
    model = le.lower(tree)
    call = lift.vmap(model, axis_name="batch") if batched else model
    if mode == "scan":

        def loop(xs: jax.Array) -> Any:
            return lift.scan(lambda c, x: (c, call(x)), None, xs)[1]

        return lift.jit(lift.stateful(loop))(state, xs)
    step = lift.stateful(call)
    if mode in ("jit", "vmap"):
        step = lift.jit(step)
    ys = []
    for x in xs:
        y, state = step(state, x if batched else x[0])
        ys.append(y)
    return jnp.stack(ys), state


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parity_with_equinox(case: Case, mode: str) -> None:
    model, eqx_state = case.make()
    tree, state = le.from_equinox(model, eqx_state)
    # Read the Equinox state before it is used: a call invalidates it.
    assert_same(state, lifted_values(tree, eqx_state))
    xs = batches(case)

    ys_eqx, eqx_state = run_equinox(case, mode, model, eqx_state, xs)
    ys_lift, state = run_lift(case, mode, tree, state, xs)

    assert_same(ys_lift, ys_eqx)
    assert_same(state, lifted_values(tree, eqx_state))
    back_model, back_state = le.to_equinox(tree, state)
    assert_same(back_state, eqx_state)
    assert bool(eqx.tree_equal(back_model, model))


# ------------------------------------------------------------------- training


class Net(eqx.Module):
    """A small MLP with BatchNorm, trained with gradients under both APIs."""

    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    l2: eqx.nn.Linear

    def __init__(self, key: jax.Array, mode: str) -> None:
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(4, 8, key=k1)
        self.bn = eqx.nn.BatchNorm(8, "batch", mode=mode, momentum=0.9)
        self.l2 = eqx.nn.Linear(8, 1, key=k2)

    def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        x, state = self.bn(jax.nn.relu(self.l1(x)), state)
        return self.l2(x)[0], state


def _sgd(model: Any, grads: Any) -> Any:
    return eqx.apply_updates(model, jax.tree_util.tree_map(lambda g: -0.1 * g, grads))


@pytest.mark.parametrize("bn_mode", ["ema", "batch"])
def test_training_steps_match_equinox(bn_mode: str) -> None:
    model, eqx_state = eqx.nn.make_with_state(Net)(jax.random.key(0), bn_mode)
    tree, state = le.from_equinox(model, eqx_state)
    xs = jax.random.normal(jax.random.key(1), (STEPS, 16, 4))
    ts = jnp.sum(xs, axis=-1)

    @eqx.filter_jit
    def eqx_step(model: Any, state: Any, x: jax.Array, t: jax.Array) -> Any:
        def loss(model: Any, state: Any) -> Any:
            batched = jax.vmap(
                model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )
            y, state = batched(x, state)
            return jnp.mean((y - t) ** 2), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            model, state
        )
        return _sgd(model, grads), state, value

    @lift.jit
    @lift.stateful
    def lift_step(tree: Any, x: jax.Array, t: jax.Array) -> Any:
        def loss(tree: Any) -> Any:
            y = lift.vmap(le.lower(tree), axis_name="batch")(x)
            return jnp.mean((y - t) ** 2)

        value, grads = lift.value_and_grad(loss)(tree)
        return _sgd(tree, grads), value

    for x, t in zip(xs, ts, strict=True):
        model, eqx_state, value_eqx = eqx_step(model, eqx_state, x, t)
        (tree, value_lift), state = lift_step(state, tree, x, t)
        assert_same(value_lift, value_eqx)
        assert_same(state, lifted_values(tree, eqx_state))
        assert_same(
            eqx.filter(tree, eqx.is_array),
            eqx.filter(le.from_equinox(model, eqx_state)[0], eqx.is_array),
        )


# -------------------------------------------------------------------- ensembles


def test_filter_vmap_ensemble_state_is_mapped_by_lift_vmap() -> None:
    def make(key: jax.Array) -> Any:
        return eqx.nn.make_with_state(VmappedCounters)(key)

    models, eqx_states = eqx.filter_vmap(make)(jax.random.split(jax.random.key(0), 3))
    trees, state = le.from_equinox(models, eqx_states)
    assert {k: v.shape for k, v in state.items()} == {
        lift.StateKey(".counter.index"): (3,),
        lift.StateKey(".v_counter.index"): (3, 2),
    }
    xs = jax.random.normal(jax.random.key(1), (3, 2))

    ys_eqx, eqx_states = eqx.filter_vmap(lambda m, s, x: m(x, s))(
        models, eqx_states, xs
    )
    # No state_axes: the keys inside the mapped `trees` say that their state is mapped.
    apply = lift.vmap(lambda m, x: le.lower(m)(x))
    ys_lift, state = lift.jit(lift.stateful(apply))(state, trees, xs)

    assert_same(ys_lift, ys_eqx)
    assert_same(le.to_equinox(trees, state)[1], eqx_states)
    np.testing.assert_array_equal(
        state[lift.StateKey(".v_counter.index")], np.ones((3, 2))
    )


# ---------------------------------------------------------------- conversions


def test_batchnorm_over_devices_and_batch_matches_jax_pmap() -> None:
    # Statistics over the device axis and the vmapped axis together (issue 14). Only
    # `mode="batch"`: in `mode="ema"` Equinox's own `jax.pmap` run fails (its
    # `state.set` refuses the device-varying `first_time` flag), so there is nothing
    # to compare with.
    make = eqx.nn.make_with_state(eqx.nn.BatchNorm)
    bn, eqx_state = make(3, ("dev", "batch"), mode="batch", momentum=0.9)
    tree, state = le.from_equinox(bn, eqx_state)
    xs = jax.random.normal(jax.random.key(1), (STEPS, 2, BATCH, 3))

    per_device = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    eqx_step = jax.pmap(
        per_device, axis_name="dev", in_axes=(0, None), out_axes=(0, None)
    )
    lift_step = lift.stateful(
        lift.pmap(lift.vmap(le.lower(tree), axis_name="batch"), "dev")
    )
    for x in xs:
        y_eqx, eqx_state = eqx_step(x, eqx_state)
        y_lift, state = lift_step(state, x)
        assert_same(y_lift, y_eqx)
        assert_same(state, lifted_values(tree, eqx_state))


def test_keys_are_the_index_paths() -> None:
    model, eqx_state = eqx.nn.make_with_state(Net)(jax.random.key(0), "ema")
    tree, state = le.from_equinox(model, eqx_state)
    assert sorted(state) == [
        lift.StateKey(".bn.ema_first_time_index"),
        lift.StateKey(".bn.ema_state_index"),
    ]
    assert tree.bn.ema_state_index.init == ".bn.ema_state_index"
    # Markers are kept, so the model's own code indexes the state as before.
    assert tree.bn.ema_state_index.marker == model.bn.ema_state_index.marker
    prefixed, pstate = le.from_equinox(model, eqx_state, prefix="net")
    assert sorted(pstate) == [
        lift.StateKey("net.bn.ema_first_time_index"),
        lift.StateKey("net.bn.ema_state_index"),
    ]
    assert prefixed.bn.ema_state_index.init in pstate


def test_same_model_built_twice_gives_equal_keys() -> None:
    a = le.from_equinox(*eqx.nn.make_with_state(Net)(jax.random.key(0), "batch"))[1]
    b = le.from_equinox(*eqx.nn.make_with_state(Net)(jax.random.key(1), "batch"))[1]
    assert list(a) == list(b)


def test_round_trip_make_with_state_is_exact() -> None:
    model, eqx_state = eqx.nn.make_with_state(VmappedCounters)(jax.random.key(0))
    expected = jax.tree_util.tree_leaves(eqx_state)
    back_model, back_state = le.to_equinox(*le.from_equinox(model, eqx_state))
    assert bool(eqx.tree_equal(back_model, model))
    assert jax.tree_util.tree_structure(back_state) == jax.tree_util.tree_structure(
        eqx_state
    )
    # The values are the very same arrays.
    leaves = jax.tree_util.tree_leaves(back_state)
    assert all(a is b for a, b in zip(leaves, expected, strict=True))
    # The Equinox model runs on the converted-back state.
    y, _ = back_model(jnp.ones(2), back_state)
    assert y.shape == (2,)


def test_state_built_with_eqx_state_and_deleted_init() -> None:
    with_init = VmappedCounters(jax.random.key(0))
    eqx_state = eqx.nn.State(with_init)
    model = eqx.nn.delete_init_state(with_init)
    tree, state = le.from_equinox(model, eqx_state)
    assert sorted(state) == [
        lift.StateKey(".counter.index"),
        lift.StateKey(".v_counter.index"),
    ]
    y_lift, state = lift.stateful(le.lower(tree))(state, jnp.ones(2))
    y_eqx, eqx_state = model(jnp.ones(2), eqx_state)
    assert_same(y_lift, y_eqx)
    back_model, back_state = le.to_equinox(tree, state)
    assert bool(eqx.tree_equal(back_model, model))
    assert_same(back_state, eqx_state)


def test_model_holding_initial_values_without_state() -> None:
    with_init = VmappedCounters(jax.random.key(0))
    tree, state = le.from_equinox(with_init)
    assert_same(state[lift.StateKey(".v_counter.index")], jnp.zeros(2))
    # The initial copies are dropped, as `make_with_state` drops them.
    model, eqx_state = le.to_equinox(tree, state)
    assert bool(eqx.tree_equal(model, eqx.nn.delete_init_state(with_init)))
    assert_same(eqx_state, eqx.nn.State(with_init))


def test_shared_index_is_one_key() -> None:
    counter = Counter()
    shared = {"a": counter, "b": counter}
    tree, state = le.from_equinox(shared, eqx.nn.State(shared))
    assert list(state) == [lift.StateKey("['a'].index")]
    assert tree["b"].index.init == "['a'].index"

    def twice(x: jax.Array) -> jax.Array:
        return le.lower(tree["b"])(le.lower(tree["a"])(x))

    y, state = lift.stateful(twice)(state, jnp.zeros(()))
    assert float(y) == 1.0
    assert float(state[lift.StateKey("['a'].index")]) == 2.0


def test_inference_mode_reads_only() -> None:
    model, eqx_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", mode="batch"
    )
    tree, state = le.from_equinox(model, eqx_state)
    frozen = eqx.nn.inference_mode(tree)
    x = jnp.ones((2, 3))
    run = lift.stateful(lift.vmap(le.lower(frozen), axis_name="batch"), mutable=False)
    # An immutable frame: any write would raise.
    y, new = run(state, x)
    assert_same(new, state)
    y_eqx, _ = jax.vmap(
        eqx.nn.inference_mode(model),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )(x, eqx_state)
    assert_same(y, y_eqx)


# ------------------------------------------------------------------------ errors


def test_used_state_is_refused() -> None:
    model, eqx_state = eqx.nn.make_with_state(Counter)()
    model(jnp.zeros(()), eqx_state)
    with pytest.raises(lift.LiftError, match="already used"):
        le.from_equinox(model, eqx_state)


def test_state_of_another_model_is_refused() -> None:
    model, _ = eqx.nn.make_with_state(Counter)()
    _, other = eqx.nn.make_with_state(VmappedCounters)(jax.random.key(0))
    with pytest.raises(KeyError, match=r"'\.index' has no value"):
        le.from_equinox(model, other)
    big, big_state = eqx.nn.make_with_state(VmappedCounters)(jax.random.key(0))
    with pytest.raises(ValueError, match="not in the model"):
        le.from_equinox(big.counter, big_state)


def test_not_a_state_is_refused() -> None:
    model, _ = eqx.nn.make_with_state(Counter)()
    with pytest.raises(TypeError, match=r"takes an `eqx\.nn\.State`; got dict"):
        le.from_equinox(model, {})


def test_deleted_init_without_state_is_refused() -> None:
    model, _ = eqx.nn.make_with_state(Counter)()
    with pytest.raises(ValueError, match=r"Pass the `eqx\.nn\.State` too"):
        le.from_equinox(model)


def test_converting_twice_is_refused() -> None:
    tree, state = le.from_equinox(*eqx.nn.make_with_state(Counter)())
    with pytest.raises(ValueError, match="converted already"):
        le.from_equinox(tree)
    with pytest.raises(ValueError, match="converted already"):
        le.from_equinox(tree, le.to_equinox(tree, state)[1])


def test_unconverted_model_cannot_be_lowered() -> None:
    model, _ = eqx.nn.make_with_state(Counter)()
    with pytest.raises(ValueError, match=r"at '\.index' was not converted"):
        le.lower(model)


def test_to_equinox_checks_keys() -> None:
    tree, state = le.from_equinox(*eqx.nn.make_with_state(Counter)())
    with pytest.raises(KeyError, match="closest existing path"):
        le.to_equinox(tree, {lift.StateKey(".indx"): jnp.zeros(())})
    extra = {**state, lift.StateKey(".other"): jnp.zeros(())}
    with pytest.raises(ValueError, match=r"'\.other'"):
        le.to_equinox(tree, extra)
    _, back = le.to_equinox(tree, extra, strict=False)
    assert_same(back.get(eqx.nn.delete_init_state(tree).index), state[tree.index.init])


def test_lowered_model_must_return_its_state() -> None:
    class Forgets(eqx.Module):
        counter: Counter

        def __call__(self, x: jax.Array, state: Any) -> jax.Array:
            return self.counter(x, state)[0]

    tree, state = le.from_equinox(*eqx.nn.make_with_state(Forgets)(Counter()))
    with pytest.raises(ValueError, match=r"must return `\(output, state\)`"):
        lift.stateful(le.lower(tree))(state, jnp.zeros(()))


def test_lowered_write_is_checked() -> None:
    class Grows(eqx.Module):
        index: eqx.nn.StateIndex

        def __init__(self) -> None:
            self.index = eqx.nn.StateIndex(jnp.zeros(2))

        def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
            # Equinox's own `set` checks shapes; a bypass via `update` does not.
            sub = eqx.nn.State.tree_unflatten((self.index.marker,), (jnp.zeros(3),))
            return x, state.update(sub)

    tree, state = le.from_equinox(*eqx.nn.make_with_state(Grows)())
    with pytest.raises(ValueError, match=r"'\.index'"):
        lift.stateful(le.lower(tree))(state, jnp.zeros(()))


def test_lowered_outside_a_frame_is_refused() -> None:
    tree, _ = le.from_equinox(*eqx.nn.make_with_state(Counter)())
    with pytest.raises(lift.FrameError):
        le.lower(tree)(jnp.zeros(()))
