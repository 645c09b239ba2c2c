"""lift.nnx: Flax NNX modules under lift give NNX's numbers, bit for bit."""

from __future__ import annotations

from typing import Any

import pytest

nnx = pytest.importorskip("flax.nnx")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import lift  # noqa: E402
import lift.nnx as ln  # noqa: E402
from tests.integrations.parity import assert_same  # noqa: E402

STEPS = 3


def nnx_state(model: Any) -> dict:
    """The non-parameter variables of an NNX module, keyed as lift keys them."""
    pairs = jax.tree_util.tree_flatten_with_path(
        nnx.state(model, nnx.Not(nnx.Param)),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )[0]
    return {lift.StateKey(ln._name(path)): var.get_value() for path, var in pairs}


class Net(nnx.Module):
    """Linear, BatchNorm, Dropout (an RNG stream in its state), ReLU, Linear."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.drop(self.bn(self.l1(x)))
        return self.l2(jax.nn.relu(x))[..., 0]


def make() -> Net:
    return Net(nnx.Rngs(params=0, dropout=1))


def data() -> tuple[jax.Array, jax.Array]:
    xs = jax.random.normal(jax.random.key(7), (STEPS, 16, 4))
    return xs, jnp.sum(xs, axis=-1)


def test_keys_are_attribute_paths() -> None:
    tree, state = ln.from_nnx(make())
    assert sorted(state) == [
        lift.StateKey(".bn.mean"),
        lift.StateKey(".bn.var"),
        lift.StateKey(".drop.rngs.count"),
        lift.StateKey(".drop.rngs.key"),
    ]
    assert set(tree.keys) == set(state)
    _, prefixed = ln.from_nnx(make(), prefix="net")
    assert lift.StateKey("net.bn.mean") in prefixed
    _, only_stats = ln.from_nnx(make(), nnx.BatchStat)
    assert sorted(only_stats) == [lift.StateKey(".bn.mean"), lift.StateKey(".bn.var")]


def test_training_steps_match_nnx_jit() -> None:
    model = make()
    tree, state = ln.from_nnx(make())
    xs, ts = data()

    @nnx.jit
    def nnx_step(model: Net, x: jax.Array, t: jax.Array) -> jax.Array:
        def loss_fn(model: Net) -> jax.Array:
            return jnp.mean((model(x) - t) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(
            model, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
        )
        return loss

    @lift.jit
    @lift.stateful
    def lift_step(tree: ln.NnxTree, x: jax.Array, t: jax.Array) -> Any:
        def loss_fn(tree: ln.NnxTree) -> jax.Array:
            return jnp.mean((ln.lower(tree)(x) - t) ** 2)

        loss, grads = lift.value_and_grad(loss_fn)(tree)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, tree, grads), loss

    for x, t in zip(xs, ts, strict=True):
        loss_nnx = nnx_step(model, x, t)
        (tree, loss_lift), state = lift_step(state, tree, x, t)
        assert_same(loss_lift, loss_nnx)
        assert_same(state, nnx_state(model))
        assert_same(tree.params, nnx.state(model, nnx.Param))
    back = ln.to_nnx(tree, state)
    assert_same(nnx.state(back), nnx.state(model))


@pytest.mark.parametrize("mode", ["stateful", "scan"])
def test_forward_parity_with_nnx(mode: str) -> None:
    model = make()
    tree, state = ln.from_nnx(make())
    xs, _ = data()
    if mode == "stateful":
        ys_nnx = jnp.stack([model(x) for x in xs])
        run = lift.stateful(ln.lower(tree))
        ys = []
        for x in xs:
            y, state = run(state, x)
            ys.append(y)
        ys_lift = jnp.stack(ys)
    else:
        # NNX's functional API around a raw `lax.scan`: split, merge in the body.
        graphdef, moved, kept = nnx.split(model, nnx.Not(nnx.Param), ...)

        @jax.jit
        def nnx_loop(moved: Any, xs: jax.Array) -> Any:
            def body(moved: Any, x: jax.Array) -> Any:
                m = nnx.merge(graphdef, moved, kept)
                y = m(x)
                return nnx.state(m, nnx.Not(nnx.Param)), y

            return lax.scan(body, moved, xs)

        moved, ys_nnx = nnx_loop(moved, xs)
        nnx.update(model, moved)
        lowered = ln.lower(tree)
        loop = lift.stateful(lambda xs: lift.scan(lambda c, x: (c, lowered(x)), 0, xs))
        (_, ys_lift), state = lift.jit(loop)(state, xs)
    assert_same(ys_lift, ys_nnx)
    assert_same(state, nnx_state(model))


def test_evaluation_mode_reads_only() -> None:
    model = make()
    model.eval()
    tree, state = ln.from_nnx(model)
    x = jnp.ones((2, 4))
    y, new = lift.stateful(ln.lower(tree), mutable=False)(state, x)
    assert all(new[k] is state[k] for k in state)
    assert_same(y, model(x))


def test_round_trip() -> None:
    model = make()
    back = ln.to_nnx(*ln.from_nnx(model))
    assert type(back) is Net
    assert_same(nnx.state(back), nnx.state(model))
    assert nnx.graphdef(back) == nnx.graphdef(model)


def test_to_nnx_checks_keys() -> None:
    tree, state = ln.from_nnx(make())
    partial = {k: v for k, v in state.items() if k != ".bn.mean"}
    with pytest.raises(KeyError, match=r"'\.bn\.mean'"):
        ln.to_nnx(tree, partial)
    with pytest.raises(ValueError, match=r"'\.other'"):
        ln.to_nnx(tree, {**state, lift.StateKey(".other"): jnp.zeros(())})
    with pytest.raises(TypeError, match="made by `from_nnx`"):
        ln.to_nnx(make(), state)


def test_lower_needs_a_split_module() -> None:
    with pytest.raises(TypeError, match=r"from_nnx\(module\)"):
        ln.lower(make())


def test_lowered_write_is_checked() -> None:
    class Grows(nnx.Module):
        def __init__(self) -> None:
            self.n = nnx.BatchStat(jnp.zeros(2))

        def __call__(self, x: jax.Array) -> jax.Array:
            self.n.set_value(jnp.zeros(3))
            return x

    tree, state = ln.from_nnx(Grows())
    with pytest.raises(ValueError, match=r"'\.n'"):
        lift.stateful(ln.lower(tree))(state, jnp.ones(2))


def test_lowered_call_cannot_add_variables() -> None:
    # Regression: this error and `NnxTree`'s repr read `GraphDef.type`, which NNX's
    # graph definitions do not have (an AttributeError instead of the message).
    class Adds(nnx.Module):
        def __init__(self) -> None:
            self.n = nnx.BatchStat(jnp.zeros(2))

        def __call__(self, x: jax.Array) -> jax.Array:
            self.late = nnx.BatchStat(jnp.zeros(2))
            return x

    tree, state = ln.from_nnx(Adds())
    assert repr(tree) == 'NnxTree(Adds, keys=[StateKey(".n")])'
    with pytest.raises(ValueError, match=r"lower\(Adds\)`: the call created"):
        lift.stateful(ln.lower(tree))(state, jnp.ones(2))


class Member(nnx.Module):
    """Linear then BatchNorm; ``axis_name`` makes the statistics span a vmap."""

    def __init__(self, rngs: nnx.Rngs, axis_name: str | None = None) -> None:
        self.l = nnx.Linear(4, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, momentum=0.9, axis_name=axis_name, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.l(x))


def test_ensemble_under_vmap_matches_nnx_vmap() -> None:
    def create() -> Member:
        @nnx.split_rngs(splits=4)
        @nnx.vmap(in_axes=(0,))
        def make(rngs: nnx.Rngs) -> Member:
            return Member(rngs)

        return make(nnx.Rngs(0))

    xs, _ = data()
    model = create()
    tree, state = ln.from_nnx(create())
    assert state[lift.StateKey(".bn.mean")].shape == (4, 3)

    @nnx.jit
    @nnx.vmap(in_axes=(0, None))
    def nnx_members(m: Member, x: jax.Array) -> jax.Array:
        return m(x)

    members = lift.vmap(lambda t, x: ln.lower(t)(x), in_axes=(0, None), state_axes=0)
    for x in xs:
        ys_nnx = nnx_members(model, x)
        ys, state = lift.jit(lift.stateful(members))(state, tree, x)
        assert_same(ys, ys_nnx)
        assert_same(state, nnx_state(model))


def test_batch_statistics_across_vmap_match_nnx() -> None:
    # Per-example calls; BatchNorm reduces over the vmapped axis by its name.
    def per_example(m: Member, x: jax.Array) -> jax.Array:
        return m(x[None])[0]

    xs, _ = data()
    model = Member(nnx.Rngs(0), axis_name="batch")
    tree, state = ln.from_nnx(Member(nnx.Rngs(0), axis_name="batch"))
    nnx_batched = nnx.vmap(per_example, in_axes=(None, 0), axis_name="batch")
    lowered = ln.lower(tree)
    batched = lift.vmap(lambda x: lowered(x[None])[0], axis_name="batch")
    for x in xs:
        ys_nnx = nnx_batched(model, x)
        ys, state = lift.stateful(batched)(state, x)
        assert_same(ys, ys_nnx)
        assert_same(state, nnx_state(model))
