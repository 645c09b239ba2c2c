"""lift.haiku: Haiku's transformed functions under lift give Haiku's numbers."""

from __future__ import annotations

from typing import Any

import pytest

hk = pytest.importorskip("haiku")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import lift  # noqa: E402
import lift.haiku as lh  # noqa: E402
from tests.integrations.parity import assert_same  # noqa: E402

pytestmark = pytest.mark.usefixtures("standard_promotion")
STEPS = 3


def net(x: jax.Array, is_training: bool) -> jax.Array:
    x = hk.Linear(8)(x)
    x = hk.BatchNorm(True, True, decay_rate=0.9)(x, is_training=is_training)
    counter = hk.get_state("calls", (), jnp.int32, init=jnp.zeros)
    hk.set_state("calls", counter + 1)
    return hk.Linear(1)(jax.nn.relu(x))[..., 0]


def setup() -> tuple[Any, Any, Any, jax.Array, jax.Array]:
    f = hk.transform_with_state(net)
    xs = jax.random.normal(jax.random.key(7), (STEPS, 16, 4))
    params, hk_state = f.init(jax.random.key(0), xs[0], True)
    return f, params, hk_state, xs, jnp.sum(xs, axis=-1)


def test_keys_are_module_and_name() -> None:
    _, _, hk_state, _, _ = setup()
    state = lh.from_haiku(hk_state)
    assert lift.StateKey("['~']['calls']") in state
    assert lift.StateKey("['batch_norm/~/mean_ema']['average']") in state
    assert all(
        state[lift.StateKey(f"[{m!r}][{n!r}]")] is v
        for m, inner in hk_state.items()
        for n, v in inner.items()
    )
    assert lift.StateKey("net['~']['calls']") in lh.from_haiku(hk_state, prefix="net")


def test_round_trip() -> None:
    _, _, hk_state, _, _ = setup()
    back = lh.to_haiku(lh.from_haiku(hk_state), hk_state)
    assert back.keys() == hk_state.keys()
    assert all(
        back[m][n] is v for m, inner in hk_state.items() for n, v in inner.items()
    )


def test_training_steps_match_haiku_jit() -> None:
    f, params, hk_state, xs, ts = setup()
    state = lh.from_haiku(hk_state)
    lift_params = params

    @jax.jit
    def hk_step(params: Any, hk_state: Any, x: jax.Array, t: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            y, new = f.apply(params, hk_state, None, x, True)
            return jnp.mean((y - t) ** 2), new

        (loss, hk_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
        return params, hk_state, loss

    apply = lh.lower(f.apply, hk_state)

    @lift.jit
    @lift.stateful
    def lift_step(params: Any, x: jax.Array, t: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            return jnp.mean((apply(params, None, x, True) - t) ** 2)

        loss, grads = lift.value_and_grad(loss_fn)(params)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads), loss

    for x, t in zip(xs, ts, strict=True):
        params, hk_state, loss_hk = hk_step(params, hk_state, x, t)
        (lift_params, loss_lift), state = lift_step(state, lift_params, x, t)
        assert_same(loss_lift, loss_hk)
        assert_same(lift_params, params)
        assert_same(lh.to_haiku(state, hk_state), hk_state)
    assert int(state[lift.StateKey("['~']['calls']")]) == STEPS


def test_scan_matches_haiku_under_lax_scan() -> None:
    f, params, hk_state, xs, _ = setup()
    state = lh.from_haiku(hk_state)

    @jax.jit
    def hk_loop(hk_state: Any, xs: jax.Array) -> Any:
        def body(hk_state: Any, x: jax.Array) -> Any:
            y, hk_state = f.apply(params, hk_state, None, x, True)
            return hk_state, y

        return lax.scan(body, hk_state, xs)

    hk_state, ys_hk = hk_loop(hk_state, xs)
    apply = lh.lower(f.apply, hk_state)
    loop = lift.stateful(
        lambda xs: lift.scan(lambda c, x: (c, apply(params, None, x, True)), 0, xs)
    )
    (_, ys_lift), state = lift.jit(loop)(state, xs)
    assert_same(ys_lift, ys_hk)
    assert_same(lh.to_haiku(state, hk_state), hk_state)


def test_inference_reads_only() -> None:
    _, params, hk_state, xs, _ = setup()
    g = hk.transform_with_state(lambda x: net(x, False))
    state = lh.from_haiku(hk_state)
    # The counter still ticks in inference, so only BatchNorm's statistics are frozen.
    y, new = lift.stateful(lh.lower(g.apply, hk_state))(state, params, None, xs[0])
    y_hk, new_hk = g.apply(params, hk_state, None, xs[0])
    assert_same(y, y_hk)
    assert_same(lh.to_haiku(new, hk_state), new_hk)
    assert (
        new[lift.StateKey("['batch_norm/~/mean_ema']['average']")]
        is state[lift.StateKey("['batch_norm/~/mean_ema']['average']")]
    )


def test_errors() -> None:
    _, _, hk_state, _, _ = setup()
    with pytest.raises(TypeError, match="Haiku state"):
        lh.from_haiku({"linear": 3})
    state = lh.from_haiku(hk_state)
    missing = {k: v for k, v in state.items() if k != "['~']['calls']"}
    with pytest.raises(KeyError, match=r"\['~'\]\['calls'\]"):
        lh.to_haiku(missing, hk_state)
    with pytest.raises(ValueError, match="'other'"):
        lh.to_haiku({**state, lift.StateKey("other"): jnp.zeros(())}, hk_state)
    with pytest.raises(TypeError, match=r"transformed\.apply"):
        lh.lower(3, hk_state)  # type: ignore[arg-type]


def test_lowered_apply_cannot_add_state() -> None:
    def grows(x: jax.Array) -> jax.Array:
        hk.set_state("late", jnp.zeros(()))
        return x

    f = hk.without_apply_rng(hk.transform_with_state(grows))
    with pytest.raises(ValueError, match="never added silently"):
        lift.stateful(lh.lower(f.apply, {}))({}, {}, jnp.ones(()))


def test_lowered_apply_must_return_the_same_state() -> None:
    like = {"m": {"n": jnp.zeros(())}}
    state = lh.from_haiku(like)
    not_a_pair = lh.lower(lambda params, hk_state, x: x, like)
    with pytest.raises(ValueError, match=r"must return `\(out, state\)`"):
        lift.stateful(not_a_pair)(state, {}, jnp.ones(()))
    renamed = lh.lower(lambda params, hk_state, x: (x, {"m": {"k": x}}), like)
    with pytest.raises(ValueError, match=r"\['m'\]\['k'\].*never added silently"):
        lift.stateful(renamed)(state, {}, jnp.ones(()))


def test_ensemble_under_vmap_matches_haiku_under_jax_vmap() -> None:
    # Four members, each with its own parameters and state, on the same batch.
    f = hk.transform_with_state(net)
    xs = jax.random.normal(jax.random.key(7), (16, 4))
    params, hk_state = jax.vmap(lambda k: f.init(k, xs, True))(
        jax.random.split(jax.random.key(0), 4)
    )
    ys_hk, new_hk = jax.jit(jax.vmap(lambda p, s: f.apply(p, s, None, xs, True)))(
        params, hk_state
    )

    state = lh.from_haiku(hk_state)
    apply = lh.lower(f.apply, hk_state)
    members = lift.vmap(lambda p: apply(p, None, xs, True), state_axes=0)
    ys, new = lift.jit(lift.stateful(members))(state, params)
    assert_same(ys, ys_hk)
    assert_same(lh.to_haiku(new, hk_state), new_hk)
    assert new[lift.StateKey("['~']['calls']")].tolist() == [1, 1, 1, 1]


def test_batch_statistics_across_vmap_match_haiku() -> None:
    # Per-example calls whose BatchNorm reduces over the vmapped axis by name.
    def per_example(x: jax.Array) -> jax.Array:
        bn = hk.BatchNorm(True, True, decay_rate=0.9, cross_replica_axis="batch")
        return bn(hk.Linear(3)(x), is_training=True)

    f = hk.transform_with_state(per_example)
    xs = jax.random.normal(jax.random.key(3), (8, 4))
    params, hk_state = jax.vmap(
        lambda x: f.init(jax.random.key(0), x), axis_name="batch"
    )(xs)
    params = jax.tree_util.tree_map(lambda p: p[0], params)
    hk_state = jax.tree_util.tree_map(lambda s: s[0], hk_state)
    ys_hk, new_hk = jax.vmap(
        lambda x: f.apply(params, hk_state, None, x),
        axis_name="batch",
        out_axes=(0, None),
    )(xs)

    state = lh.from_haiku(hk_state)
    apply = lh.lower(f.apply, hk_state)
    batched = lift.vmap(lambda x: apply(params, None, x), axis_name="batch")
    ys, new = lift.stateful(batched)(state, xs)
    assert_same(ys, ys_hk)
    assert_same(lh.to_haiku(new, hk_state), new_hk)
    hidden = lift.StateKey("['batch_norm/~/mean_ema']['hidden']")
    assert not jnp.array_equal(new[hidden], state[hidden])  # one shared update
