"""State on several devices: shard_map, pmap, and shardings through jit and scan.

The root ``conftest.py`` asks XLA for 8 host CPU devices before JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distributed_worker import (
    BATCH,
    flat_result,
    make_data,
    make_mlp,
    train_single,
    train_step,
)
from helpers import assert_states_close
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lift
from lift import pmap, shard_map

STEPS = 4


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.asarray(jax.devices()), ("data",))


def assert_results_close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(
            got[name], expected[name], rtol=2e-5, atol=2e-6, err_msg=name
        )


@pytest.fixture(scope="module")
def reference():
    return flat_result(*train_single(STEPS))


def test_eight_devices():
    assert len(jax.devices()) == 8


# --------------------------------------------------------------- data parallel


def test_shard_map_data_parallel_matches_single_device(mesh, reference):
    model, params, state = make_mlp()
    step = lift.jit(
        lift.stateful(
            shard_map(
                partial(train_step, model, axis_name="data"),
                mesh=mesh,
                in_specs=(P(), P("data"), P("data")),
                out_specs=(P(), P()),
            )
        )
    )
    for i in range(STEPS):
        (params, _), state = step(state, params, *make_data(i))
    got = flat_result(model, params, state)
    assert_results_close(got, reference)
    # Training moved the statistics away from their initial values.
    assert not np.allclose(got["bn.mean"], 0.0)


def test_pmap_data_parallel_matches_single_device(reference):
    model, params, state = make_mlp()
    step = lift.jit(
        lift.stateful(
            pmap(
                partial(train_step, model, axis_name="batch"),
                "batch",
                in_axes=(None, 0, 0),
                out_axes=(None, None),
            )
        )
    )
    for i in range(STEPS):
        x, y = make_data(i)
        x, y = x.reshape(8, BATCH // 8, -1), y.reshape(8, BATCH // 8)
        (params, _), state = step(state, params, x, y)
    assert_results_close(flat_result(model, params, state), reference)


def test_shard_map_inside_a_frame_threads_state(mesh):
    # Called inside an outer frame (not at top level), shard_map updates that frame.
    tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})

    @shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    def total(x):
        lift.set(tree["n"], lift.get(tree["n"]) + lax.psum(jnp.sum(x), "data"))
        return 2 * x

    def outer(x):
        y = total(x)
        return total(y)

    out, new = lift.jit(lift.stateful(outer))(state, jnp.arange(16.0))
    np.testing.assert_allclose(out, 4 * np.arange(16.0))
    assert float(new[tree["n"]]) == pytest.approx(120.0 + 240.0)


# ------------------------------------------------------- replicated-state writes


def _counter():
    return lift.export_state(
        {"stats": {"mean": lift.StateEntry(jnp.zeros((), jnp.float32))}}
    )


def test_shard_map_refuses_unreduced_write_to_replicated_state(mesh):
    tree, state = _counter()

    @shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    def bad(x):
        lift.set(tree["stats"]["mean"], jnp.mean(x))  # one value per device
        return x

    with pytest.raises(lift.LiftError) as info:
        lift.stateful(bad)(state, jnp.arange(16.0))
    message = str(info.value)
    assert "['stats']['mean']" in message
    assert "lax.pmean(value, 'data')" in message
    assert "state_specs=" in message
    assert isinstance(info.value, ValueError)


def test_shard_map_accepts_reduced_write(mesh):
    tree, state = _counter()

    @shard_map(mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    def good(x):
        lift.set(tree["stats"]["mean"], lax.pmean(jnp.mean(x), "data"))
        return x

    _, new = lift.stateful(good)(state, jnp.arange(16.0))
    assert float(new[tree["stats"]["mean"]]) == pytest.approx(7.5)


def test_shard_map_error_names_the_varying_axis_of_a_2d_mesh():
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    tree, state = lift.export_state({"rows": lift.StateEntry(jnp.zeros(4))})

    # State sharded over "data", replicated over "model"; the write varies over both.
    @shard_map(
        mesh=mesh,
        in_specs=P("data", "model"),
        out_specs=P("data", "model"),
        state_specs=P("data"),
    )
    def bad(x):
        lift.set(tree["rows"], jnp.sum(x, axis=1))
        return x

    with pytest.raises(
        lift.LiftError, match=r"mesh axis 'model'.*pmean\(value, 'model'"
    ):
        lift.stateful(bad)(state, jnp.ones((4, 4)))

    @shard_map(
        mesh=mesh,
        in_specs=P("data", "model"),
        out_specs=P("data", "model"),
        state_specs=P("data"),
    )
    def good(x):
        lift.set(tree["rows"], lax.psum(jnp.sum(x, axis=1), "model"))
        return x

    x = jnp.arange(16.0).reshape(4, 4)
    _, new = lift.stateful(good)(state, x)
    np.testing.assert_allclose(new[tree["rows"]], np.asarray(x).sum(axis=1))


def test_pmap_refuses_unreduced_write_to_replicated_state():
    tree, state = _counter()

    def bad(x):
        lift.set(tree["stats"]["mean"], jnp.mean(x))
        return x

    with pytest.raises(lift.LiftError) as info:
        lift.stateful(pmap(bad, "i"))(state, jnp.ones((8, 3)))
    message = str(info.value)
    assert "['stats']['mean']" in message
    assert "lax.pmean(value, 'i')" in message
    assert "state_axes=" in message


# ------------------------------------------------------------ sharded state specs


@pytest.mark.parametrize(
    "specs",
    [
        P("data"),
        {"per_device": P("data")},
        {"per_*": P("data")},
        {lambda key, value: "per" in str(key): P("data")},
    ],
    ids=["spec", "glob", "glob-pattern", "predicate"],
)
def test_shard_map_state_specs(mesh, specs):
    tree, state = lift.export_state({"per_device": lift.StateEntry(jnp.zeros(8))})

    @shard_map(mesh=mesh, in_specs=P("data"), out_specs=P(), state_specs=specs)
    def partial_sums(x):
        # Each device keeps the sum of its own block: one element per device.
        lift.set(tree["per_device"], lift.get(tree["per_device"]) + jnp.sum(x))
        return lax.psum(jnp.sum(x), "data")

    x = jnp.arange(32.0)
    total, new = lift.jit(lift.stateful(partial_sums))(state, x)
    assert float(total) == pytest.approx(float(jnp.sum(x)))
    np.testing.assert_allclose(
        new[tree["per_device"]], np.asarray(x).reshape(8, 4).sum(axis=1)
    )
    assert new[tree["per_device"]].sharding.spec == P("data")


def test_shard_map_state_spec_by_state_key_and_replicated_rest(mesh):
    tree, state = lift.export_state(
        {"local": lift.StateEntry(jnp.zeros(8)), "seen": lift.StateEntry(jnp.zeros(()))}
    )

    @shard_map(
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
        state_specs={tree["local"]: P("data")},
    )
    def count(x):
        lift.set(tree["local"], lift.get(tree["local"]) + x.shape[0])
        lift.set(tree["seen"], lift.get(tree["seen"]) + lax.psum(x.shape[0], "data"))
        return x

    _, new = lift.stateful(count)(state, jnp.zeros(24))
    np.testing.assert_allclose(new[tree["local"]], np.full(8, 3.0))
    assert float(new[tree["seen"]]) == 24.0


def test_shard_map_rejects_bad_state_specs(mesh):
    _, state = _counter()
    f = shard_map(lambda x: x, mesh=mesh, in_specs=P(), out_specs=P(), state_specs=3)
    with pytest.raises(lift.LiftError, match="state_specs"):
        lift.stateful(f)(state, jnp.ones(8))


def test_shard_map_with_explicit_mesh_and_placed_state():
    mesh = jax.make_mesh((8,), ("data",))  # Explicit axes: inputs must be placed
    tree, state = lift.export_state({"per": lift.StateEntry(jnp.zeros(8))})
    state = jax.device_put(state, NamedSharding(mesh, P("data")))
    x = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("data")))

    @shard_map(
        mesh=mesh, in_specs=P("data"), out_specs=P("data"), state_specs=P("data")
    )
    def f(x):
        lift.set(tree["per"], lift.get(tree["per"]) + jnp.max(x))
        return x + 1

    out, new = lift.jit(lift.stateful(f))(state, x)
    np.testing.assert_allclose(new[tree["per"]], np.arange(1.0, 16.0, 2.0))
    assert new[tree["per"]].sharding.spec == P("data")
    assert out.sharding.spec == P("data")


# -------------------------------------------------------------------------- pmap


def test_pmap_state_axes():
    tree, state = lift.export_state(
        {"per": lift.StateEntry(jnp.zeros((3, 8))), "total": lift.StateEntry(0.0)}
    )
    state = {k: jnp.asarray(v, jnp.float32) for k, v in state.items()}

    def f(x):
        lift.set(tree["per"], lift.get(tree["per"]) + x)
        lift.set(tree["total"], lift.get(tree["total"]) + lax.psum(jnp.sum(x), "i"))
        return jnp.sum(x)

    x = jnp.arange(24.0).reshape(3, 8)
    mapped = pmap(f, "i", in_axes=1, state_axes={"per": 1})
    out, new = lift.stateful(mapped)(state, x)
    np.testing.assert_allclose(out, np.asarray(x).sum(axis=0))
    np.testing.assert_allclose(new[tree["per"]], x)
    assert float(new[tree["total"]]) == pytest.approx(float(jnp.sum(x)))


def test_pmap_state_axes_int_maps_every_key():
    tree, state = lift.export_state({"a": lift.StateEntry(jnp.zeros(4))})

    def f(x):
        lift.set(
            tree["a"], lift.get(tree["a"]) + x * lax.axis_index("i").astype(jnp.float32)
        )
        return x

    _, new = lift.stateful(pmap(f, "i", state_axes=0))(state, jnp.ones(4))
    np.testing.assert_allclose(new[tree["a"]], np.arange(4.0))


def _pmean_over_dev_and_batch(mean_key, calls):
    def f(x):
        calls.append(None)
        m = lax.pmean(x, ("dev", "batch"))
        lift.set(mean_key, 0.9 * lift.get(mean_key) + 0.1 * m)
        return x - m

    return f


def _reference_dev_and_batch(xs):
    def ref(s, x):
        m = lax.pmean(x, ("dev", "batch"))
        return x - m, 0.9 * s + 0.1 * m

    inner = jax.vmap(ref, in_axes=(None, 0), out_axes=(0, None), axis_name="batch")
    return jax.pmap(inner, "dev", in_axes=(None, 0), out_axes=(0, None))(
        jnp.zeros(3), xs
    )


def test_pmap_of_vmap_reduces_over_both_axes_like_jax():
    # JAX cannot track device-varying values through a collective over a device
    # axis and a vmapped axis together; lift.pmap then traces without tracking,
    # as jax.pmap does, and the results are jax.pmap(jax.vmap(...))'s, bit for bit.
    tree, state = lift.export_state({"mean": lift.StateEntry(jnp.zeros(3))})
    calls: list = []
    f = _pmean_over_dev_and_batch(tree["mean"], calls)
    step = lift.stateful(pmap(lift.vmap(f, axis_name="batch"), "dev"))
    xs = jnp.arange(2 * 4 * 3.0).reshape(2, 4, 3)
    out, new = step(state, xs)
    ref_out, ref_mean = _reference_dev_and_batch(xs)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(new[tree["mean"]], ref_mean)
    assert len(calls) == 2  # the documented second trace, once
    _, new = step(new, xs)  # state placed by pmap now: JAX may trace once more
    traced = len(calls)
    out3, _ = step(new, xs)
    assert len(calls) == traced  # compiled: the tracking choice was kept
    np.testing.assert_array_equal(out3, ref_out)


def test_pmap_check_vma_false_traces_once_and_true_refuses():
    tree, state = lift.export_state({"mean": lift.StateEntry(jnp.zeros(3))})
    xs = jnp.arange(2 * 4 * 3.0).reshape(2, 4, 3)
    calls: list = []
    f = _pmean_over_dev_and_batch(tree["mean"], calls)
    quiet = lift.stateful(pmap(lift.vmap(f, axis_name="batch"), "dev", check_vma=False))
    _, new = quiet(state, xs)
    assert len(calls) == 1
    np.testing.assert_array_equal(new[tree["mean"]], _reference_dev_and_batch(xs)[1])
    strict = lift.stateful(pmap(lift.vmap(f, axis_name="batch"), "dev", check_vma=True))
    with pytest.raises(ValueError, match="axis_name"):
        strict(state, xs)


def test_pmap_rejects_more_indices_than_devices():
    with pytest.raises(lift.LiftError, match="size 9"):
        pmap(lambda x: x)(jnp.ones(9))


# --------------------------------------------------- shardings through jit and scan


def _sharded_state(mesh):
    tree, state = lift.export_state(
        {
            "rows": lift.StateEntry(jnp.zeros((8, 4), jnp.float32)),
            "count": lift.StateEntry(jnp.zeros((), jnp.int32)),
        }
    )
    state = {
        tree["rows"]: jax.device_put(
            state[tree["rows"]], NamedSharding(mesh, P("data"))
        ),
        tree["count"]: jax.device_put(state[tree["count"]], NamedSharding(mesh, P())),
    }
    return tree, state


def _bump(tree, x):
    lift.set(tree["rows"], lift.get(tree["rows"]) + x)
    lift.set(tree["count"], lift.get(tree["count"]) + 1)
    return jnp.sum(x)


@pytest.mark.parametrize("donate", [False, True], ids=["keep", "donate"])
def test_jit_keeps_state_shardings(mesh, donate):
    tree, state = _sharded_state(mesh)
    shardings = {k: v.sharding for k, v in state.items()}
    step = lift.jit(lift.stateful(partial(_bump, tree)), donate_state=donate)
    x = jnp.ones((8, 4))
    old = state
    for _ in range(3):
        _, state = step(state, x)
    for key, sharding in shardings.items():
        assert state[key].sharding.is_equivalent_to(sharding, state[key].ndim), key
    np.testing.assert_allclose(state[tree["rows"]], np.full((8, 4), 3.0))
    assert int(state[tree["count"]]) == 3
    # Donated buffers are consumed; kept ones are not.
    assert old[tree["rows"]].is_deleted() == donate
    assert old[tree["count"]].is_deleted() == donate


_REUSE_DONATED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lift
mesh = Mesh(np.asarray(jax.devices()), ("data",))
tree, state = lift.export_state({"rows": lift.StateEntry(jnp.zeros((8, 4)))})
state = jax.device_put(state, NamedSharding(mesh, P("data")))
def bump():
    lift.set(tree["rows"], lift.get(tree["rows"]) + 1)
step = lift.jit(lift.stateful(bump), donate_state=True)
step(state)
try:
    step(state)
except lift.LiftError as err:
    print("LiftError:", err)
"""


def _run_on_eight_devices(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with 8 CPU devices: a crash fails the test."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_reusing_donated_sharded_state_is_an_error():
    # In a subprocess: without lift's check the process dies with SIGSEGV.
    proc = _run_on_eight_devices(_REUSE_DONATED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LiftError:" in proc.stdout
    assert "donate_state" in proc.stdout


_CONSUMED_INTO_COMPILED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lift
mesh = Mesh(np.asarray(jax.devices()), ("data",))
tree, state = lift.export_state(
    {"rows": lift.StateEntry(jnp.zeros((8, 4))), "total": lift.StateEntry(jnp.zeros(8))}
)
state = jax.device_put(state, NamedSharding(mesh, P("data")))
def bump(x):
    lift.set(tree["rows"], lift.get(tree["rows"]) + x)
    lift.set(tree["total"], lift.get(tree["total"]) + jnp.sum(x, 1))
    return jnp.sum(x)
evaluate = lift.jit(lift.stateful(bump))  # made before any donating jit
x = jnp.ones((8, 4))
evaluate(state, x)  # compiled: later calls are jax.jit's C++ dispatch
train = lift.jit(lift.stateful(bump), donate_state=True)
_, new = train(state, x)  # consumes `state`
later = lift.jit(lift.stateful(bump))  # made after it
later(new, x)
for name, fn in [("evaluate", evaluate), ("later", later)]:
    try:
        fn(state, x)
    except lift.LiftError as err:
        print(name, type(err).__name__, err)
print(evaluate(new, x)[0], later(new, x)[0])  # the live state still works
"""


def test_consumed_sharded_state_into_a_compiled_jit_is_an_error():
    # Issue 14.9: a multi-device state consumed by a donating step, passed to another
    # already-compiled lifted jit, killed the process (SIGSEGV) inside XLA. In a
    # subprocess, so that a crash fails this test instead of killing pytest.
    proc = _run_on_eight_devices(_CONSUMED_INTO_COMPILED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for name, line in zip(["evaluate", "later"], lines, strict=False):
        assert line.startswith(f"{name} LiftValueError"), proc.stdout
        for needed in ("['rows']", "['total']", "donate_state", "jnp.copy"):
            assert needed in line, line
    assert lines[2] == "32.0 32.0", proc.stdout


@pytest.mark.parametrize("donate", [False, True], ids=["keep", "donate"])
def test_jit_keeps_state_shardings_inside_a_frame(mesh, donate):
    tree, state = _sharded_state(mesh)
    shardings = {k: v.sharding for k, v in state.items()}

    def outer(x):
        return lift.jit(partial(_bump, tree), donate_state=donate)(x)

    _, new = lift.stateful(outer)(state, jnp.ones((8, 4)))
    for key, sharding in shardings.items():
        assert new[key].sharding.is_equivalent_to(sharding, new[key].ndim), key
    assert int(new[tree["count"]]) == 1


def test_scan_keeps_state_shardings(mesh):
    tree, state = _sharded_state(mesh)
    shardings = {k: v.sharding for k, v in state.items()}

    def run(xs):
        return lift.scan(lambda c, x: (c + _bump(tree, x), None), 0.0, xs)[0]

    xs = jnp.ones((5, 8, 4))
    total, new = lift.jit(lift.stateful(run))(state, xs)
    assert float(total) == pytest.approx(5 * 32.0)
    np.testing.assert_allclose(new[tree["rows"]], np.full((8, 4), 5.0))
    assert int(new[tree["count"]]) == 5
    for key, sharding in shardings.items():
        assert new[key].sharding.is_equivalent_to(sharding, new[key].ndim), key


def test_scan_over_layers_with_sharded_per_layer_state(mesh):
    layers, width = 3, 16
    w = jax.random.normal(jax.random.key(1), (layers, width, width)) / 4
    tree, state = lift.export_state(
        {"layers": {"ema": lift.StateEntry(jnp.zeros((layers, width)))}}
    )
    key = tree["layers"]["ema"]
    # One row of statistics per layer, each split over the devices.
    sharding = NamedSharding(mesh, P(None, "data"))
    sharded = {key: jax.device_put(state[key], sharding)}

    def layer(h, w_i):
        h = jnp.tanh(h @ w_i)
        lift.set(key, 0.5 * lift.get(key) + 0.5 * jnp.mean(h, axis=0))
        return h, None

    def net(x):
        return lift.scan(layer, x, w, state_axes={"layers.*": 0})[0]

    x = jax.random.normal(jax.random.key(2), (4, width))
    out, new = lift.jit(lift.stateful(net))(sharded, x)
    ref_out, ref = lift.stateful(net)(state, x)

    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    assert_states_close(new, ref, rtol=1e-5, atol=1e-6)
    # Each layer wrote its own row.
    h = x
    for i in range(layers):
        h = jnp.tanh(h @ w[i])
        np.testing.assert_allclose(new[key][i], 0.5 * jnp.mean(h, 0), rtol=1e-5)
    assert new[key].sharding.is_equivalent_to(sharding, 2)


# ------------------------------------------------- jit options on both paths


@pytest.fixture(params=[True, False], ids=["fast", "general"])
def jit_path(request):
    """Make lift.jit functions with the C++ dispatch layer on, then off."""
    from lift._jit import use_fast_path

    old = use_fast_path(request.param)
    yield request.param
    use_fast_path(old)


def test_jit_shardings_mean_what_jax_jit_says_at_top_level(mesh, jit_path):
    tree, state = _sharded_state(mesh)
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    pure = lift.stateful(partial(_bump, tree))
    options = {
        "in_shardings": (None, rows),
        "out_shardings": (replicated, {k: v.sharding for k, v in state.items()}),
    }
    step = lift.jit(pure, **options)
    expected = jax.jit(pure, **options)
    x = np.ones((8, 4), np.float32)  # a host array: placed by in_shardings
    out, new = step(state, x)
    ref_out, ref = expected(state, x)
    assert out.sharding.is_equivalent_to(ref_out.sharding, out.ndim)
    assert out.sharding.is_equivalent_to(replicated, out.ndim)
    for key in state:
        assert new[key].sharding.is_equivalent_to(ref[key].sharding, new[key].ndim)
    assert_states_close(new, ref)
    np.testing.assert_allclose(out, ref_out)
    # A Python number (static on lift's general path) does not shift the specs.
    scaled = lift.jit(
        lift.stateful(lambda x, k: _bump(tree, k * x)),
        in_shardings=(None, rows, None),
        out_shardings=(replicated, None),
    )
    out2, _ = scaled(state, x, 2.0)
    assert float(out2) == 2 * float(ref_out)
    assert out2.sharding.is_equivalent_to(replicated, out2.ndim)


def test_jit_shardings_inside_a_frame_speak_of_the_arguments(mesh, jit_path):
    tree, state = _sharded_state(mesh)
    shardings = {k: v.sharding for k, v in state.items()}
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    inner = lift.jit(
        lambda x: (_bump(tree, x), 2 * x), in_shardings=rows, out_shardings=replicated
    )
    total, doubled = lift.jit(lift.stateful(inner))(state, np.ones((8, 4)))[0]
    assert float(total) == 32.0
    assert doubled.sharding.is_equivalent_to(replicated, doubled.ndim)
    _, new = lift.stateful(inner)(state, np.ones((8, 4), np.float32))
    for key, sharding in shardings.items():
        assert new[key].sharding.is_equivalent_to(sharding, new[key].ndim), key
