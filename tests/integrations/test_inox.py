"""lift.inox: Inox modules under lift give Inox's numbers, bit for bit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

inox = pytest.importorskip("inox")

import inox.nn as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import lift  # noqa: E402
import lift.inox as li  # noqa: E402
from tests.integrations.parity import assert_same  # noqa: E402

STEPS = 3
BATCH = 8


@pytest.fixture(autouse=True)
def _allow_rank_promotion() -> Iterator[None]:
    # Inox's BatchNorm normalises `(N, C)` inputs with `(C,)` statistics, relying on
    # implicit rank promotion, which the suite otherwise turns into an error.
    with jax.numpy_rank_promotion("allow"):
        yield


def as_lift(inox_state: dict) -> dict:
    """An Inox state dict keyed as lift keys it (the same path strings)."""
    return {lift.StateKey(k.key): v for k, v in inox_state.items()}


# ------------------------------------------------------------------- the modules


class Moments(nn.Module):
    """A user-written stateful module (Inox's own docs example), passing ``x`` on."""

    def __init__(self, features: int) -> None:
        self.first = nn.StateEntry(jnp.zeros(features))
        self.second = nn.StateEntry(jnp.ones(features))
        self.calls = nn.StateEntry(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        first, second = state[self.first], state[self.second]
        mean = jnp.mean(x, axis=0)
        state = nn.update_state(
            state,
            {
                self.first: 0.9 * first + 0.1 * mean,
                self.second: 0.9 * second + 0.1 * mean**2,
                self.calls: state[self.calls] + 1,
            },
        )
        return x - first, state


class MLP(nn.Module):
    """Linear, BatchNorm, ReLU, Linear, with input moments tracked by ``Moments``."""

    def __init__(self, key: jax.Array, features: int = 4) -> None:
        k1, k2 = jax.random.split(key)
        self.moments = Moments(features)
        self.l1 = nn.Linear(features, 8, key=k1)
        self.bn = nn.BatchNorm(8)
        self.l2 = nn.Linear(8, 1, key=k2)

    def __call__(self, x: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        x, state = self.moments(x, state)
        x, state = self.bn(self.l1(x), state)
        return self.l2(jax.nn.relu(x))[..., 0], state


MAKERS: dict[str, Callable[[jax.Array], Any]] = {
    "batchnorm_mlp": MLP,
    "moments": lambda key: Moments(4),
}


def data(steps: int = STEPS) -> jax.Array:
    return jax.random.normal(jax.random.key(7), (steps, BATCH, 4))


# -------------------------------------------------------------- parity per mode


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("mode", ["stateful", "jit", "scan"])
def test_parity_with_inox(name: str, mode: str) -> None:
    module, inox_state = nn.export_state(MAKERS[name](jax.random.key(0)))
    tree, state = li.from_inox(module, inox_state)
    assert_same(state, as_lift(inox_state))
    xs = data()

    if mode == "scan":

        @inox.jit
        def inox_loop(module: Any, state: dict, xs: jax.Array) -> Any:
            def body(state: dict, x: jax.Array) -> Any:
                y, state = module(x, state)
                return state, y

            return lax.scan(body, state, xs)

        inox_state, ys_inox = inox_loop(module, inox_state, xs)

        def lift_loop(tree: Any, xs: jax.Array) -> Any:
            lowered = li.lower(tree)
            return lift.scan(lambda c, x: (c, lowered(x)), None, xs)[1]

        ys_lift, state = lift.jit(lift.stateful(lift_loop))(state, tree, xs)
    else:
        inox_call = (lambda m, s, x: m(x, s)) if mode == "stateful" else None
        if mode == "jit":
            inox_call = inox.jit(lambda m, s, x: m(x, s))
        lift_call = lift.stateful(lambda m, x: li.lower(m)(x))
        if mode == "jit":
            lift_call = lift.jit(lift_call)
        ys_inox, ys_lift = [], []
        for x in xs:
            y, inox_state = inox_call(module, inox_state, x)
            ys_inox.append(y)
            y, state = lift_call(state, tree, x)
            ys_lift.append(y)
        ys_inox, ys_lift = jnp.stack(ys_inox), jnp.stack(ys_lift)

    assert_same(ys_lift, ys_inox)
    assert_same(state, as_lift(inox_state))
    back, back_state = li.to_inox(tree, state)
    assert_same(back_state, inox_state)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(module)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_ensemble_parity_with_inox_vmap(name: str) -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    modules, inox_states = nn.export_state(inox.vmap(MAKERS[name])(keys))
    trees, state = li.from_inox(modules, inox_states)
    xs = jax.random.normal(jax.random.key(1), (3, BATCH, 4))

    ys_inox, inox_states = inox.jit(inox.vmap(lambda m, s, x: m(x, s)))(
        modules, inox_states, xs
    )
    # No state_axes: the keys inside the mapped `trees` say that their state is mapped.
    apply = lift.vmap(lambda m, x: li.lower(m)(x))
    ys_lift, state = lift.jit(lift.stateful(apply))(state, trees, xs)

    assert_same(ys_lift, ys_inox)
    assert_same(state, as_lift(inox_states))
    calls = state[lift.StateKey(".calls" if name == "moments" else ".moments.calls")]
    np.testing.assert_array_equal(calls, np.ones(3, np.int32))


def test_training_steps_match_inox() -> None:
    module, inox_state = nn.export_state(MLP(jax.random.key(0)))
    tree, state = li.from_inox(module, inox_state)
    xs = data()
    ts = jnp.sum(xs, axis=-1)

    def sgd(params: dict, grads: dict) -> dict:
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)

    @inox.jit
    def inox_step(module: Any, state: dict, x: jax.Array, t: jax.Array) -> Any:
        static, params, others = module.partition(nn.Parameter)

        def loss(params: dict) -> Any:
            y, new = static(params, others)(x, state)
            return jnp.mean((y - t) ** 2), new

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return static(sgd(params, grads), others), state, value

    @lift.jit
    @lift.stateful
    def lift_step(tree: Any, x: jax.Array, t: jax.Array) -> Any:
        static, params, others = tree.partition(nn.Parameter)

        def loss(params: dict) -> Any:
            y = li.lower(static(params, others))(x)
            return jnp.mean((y - t) ** 2)

        value, grads = lift.value_and_grad(loss)(params)
        return static(sgd(params, grads), others), value

    for x, t in zip(xs, ts, strict=True):
        module, inox_state, value_inox = inox_step(module, inox_state, x, t)
        (tree, value_lift), state = lift_step(state, tree, x, t)
        assert_same(value_lift, value_inox)
        assert_same(state, as_lift(inox_state))
        assert_same(tree.partition(nn.Parameter)[1], module.partition(nn.Parameter)[1])


# ---------------------------------------------------------------- conversions


def test_entries_convert_like_inox_export_state() -> None:
    built = MLP(jax.random.key(0))
    tree, state = li.from_inox(built)
    exported, inox_state = nn.export_state(built)
    assert sorted(state) == [
        lift.StateKey(".bn.stats"),
        lift.StateKey(".moments.calls"),
        lift.StateKey(".moments.first"),
        lift.StateKey(".moments.second"),
    ]
    assert tree.bn.stats == lift.StateKey(".bn.stats")
    assert_same(state, as_lift(inox_state))
    # Back to Inox gives exactly what Inox's own export gives.
    back, back_state = li.to_inox(tree, state)
    assert back.bn.stats == exported.bn.stats
    assert type(back.bn.stats) is nn.StateKey
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(exported)
    assert list(back_state) == list(inox_state)
    assert all(back_state[k] is state[lift.StateKey(k.key)] for k in back_state)


def test_round_trip_of_an_exported_module_is_exact() -> None:
    module, inox_state = nn.export_state(MLP(jax.random.key(0)))
    back, back_state = li.to_inox(*li.from_inox(module, inox_state))
    leaves, treedef = jax.tree_util.tree_flatten(back)
    leaves0, treedef0 = jax.tree_util.tree_flatten(module)
    assert treedef == treedef0
    # Arrays are the same objects; the rest (Inox keys' strings, flags) equal.
    assert all(
        a is b if isinstance(a, jax.Array) else a == b
        for a, b in zip(leaves, leaves0, strict=True)
    )
    assert back_state.keys() == inox_state.keys()
    assert all(back_state[k] is inox_state[k] for k in inox_state)


def test_prefix_roots_the_keys() -> None:
    _, state = li.from_inox(Moments(2), prefix="enc")
    assert sorted(state) == [
        lift.StateKey("enc.calls"),
        lift.StateKey("enc.first"),
        lift.StateKey("enc.second"),
    ]


def test_prefix_lets_two_exported_modules_merge() -> None:
    # Regression: `prefix=` was ignored for the Inox keys of an exported module, so
    # two exported modules could not be merged although the error said to pass it.
    enc, enc_state = nn.export_state(MLP(jax.random.key(0)))
    dec, dec_state = nn.export_state(MLP(jax.random.key(1)))
    enc_tree, a = li.from_inox(enc, enc_state, prefix="enc")
    dec_tree, b = li.from_inox(dec, dec_state, prefix="dec")
    assert lift.StateKey("enc.bn.stats") in a
    assert lift.StateKey("dec.bn.stats") in b
    with pytest.raises(ValueError, match=r"\.bn\.stats"):
        lift.merge_states(
            li.from_inox(enc, enc_state)[1], li.from_inox(dec, dec_state)[1]
        )
    state = lift.merge_states(a, b)
    xs = jax.random.normal(jax.random.key(2), (STEPS, BATCH, 4))

    def both(x: jax.Array) -> jax.Array:
        return li.lower(dec_tree)(li.lower(enc_tree)(x)[:, None] * jnp.ones(4))

    step = lift.stateful(both)
    ys = []
    for x in xs:
        y, state = step(state, x)
        ys.append(y)
    # Inox's own run of the same two modules, and the prefixes undone on the way back.
    for x in xs:
        y, enc_state = enc(x, enc_state)
        y, dec_state = dec(y[:, None] * jnp.ones(4), dec_state)
    assert_same(ys[-1], y)
    enc_only = {k: v for k, v in state.items() if str(k).startswith("enc")}
    enc_back, enc_back_state = li.to_inox(enc_tree, enc_only, prefix="enc")
    assert enc_back.bn.stats == enc.bn.stats  # `.bn.stats` again, not `enc.bn.stats`
    assert_same(enc_back_state, enc_state)
    _, dec_back_state = li.to_inox(dec_tree, state, prefix="dec", strict=False)
    assert_same(dec_back_state, dec_state)
    with pytest.raises(ValueError, match=r"'enc\.bn\.stats'"):
        li.to_inox(enc_tree, state, prefix="dec", strict=False)


def test_shared_inox_key_is_one_lift_key() -> None:
    module, inox_state = nn.export_state(Moments(2))
    shared = nn.Module(a=module, b=module)
    tree, state = li.from_inox(shared, inox_state)
    assert sorted(state) == [
        lift.StateKey(".calls"),
        lift.StateKey(".first"),
        lift.StateKey(".second"),
    ]

    def twice(x: jax.Array) -> jax.Array:
        return li.lower(tree.b)(li.lower(tree.a)(x))

    _, state = lift.stateful(twice)(state, jnp.ones((2, 2)))
    assert int(state[lift.StateKey(".calls")]) == 2


def test_evaluation_mode_reads_only() -> None:
    tree, state = li.from_inox(MLP(jax.random.key(0)))
    tree.train(False)
    run = lift.stateful(lambda x: li.lower(tree.bn)(x), mutable=False)
    y, new = run(state, jnp.ones((2, 8)))
    assert all(new[k] is state[k] for k in state)
    assert_same(y, jnp.ones((2, 8)) / jnp.sqrt(1 + tree.bn.epsilon))


# ------------------------------------------------------------------------ errors


def test_missing_and_extra_inox_state_are_refused() -> None:
    module, inox_state = nn.export_state(Moments(2))
    partial = {k: v for k, v in inox_state.items() if k.key != ".first"}
    with pytest.raises(KeyError, match=r"'\.first'"):
        li.from_inox(module, partial)
    extra = {**inox_state, nn.StateKey(".other"): jnp.zeros(())}
    with pytest.raises(ValueError, match=r"StateKey\('\.other'\)"):
        li.from_inox(module, extra)
    with pytest.raises(TypeError, match="got list"):
        li.from_inox(module, [])


def test_non_string_inox_key_is_refused() -> None:
    tree = {"a": nn.StateKey(3)}
    with pytest.raises(TypeError, match="not a string"):
        li.from_inox(tree, {nn.StateKey(3): jnp.zeros(())})


def test_entry_and_key_colliding_are_refused() -> None:
    tree = {"a": nn.StateEntry(jnp.zeros(())), "b": nn.StateKey("['a']")}
    with pytest.raises(ValueError, match="share the lift key"):
        li.from_inox(tree, {nn.StateKey("['a']"): jnp.zeros(())})


def test_converting_twice_is_refused() -> None:
    tree, _ = li.from_inox(Moments(2))
    with pytest.raises(ValueError, match="converted already"):
        li.from_inox(tree)


def test_unconverted_module_cannot_be_lowered() -> None:
    with pytest.raises(ValueError, match=r"Inox StateEntry at '\."):
        li.lower(Moments(2))


def test_to_inox_checks_keys() -> None:
    tree, state = li.from_inox(Moments(2))
    typo = {k: v for k, v in state.items() if str(k) != ".first"}
    typo[lift.StateKey(".frist")] = state[lift.StateKey(".first")]
    with pytest.raises(KeyError, match=r"'\.first'.*closest existing path"):
        li.to_inox(tree, typo)
    with pytest.raises(ValueError, match=r"'\.other'"):
        li.to_inox(tree, {**state, lift.StateKey(".other"): jnp.zeros(())})


def test_lowered_module_must_return_its_state() -> None:
    class Forgets(nn.Module):
        def __init__(self) -> None:
            self.inner = Moments(2)

        def __call__(self, x: jax.Array, state: dict) -> jax.Array:
            return self.inner(x, state)[0]

    tree, state = li.from_inox(Forgets())
    with pytest.raises(ValueError, match=r"must return `\(output, state\)`"):
        lift.stateful(li.lower(tree))(state, jnp.ones((2, 2)))


def test_lowered_module_cannot_add_state() -> None:
    class Adds(nn.Module):
        def __call__(self, x: jax.Array, state: dict) -> Any:
            return x, {**state, "new": x}

    tree, state = li.from_inox(Adds())
    with pytest.raises(ValueError, match="never added silently"):
        lift.stateful(li.lower(tree))(state, jnp.ones(2))


def test_lowered_write_is_checked() -> None:
    class Grows(nn.Module):
        def __init__(self) -> None:
            self.n = nn.StateEntry(jnp.zeros(2))

        def __call__(self, x: jax.Array, state: dict) -> Any:
            return x, nn.update_state(state, {self.n: jnp.zeros(3)})

    tree, state = li.from_inox(Grows())
    with pytest.raises(ValueError, match=r"'\.n'"):
        lift.stateful(li.lower(tree))(state, jnp.ones(2))
