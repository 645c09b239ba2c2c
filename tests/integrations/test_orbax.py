"""lift.io with Orbax: a state saved through `to_pure_dict` comes back unchanged."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

ocp = pytest.importorskip("orbax.checkpoint")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lift import StateEntry, StateKey, export_state  # noqa: E402
from lift.io import StateMismatchError, from_pure_dict, to_pure_dict  # noqa: E402


class Stats(NamedTuple):
    mean: Any
    var: Any


def make_state(sharding: Any = None) -> dict[StateKey, Any]:
    def put(x: Any) -> Any:
        return x if sharding is None else jax.device_put(x, sharding)

    tree = {
        "bn": StateEntry(Stats(put(jnp.arange(8.0)), put(jnp.ones(8, jnp.bfloat16)))),
        "layers": [{"count": StateEntry(jnp.int32(3))}],
        "rng": StateEntry(put(jax.random.split(jax.random.key(0), 8))),
    }
    return export_state(tree)[1]


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        g_leaves, g_def = jax.tree_util.tree_flatten(got[key])
        w_leaves, w_def = jax.tree_util.tree_flatten(want[key])
        assert g_def == w_def
        for g, w in zip(g_leaves, w_leaves, strict=True):
            assert isinstance(g, jax.Array)
            assert g.dtype == w.dtype
            if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
                g, w = jax.random.key_data(g), jax.random.key_data(w)
            assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def test_standard_checkpointer_round_trip(tmp_path):
    state = make_state()
    pure = to_pure_dict(state)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", pure)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt")
    assert sorted(restored) == sorted(pure)
    got = from_pure_dict(restored, like=state)
    assert_same_state(got, state)
    assert isinstance(got[StateKey("['bn']")], Stats)


def test_pytree_checkpointer_round_trip(tmp_path):
    state = make_state()
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(tmp_path / "ckpt", to_pure_dict(state))
    # A freshly built model's state (other values) tells Orbax where arrays go.
    fresh = jax.tree_util.tree_map(jnp.zeros_like, to_pure_dict(state))
    restore_args = ocp.checkpoint_utils.construct_restore_args(fresh)
    restored = checkpointer.restore(
        tmp_path / "ckpt",
        args=ocp.args.PyTreeRestore(item=fresh, restore_args=restore_args),
    )
    assert_same_state(from_pure_dict(restored, like=state), state)


def test_sharded_state_restores_onto_like_shardings(tmp_path):
    assert len(jax.devices()) >= 8, "the root conftest.py asks XLA for 8 CPU devices"
    mesh = jax.make_mesh((8,), ("x",))
    row = NamedSharding(mesh, P("x"))
    state = make_state(row)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", to_pure_dict(state))
    checkpointer.wait_until_finished()
    # Orbax restores each array onto the sharding of the target's leaf.
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        to_pure_dict(state),
    )
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    got = from_pure_dict(restored, like=state)
    assert_same_state(got, state)
    assert got[StateKey("['bn']")].mean.sharding == row
    assert got[StateKey("['rng']")].sharding == row


def test_restoring_into_a_different_model_reports_every_problem(tmp_path):
    state = make_state()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", to_pure_dict(state))
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt")
    other = dict(state)
    other[StateKey("['bn']")] = Stats(jnp.zeros(4), jnp.ones(8, jnp.bfloat16))
    other[StateKey("['new']")] = jnp.zeros(2)
    with pytest.raises(StateMismatchError) as info:
        from_pure_dict(restored, like=other)
    assert [p for p, _ in info.value.problems] == ["['bn'].mean", "['new']"]
