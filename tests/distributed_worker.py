"""A BatchNorm MLP trained data-parallel with lift, and one process of a multi-host run.

Imported by the tests (``make_mlp``, ``train_step``, ``make_data``, the reference
``train_single``), and run as a script by ``tests/test_distributed.py``:

    python tests/distributed_worker.py PORT NUM_PROCESSES PROCESS_ID STEPS OUT.npz

Each process sees 4 CPU devices; after ``jax.distributed.initialize`` the mesh over
``jax.devices()`` spans all of them. Every process builds the same model and the same
global batch, feeds its own rows, and writes the final parameters and running
statistics to ``OUT.npz``.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any

import jax


def initialize(port: int, num_processes: int, process_id: int) -> None:
    """Join the run: gloo collectives on CPU, coordinator on loopback."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )


if __name__ == "__main__":
    # Before anything starts a JAX backend: `import lift` does today (reported).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    initialize(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import lift  # noqa: E402

N_IN, HIDDEN, CLASSES = 6, 16, 3
BATCH = 32
MOMENTUM, EPS, LR = 0.9, 1e-5, 0.2


def make_mlp(seed: int = 0) -> tuple[dict, dict, dict]:
    """``(model, params, state)``: the exported tree holds the BatchNorm state keys."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w1": jax.random.normal(k1, (N_IN, HIDDEN), jnp.float32) / np.sqrt(N_IN),
        "b1": jnp.zeros(HIDDEN, jnp.float32),
        "scale": jnp.ones(HIDDEN, jnp.float32),
        "bias": jnp.zeros(HIDDEN, jnp.float32),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES), jnp.float32) / np.sqrt(HIDDEN),
        "b2": jnp.zeros(CLASSES, jnp.float32),
    }
    model, state = lift.export_state(
        {
            "bn": {
                "mean": lift.StateEntry(jnp.zeros(HIDDEN, jnp.float32)),
                "var": lift.StateEntry(jnp.ones(HIDDEN, jnp.float32)),
            }
        }
    )
    return model, params, state


def make_data(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of ``step``: the same in every process."""
    rng = np.random.default_rng(step)
    x = rng.normal(size=(BATCH, N_IN)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return x, y


def forward(model: dict, params: dict, x: Any, axis_name: Any = None) -> Any:
    """Logits; updates the running statistics with lift.get/set (implicit)."""
    h = x @ params["w1"] + params["b1"][None]
    mean = jnp.mean(h, axis=0)
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(h - mean[None]), axis=0)
    if axis_name is not None:
        var = lax.pmean(var, axis_name)
    bn = model["bn"]
    lift.set(bn["mean"], MOMENTUM * lift.get(bn["mean"]) + (1 - MOMENTUM) * mean)
    lift.set(bn["var"], MOMENTUM * lift.get(bn["var"]) + (1 - MOMENTUM) * var)
    h = (h - mean[None]) * (lax.rsqrt(var + EPS) * params["scale"])[None]
    return jax.nn.relu(h + params["bias"][None]) @ params["w2"] + params["b2"][None]


def loss_fn(model: dict, params: dict, x: Any, y: Any, axis_name: Any = None) -> Any:
    """Mean cross-entropy over the (local) batch."""
    logits = forward(model, params, x, axis_name)
    onehot = jax.nn.one_hot(y, CLASSES, dtype=logits.dtype)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, axis=-1))


def train_step(
    model: dict, params: dict, x: Any, y: Any, axis_name: Any = None
) -> tuple[dict, Any]:
    """One SGD step (implicit state). With ``axis_name``, ``x``/``y`` are one shard.

    Each device differentiates its own loss with respect to its own copy of the
    parameters (``pcast`` to device-varying), then the gradients are averaged.
    """
    local = params
    if axis_name is not None:
        local = lax.pcast(params, axis_name, to="varying")
    loss, grads = lift.value_and_grad(lambda p: loss_fn(model, p, x, y, axis_name))(
        local
    )
    if axis_name is not None:
        grads, loss = lax.pmean((grads, loss), axis_name)
    new = jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads)
    return new, loss


def train_single(steps: int, seed: int = 0) -> tuple[dict, dict, dict]:
    """Single-device training on the full batch: ``(model, params, state)``."""
    model, params, state = make_mlp(seed)
    step = lift.jit(lift.stateful(partial(train_step, model)))
    for i in range(steps):
        x, y = make_data(i)
        (params, _), state = step(state, params, x, y)
    return model, params, state


def flat_result(model: dict, params: dict, state: dict) -> dict[str, np.ndarray]:
    """Parameters and statistics by name, as host numpy arrays (for ``np.savez``)."""
    out = {f"params.{k}": np.asarray(v) for k, v in params.items()}
    for name in ("mean", "var"):
        out[f"bn.{name}"] = np.asarray(state[model["bn"][name]])
    return out


def main(num_processes: int, process_id: int, steps: int, out: str) -> None:
    """One process of the multi-host run (after :func:`initialize`)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        assert jax.process_count() == num_processes, jax.process_count()
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        rows = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        model, params, state = make_mlp()
        # Parameters and state are global arrays replicated over every device.
        params, state = jax.device_put((params, state), replicated)
        step = lift.jit(
            lift.stateful(
                lift.shard_map(
                    partial(train_step, model, axis_name="data"),
                    mesh=mesh,
                    in_specs=(P(), P("data"), P("data")),
                    out_specs=(P(), P()),
                )
            )
        )
        per_process = BATCH // num_processes
        lo = process_id * per_process
        for i in range(steps):
            x, y = make_data(i)
            # Each process holds only its own rows of the global batch.
            gx = jax.make_array_from_process_local_data(rows, x[lo : lo + per_process])
            gy = jax.make_array_from_process_local_data(rows, y[lo : lo + per_process])
            (params, loss), state = step(state, params, gx, gy)
        result = flat_result(model, params, state)
        result["loss"] = np.asarray(loss)
        np.savez(out, **result)
        print(f"process {process_id}: done, loss {float(loss):.6f}", flush=True)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    _, n_, i_, steps_, out_ = sys.argv[1:6]
    main(int(n_), int(i_), int(steps_), out_)
