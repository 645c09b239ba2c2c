"""lift.linen: Linen modules under lift give Linen's own numbers, bit for bit."""

from __future__ import annotations

from typing import Any

import pytest

flax = pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.core import FrozenDict  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lift  # noqa: E402
import lift.linen as ll  # noqa: E402
from tests.integrations.parity import assert_same  # noqa: E402

STEPS = 3
MEAN = lift.StateKey("['batch_stats']['mean']")


def batches(n: int = STEPS, shape: tuple[int, ...] = (8, 3)) -> jax.Array:
    return jax.random.normal(jax.random.key(7), (n, *shape))


# ------------------------------------------------------------------- the modules


class Block(nn.Module):
    """A ResNet-style block: conv, BatchNorm, ReLU, conv, BatchNorm, residual."""

    features: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
        y = nn.Conv(self.features, (3, 3), use_bias=False)(nn.relu(y))
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
        return nn.relu(x + y)


class Net(nn.Module):
    """Two blocks and a linear head, on 6x6 images with 4 channels."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Block()(Block()(x, train), train)
        return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))[..., 0]


class Decoder(nn.Module):
    """Self-attention decoding one token at a time from its `cache` collection."""

    decode: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        attend = nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=8, decode=self.decode
        )
        return nn.Dense(4)(attend(x, x))


class Probe(nn.Module):
    """Keeps the last pre-activation in `intermediates` (overwriting, fixed shape)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(2)(x)
        self.sow("intermediates", "pre", y, init_fn=lambda: y, reduce_fn=_last)
        return nn.relu(y)


def _last(_: Any, y: jax.Array) -> jax.Array:
    return y


# ------------------------------------------------------------- keys and round trip


def test_keys_are_the_key_paths_of_the_arrays() -> None:
    x = batches()[0]
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    params, state = ll.from_linen(variables)
    assert params is variables["params"]
    assert sorted(state) == [MEAN, lift.StateKey("['batch_stats']['var']")]
    assert state[MEAN] is variables["batch_stats"]["mean"]
    _, prefixed = ll.from_linen(variables, prefix="enc")
    assert lift.StateKey("enc['batch_stats']['mean']") in prefixed
    lift.merge_states(state, prefixed)  # distinct prefixes merge


def test_keys_match_jax_key_paths_of_a_nested_model() -> None:
    variables = Net().init(jax.random.key(0), jnp.ones((2, 6, 6, 4)), True)
    _, state = ll.from_linen(variables)
    stats = {"batch_stats": variables["batch_stats"]}
    expected = {
        lift.StateKey(jax.tree_util.keystr(path)): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]
    }
    assert list(state) == list(expected)
    assert all(state[k] is v for k, v in expected.items())
    assert lift.StateKey("['batch_stats']['Block_1']['BatchNorm_0']['var']") in state


_names = st.text("abcxyz_0", min_size=1, max_size=4)
_arrays = st.integers(0, 3).map(lambda n: jnp.arange(n, dtype=jnp.float32))
_trees = st.recursive(
    _arrays, lambda inner: st.dictionaries(_names, inner, max_size=3), max_leaves=6
)


@given(
    st.dictionaries(
        _names.filter(lambda c: c not in ("params", "intermediates")),
        _trees.filter(lambda t: isinstance(t, dict)),
        max_size=3,
    ),
    st.booleans(),
    st.sampled_from(["", "m", "['x']"]),
)
def test_round_trip_is_exact(collections: dict, frozen: bool, prefix: str) -> None:
    variables: Any = {"params": {"w": jnp.ones(2)}, **collections}
    if frozen:
        variables = FrozenDict(variables)
    params, state = ll.from_linen(variables, prefix=prefix)
    back = ll.to_linen(state, variables, prefix=prefix)
    assert type(back) is type(variables)
    assert list(back) == list(variables)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
    leaves = jax.tree_util.tree_leaves(variables)
    pairs = zip(jax.tree_util.tree_leaves(back), leaves, strict=True)
    assert all(a is b for a, b in pairs)
    assert jax.tree_util.tree_leaves(params)[0] is variables["params"]["w"]
    assert len(state) == len(jax.tree_util.tree_leaves(collections))


def test_to_linen_puts_in_new_params() -> None:
    variables = {"params": {"w": jnp.ones(2)}, "cache": {"i": jnp.zeros(())}}
    _, state = ll.from_linen(variables)
    new = {"w": jnp.zeros(2)}
    assert ll.to_linen(state, variables, params=new)["params"] is new


# ----------------------------------------------------------------- BatchNorm parity


def test_batchnorm_training_matches_linen() -> None:
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    xs = batches()
    variables = bn.init(jax.random.key(0), xs[0])
    params, state = ll.from_linen(variables)
    linen_step = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
    lift_step = lift.jit(lift.stateful(ll.lower(bn, variables)))
    for x in xs:
        y_linen, updated = linen_step(variables, x)
        variables = {**variables, **updated}
        y_lift, state = lift_step(state, params, x)
        assert_same(y_lift, y_linen)
        assert_same(ll.to_linen(state, variables), variables)


def test_lowered_step_traces_to_as_many_equations_as_linen() -> None:
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    x = batches()[0]
    variables = bn.init(jax.random.key(0), x)
    params, state = ll.from_linen(variables)
    by_hand = jax.make_jaxpr(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
    lifted = jax.make_jaxpr(lift.stateful(ll.lower(bn, variables)))
    assert len(lifted(state, params, x).eqns) == len(by_hand(variables, x).eqns)


def test_batchnorm_running_average_reads_only() -> None:
    bn = nn.BatchNorm(momentum=0.9)
    xs = batches()
    variables = bn.init(jax.random.key(0), xs[0], False)
    _, updated = bn.apply(variables, xs[0], False, mutable=["batch_stats"])
    variables = {**variables, **updated}  # statistics that are not the initial ones
    params, state = ll.from_linen(variables)
    infer = lift.jit(lift.stateful(ll.lower(bn, variables), mutable=False))
    y_lift, new = infer(state, params, xs[1], True)
    assert_same(y_lift, bn.apply(variables, xs[1], True))
    assert_same(new, state)
    # Eagerly in a mutable frame too: nothing changed, so nothing is written.
    y_eager, same = lift.stateful(ll.lower(bn, variables))(state, params, xs[1], True)
    assert_same(y_eager, y_lift)
    assert all(same[k] is state[k] for k in state)


# ---------------------------------------------------- a ResNet block and optax


def test_resnet_block_matches_linen_in_both_modes() -> None:
    block = Block()
    xs = jax.random.normal(jax.random.key(1), (STEPS, 2, 6, 6, 4))
    variables = block.init(jax.random.key(0), xs[0], True)
    params, state = ll.from_linen(variables)
    apply = ll.lower(block, variables)
    linen_step = jax.jit(lambda v, x: block.apply(v, x, True, mutable=["batch_stats"]))
    lift_step = lift.jit(lift.stateful(lambda p, x: apply(p, x, True)))
    for x in xs:
        y_linen, updated = linen_step(variables, x)
        variables = {**variables, **updated}
        y_lift, state = lift_step(state, params, x)
        assert_same(y_lift, y_linen)
        assert_same(ll.to_linen(state, variables), variables)
    infer = lift.stateful(lambda p, x: apply(p, x, False), mutable=False)
    assert_same(infer(state, params, xs[0])[0], block.apply(variables, xs[0], False))


@pytest.mark.usefixtures("standard_promotion")  # optax's Adam mixes int and float
def test_optax_training_converted_back_continues_in_linen() -> None:
    net, opt = Net(), optax.adam(1e-2)
    xs = jax.random.normal(jax.random.key(1), (2 * STEPS, 4, 6, 6, 4))
    ts = jnp.sum(xs, axis=(2, 3, 4))
    variables = net.init(jax.random.key(0), xs[0], True)

    @jax.jit
    def linen_step(variables: Any, opt_state: Any, x: jax.Array, t: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            y, updated = net.apply(
                {**variables, "params": params}, x, True, mutable=["batch_stats"]
            )
            return jnp.mean((y - t) ** 2), updated

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, updated), grads = grad_fn(variables["params"])
        updates, opt_state = opt.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, **updated}, opt_state, loss

    apply = ll.lower(net, variables)

    @lift.jit
    @lift.stateful
    def lift_step(params: Any, opt_state: Any, x: jax.Array, t: jax.Array) -> Any:
        def loss_fn(params: Any) -> Any:
            return jnp.mean((apply(params, x, True) - t) ** 2)

        loss, grads = lift.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    reference, ref_opt = variables, opt.init(variables["params"])
    losses = []
    for x, t in zip(xs, ts, strict=True):
        reference, ref_opt, loss = linen_step(reference, ref_opt, x, t)
        losses.append(loss)

    params, state = ll.from_linen(variables)
    opt_state = opt.init(params)
    for i in range(STEPS):
        (params, opt_state, loss), state = lift_step(
            state, params, opt_state, xs[i], ts[i]
        )
        assert_same(loss, losses[i])
    variables = ll.to_linen(state, variables, params=params)
    for i in range(STEPS, 2 * STEPS):
        variables, opt_state, loss = linen_step(variables, opt_state, xs[i], ts[i])
        assert_same(loss, losses[i])
    assert_same(variables, reference)
    assert_same(opt_state, ref_opt)


# ----------------------------------------------------------- a decoder's cache


def test_cached_decoding_under_scan_matches_a_linen_loop() -> None:
    length = 5
    tokens = jax.random.normal(jax.random.key(2), (length, 2, 1, 4))
    variables = Decoder().init(jax.random.key(0), jnp.ones((2, length, 4)))
    params, state = ll.from_linen(variables)
    assert (
        lift.StateKey("['cache']['MultiHeadDotProductAttention_0']['cache_index']")
        in state
    )

    step = jax.jit(lambda v, x: Decoder().apply(v, x, mutable=["cache"]))
    reference, ys = variables, []
    for x in tokens:
        y, updated = step(reference, x)
        reference = {**reference, **updated}
        ys.append(y)

    apply = ll.lower(Decoder(), variables)
    decode = lift.stateful(
        lambda p, xs: lift.scan(lambda c, x: (c, apply(p, x)), 0, xs)[1]
    )
    ys_lift, state = lift.jit(decode)(state, params, tokens)
    assert_same(ys_lift, jnp.stack(ys))
    assert_same(ll.to_linen(state, variables), reference)


def test_a_raw_lax_scan_around_the_lowered_apply_matches_lift_scan() -> None:
    # A loop lift does not own (a solver's `lax.scan`): the same numbers, body run once.
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    xs = batches(4)
    variables = bn.init(jax.random.key(0), xs[0])
    params, state = ll.from_linen(variables)
    apply = ll.lower(bn, variables)
    calls = []

    def raw(xs: jax.Array) -> jax.Array:
        calls.append(None)
        return jax.lax.scan(lambda c, x: (c, apply(params, x)), None, xs)[1]

    def lifted(xs: jax.Array) -> jax.Array:
        return lift.scan(lambda c, x: (c, apply(params, x)), None, xs)[1]

    assert_same(lift.stateful(raw)(state, xs), lift.stateful(lifted)(state, xs))
    assert len(calls) == 1


# ------------------------------------------------------- BatchNorm over a named axis


def test_batchnorm_over_a_named_axis_matches_jax_vmap() -> None:
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name="batch")
    xs = batches(shape=(3,))[0].reshape(1, 3) * jnp.arange(1.0, 9.0)[:, None]
    variables = jax.vmap(
        lambda x: bn.init(jax.random.key(0), x), axis_name="batch", out_axes=None
    )(xs)
    y_jax, updated = jax.jit(
        jax.vmap(
            lambda x: bn.apply(variables, x, mutable=["batch_stats"]),
            axis_name="batch",
            out_axes=(0, None),
        )
    )(xs)

    params, state = ll.from_linen(variables)
    apply = ll.lower(bn, variables)
    batched = lift.vmap(lambda x: apply(params, x), axis_name="batch")
    y_lift, new = lift.jit(lift.stateful(batched))(state, xs)
    assert_same(y_lift, y_jax)
    assert_same(ll.to_linen(new, variables), {**variables, **updated})
    assert not np.array_equal(new[MEAN], state[MEAN])  # one shared update


def test_ensemble_under_vmap_matches_linen_under_jax_vmap() -> None:
    # Four members, each with its own parameters and statistics, on the same batch.
    block, x = Block(), jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    keys = jax.random.split(jax.random.key(0), 4)
    variables = jax.vmap(lambda k: block.init(k, x, True))(keys)
    ys_linen, updated = jax.jit(
        jax.vmap(lambda v: block.apply(v, x, True, mutable=["batch_stats"]))
    )(variables)

    params, state = ll.from_linen(variables)
    apply = ll.lower(block, variables)
    members = lift.vmap(lambda p: apply(p, x, True), state_axes=0)
    ys, new = lift.jit(lift.stateful(members))(state, params)
    assert_same(ys, ys_linen)
    assert_same(ll.to_linen(new, variables), {**variables, **updated})


# ------------------------------------------------------------ collections and rngs


def test_intermediates_only_when_asked() -> None:
    x = batches()[0]
    variables = Probe().init(jax.random.key(0), x, mutable=True)
    with pytest.raises(ValueError, match="'intermediates'"):
        ll.from_linen(variables)
    params, state = ll.from_linen(variables, collections=["intermediates"])
    key = lift.StateKey("['intermediates']['pre']")
    assert list(state) == [key]
    apply = ll.lower(Probe(), variables, collections=["intermediates"])
    y, new = lift.stateful(apply)(state, params, x + 1)
    y_linen, updated = Probe().apply(variables, x + 1, mutable=["intermediates"])
    assert_same(y, y_linen)
    assert_same(new[key], updated["intermediates"]["pre"])


def test_rngs_pass_through() -> None:
    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.BatchNorm(use_running_average=False)(x)
            return nn.Dropout(0.5, deterministic=False)(x)

    x = batches()[0]
    variables = Noisy().init(jax.random.key(0), x)
    rngs = {"dropout": jax.random.key(3)}
    y_linen, updated = Noisy().apply(variables, x, rngs=rngs, mutable=["batch_stats"])
    params, state = ll.from_linen(variables)
    y, new = lift.stateful(ll.lower(Noisy(), variables))(state, params, x, rngs=rngs)
    assert_same(y, y_linen)
    assert_same(ll.to_linen(new, variables), {**variables, **updated})


def test_an_apply_function_works_like_the_module() -> None:
    bn = nn.BatchNorm(use_running_average=False)
    x = batches()[0]
    variables = bn.init(jax.random.key(0), x)
    params, state = ll.from_linen(variables)
    by_module = lift.stateful(ll.lower(bn, variables))(state, params, x)
    by_apply = lift.stateful(ll.lower(bn.apply, variables))(state, params, x)
    assert_same(by_apply, by_module)


# ------------------------------------------------------------------------ errors


def test_errors_name_what_and_where() -> None:
    x = batches()[0]
    bn = nn.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    params, state = ll.from_linen(variables)
    with pytest.raises(lift.LiftError, match="Linen variables"):
        ll.from_linen([1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prefix"):
        ll.from_linen(variables, prefix=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'params'"):
        ll.from_linen(variables, collections=["params", "batch_stats"])
    with pytest.raises(ValueError, match="'cache'"):
        ll.from_linen(variables, collections=["cache"])
    with pytest.raises(TypeError, match="list of collection names"):
        ll.from_linen(variables, collections="batch_stats")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int"):
        ll.from_linen(variables, collections=3)  # type: ignore[arg-type]
    missing = {k: v for k, v in state.items() if k != MEAN}
    with pytest.raises(KeyError, match=r"\['batch_stats'\]\['mean'\]"):
        ll.to_linen(missing, variables)
    extra = {**state, lift.StateKey("other"): jnp.zeros(())}
    with pytest.raises(ValueError, match="'other'"):
        ll.to_linen(extra, variables)
    assert (
        ll.to_linen(extra, variables, strict=False)["batch_stats"]["mean"]
        is (state[MEAN])
    )
    with pytest.raises(TypeError, match="Linen module"):
        ll.lower(3, variables)
    with pytest.raises(TypeError, match="the class BatchNorm"):
        ll.lower(nn.BatchNorm, variables)
    apply = ll.lower(bn, variables)
    with pytest.raises(TypeError, match="mutable="):
        lift.stateful(apply)(state, params, x, mutable=["batch_stats"])
    with pytest.raises(lift.FrameError, match="outside a frame"):
        apply(params, x)
    with pytest.raises(KeyError, match=r"\['batch_stats'\]\['mean'\]"):
        lift.stateful(apply)(missing, params, x)


def test_a_write_in_an_immutable_frame_names_the_key() -> None:
    bn = nn.BatchNorm(use_running_average=False)
    x = batches()[0]
    variables = bn.init(jax.random.key(0), x)
    params, state = ll.from_linen(variables)
    infer = lift.stateful(ll.lower(bn, variables), mutable=False)
    with pytest.raises(lift.FrameError, match=r"\['batch_stats'\]\['mean'\]"):
        infer(state, params, x)


def test_a_wrong_value_is_refused_like_lift_set() -> None:
    class Widens(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            n = self.variable("counter", "n", jnp.zeros, (), jnp.int32)
            if not self.is_initializing():
                n.value = n.value.astype(jnp.float32) + x
            return x

    variables = Widens().init(jax.random.key(0), jnp.ones(()))
    params, state = ll.from_linen(variables)
    with pytest.raises(ValueError, match=r"\['counter'\]\['n'\]"):
        lift.stateful(ll.lower(Widens(), variables))(state, params, jnp.ones(()))


def test_apply_cannot_add_state() -> None:
    class Grows(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            n = self.variable("counter", "n", jnp.zeros, (), jnp.int32)
            if not self.is_initializing():
                self.variable("counter", "late", jnp.zeros, (), jnp.int32)
                n.value += 1
            return x

    variables = Grows().init(jax.random.key(0), jnp.ones(()))
    params, state = ll.from_linen(variables)
    apply = ll.lower(Grows(), variables)
    with pytest.raises(ValueError, match=r"\['counter'\]\['late'\]"):
        lift.stateful(apply)(state, params, jnp.ones(()))
