"""Data-parallel training: a BatchNorm MLP on 8 (simulated) devices with lift.shard_map.

Each device gets 1/8 of every batch. Inside `lift.shard_map` the function sees its own
block; the batch statistics and the gradients are averaged over the mesh axis "data"
with `lax.pmean`, so the replicated parameters and running statistics stay identical
on every device. (Writing an un-averaged statistic into replicated state is an error
naming the key.) The same script runs on several hosts after
`jax.distributed.initialize()`: the mesh over `jax.devices()` then spans all of them.
Evaluation reads the statistics in inference mode (`lift.stateful(..., mutable=False)`).

Data: scikit-learn's digits, split shuffled and stratified, a quarter for testing (the
same split as the quickstart).

Run: python examples/data_parallel.py   (LIFT_EXAMPLES_QUICK=1 for a few steps)
"""

import os

# Before JAX starts: ask for 8 CPU devices (the flag affects the CPU backend only).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lift

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
HIDDEN, BATCH, STEPS, LR = 128, 256, (5 if QUICK else 400), 0.1

mesh = Mesh(np.asarray(jax.devices()), ("data",))
k1, k2 = jax.random.split(jax.random.key(0))
params = {
    "w1": jax.random.normal(k1, (64, HIDDEN)) / 8.0,
    "w2": jax.random.normal(k2, (HIDDEN, 10)) / np.sqrt(HIDDEN),
    "b2": jnp.zeros(10),
}
bn, state = lift.export_state(
    {
        "mean": lift.StateEntry(jnp.zeros(HIDDEN)),
        "var": lift.StateEntry(jnp.ones(HIDDEN)),
    }
)


def digits_split():
    """Digits as (x_train, x_test, y_train, y_test): shuffled, stratified, 25% test."""
    digits = load_digits()
    return train_test_split(
        (digits.data / 16.0).astype(np.float32),
        digits.target.astype(np.int32),
        test_size=0.25,
        random_state=0,
        stratify=digits.target,
    )


def forward(params, x, train):
    h = x @ params["w1"]
    if train:  # statistics of the whole global batch, not of this device's block
        mean = lax.pmean(h.mean(0), "data")
        var = lax.pmean(((h - mean) ** 2).mean(0), "data")
        lift.set(bn["mean"], 0.9 * lift.get(bn["mean"]) + 0.1 * mean)
        lift.set(bn["var"], 0.9 * lift.get(bn["var"]) + 0.1 * var)
    else:
        mean, var = lift.get(bn["mean"]), lift.get(bn["var"])
    h = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5))
    return h @ params["w2"] + params["b2"]


def loss_fn(params, x, y):
    logp = jax.nn.log_softmax(forward(params, x, train=True))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@lift.jit
@lift.stateful
@lift.shard_map(mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()))
def train_step(params, x, y):
    # Each device differentiates its own loss w.r.t. its own copy of the parameters.
    local = lax.pcast(params, "data", to="varying")
    loss, grads = lift.value_and_grad(loss_fn)(local, x, y)
    grads, loss = lax.pmean((grads, loss), "data")
    return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss


@lift.jit
def accuracy(state, params, x, y):
    # Inference mode: the statistics are read, and a `lift.set` would raise.
    logits, _ = lift.stateful(forward, mutable=False)(state, params, x, False)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def main():
    x_train, x_test, y_train, y_test = digits_split()
    rows = NamedSharding(mesh, P("data"))
    global params, state
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        idx = rng.choice(len(x_train), BATCH, replace=False)
        # Place each batch split over the devices (on several hosts, build it with
        # `jax.make_array_from_process_local_data(rows, local_rows)`).
        xb, yb = jax.device_put((x_train[idx], y_train[idx]), rows)
        (params, loss), state = train_step(state, params, xb, yb)
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {float(loss):.4f}")
    acc = float(accuracy(state, params, x_test, y_test))
    print(f"test accuracy {acc:.3f} on {len(jax.devices())} devices")
    print("running mean sharding:", state[bn["mean"]].sharding.spec)
    if not QUICK:
        assert acc > 0.9, acc


if __name__ == "__main__":
    main()
