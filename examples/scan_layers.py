"""Scan over layers: a deep residual MLP whose layers each keep BatchNorm statistics.

The layers are built with `lift.vmap` over their constructor, so their parameters and
their state are stacked along a leading axis. `lift.scan(..., state_axes={"*": 0})`
runs one compiled layer body over the stack: each step sees one layer's slice of the
statistics, and the updated slices are restacked. Compile time does not grow with depth.
Evaluation reads the statistics in inference mode (`lift.stateful(..., mutable=False)`).

Data: scikit-learn's digits, split shuffled and stratified, a quarter for testing (the
same split as the quickstart).

Run: python examples/scan_layers.py   (LIFT_EXAMPLES_QUICK=1 for a few steps)
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lift

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
DEPTH, WIDTH, STEPS, LR = 8, 64, (5 if QUICK else 300), 0.05


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


def make_layer(key):
    return {
        "w": jax.random.normal(key, (WIDTH, WIDTH)) * 0.5 / jnp.sqrt(WIDTH),
        "mean": lift.StateEntry(jnp.zeros(WIDTH)),
        "var": lift.StateEntry(jnp.ones(WIDTH)),
    }


def make_model(key):
    k_in, k_layers, k_out = jax.random.split(key, 3)
    return {
        "w_in": jax.random.normal(k_in, (64, WIDTH)) / 8.0,
        "layers": lift.vmap(make_layer)(jax.random.split(k_layers, DEPTH)),
        "w_out": jax.random.normal(k_out, (WIDTH, 10)) / jnp.sqrt(WIDTH),
    }


def layer_forward(layer, h, train):
    z = h @ layer["w"]
    if train:
        mean, var = z.mean(0), z.var(0)
        lift.set(layer["mean"], 0.9 * lift.get(layer["mean"]) + 0.1 * mean)
        lift.set(layer["var"], 0.9 * lift.get(layer["var"]) + 0.1 * var)
    else:  # the running statistics, only read
        mean, var = lift.get(layer["mean"]), lift.get(layer["var"])
    return h + jax.nn.relu((z - mean) / jnp.sqrt(var + 1e-5))


def forward(model, x, train):
    def body(h, layer):
        return layer_forward(layer, h, train), None

    h, _ = lift.scan(body, x @ model["w_in"], model["layers"], state_axes={"*": 0})
    return h @ model["w_out"]


def loss_fn(model, x, y):
    logits = forward(model, x, train=True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


@lift.jit
@lift.stateful
def train_step(model, x, y):
    loss, grads = lift.value_and_grad(loss_fn)(model, x, y)
    return jax.tree.map(lambda p, g: p - LR * g, model, grads), loss


@lift.jit
def accuracy(state, model, x, y):
    # Inference mode: the statistics are read, and a `lift.set` would raise.
    logits, _ = lift.stateful(forward, mutable=False)(state, model, x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def main():
    x_train, x_test, y_train, y_test = digits_split()

    model, state = lift.export_state(make_model(jax.random.key(0)))
    print(
        f"{len(state)} stacked state entries, e.g. {sorted(state)[0]}:",
        state[sorted(state)[0]].shape,
    )

    rng = np.random.default_rng(0)
    for step in range(STEPS):
        idx = rng.integers(0, len(x_train), 128)
        (model, loss), state = train_step(state, model, x_train[idx], y_train[idx])
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {float(loss):.3f}")

    acc = accuracy(state, model, x_test, y_test)
    print(f"test accuracy {float(acc):.3f} with {DEPTH} scanned layers")


if __name__ == "__main__":
    main()
