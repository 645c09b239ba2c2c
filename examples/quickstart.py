"""Quickstart: train an MLP with BatchNorm on handwritten digits, with lift.

The model is a plain dict. Its BatchNorm running statistics are marked with
`lift.StateEntry`; `lift.export_state` takes them out as a dict keyed by path. The
training step reads and writes them with `lift.get`/`lift.set` as if they were mutable,
and `lift.jit(lift.stateful(step))` compiles it into a pure function
`(state, params, x, y) -> (out, new_state)`: once compiled, a call runs no lift code.
Evaluation reads the running statistics in inference mode,
`lift.stateful(..., mutable=False)`, where any `lift.set` is an error.

Data: scikit-learn's bundled digits (1,797 8x8 images, no download), split shuffled and
stratified, a quarter for testing (the same split in every example).
Run: python examples/quickstart.py   (LIFT_EXAMPLES_QUICK=1: a few steps, and the plot
goes to a temporary folder instead of examples/quickstart.png)
"""

import itertools
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import lift

matplotlib.use("Agg")
import matplotlib.pyplot as plt

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
STEPS, BATCH, LR, MOMENTUM = (20 if QUICK else 1500), 64, 0.1, 0.9


def make_model(key, sizes=(64, 128, 64, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, (n_in, n_out) in zip(keys, itertools.pairwise(sizes), strict=True):
        layer = {
            "w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2 / n_in),
            "b": jnp.zeros(n_out),
        }
        if n_out != sizes[-1]:  # BatchNorm on hidden layers: running statistics
            layer["bn"] = {
                "mean": lift.StateEntry(jnp.zeros(n_out)),
                "var": lift.StateEntry(jnp.ones(n_out)),
            }
        layers.append(layer)
    return layers


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


def batch_norm(bn, h, train):
    if train:  # normalise with the batch's statistics and update the running ones
        mean, var = h.mean(0), h.var(0)
        lift.set(bn["mean"], MOMENTUM * lift.get(bn["mean"]) + (1 - MOMENTUM) * mean)
        lift.set(bn["var"], MOMENTUM * lift.get(bn["var"]) + (1 - MOMENTUM) * var)
    else:  # evaluate with the running statistics, which are only read
        mean, var = lift.get(bn["mean"]), lift.get(bn["var"])
    return (h - mean) / jnp.sqrt(var + 1e-5)


def forward(model, x, train):
    for layer in model:
        x = x @ layer["w"] + layer["b"]
        if "bn" in layer:
            x = jax.nn.relu(batch_norm(layer["bn"], x, train))
    return x


def loss_fn(model, x, y):
    logp = jax.nn.log_softmax(forward(model, x, train=True))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@lift.jit
@lift.stateful
def train_step(model, x, y):
    loss, grads = lift.value_and_grad(loss_fn)(model, x, y)
    return jax.tree.map(lambda p, g: p - LR * g, model, grads), loss


@lift.jit
def accuracy(state, model, x, y):
    # Inference mode: the state is read, and a `lift.set` would raise.
    logits, _ = lift.stateful(forward, mutable=False)(state, model, x, train=False)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def main():
    x_tr, x_te, y_tr, y_te = digits_split()

    model, state = lift.export_state(make_model(jax.random.key(0)))
    print("The state: BatchNorm running statistics by path (lift.summary(state))")
    print(lift.summary(state))

    # Compile both steps before the progress bar starts, so its first ETA is honest
    # (the results of these two calls are discarded).
    jax.block_until_ready(train_step(state, model, x_tr[:BATCH], y_tr[:BATCH]))
    jax.block_until_ready(accuracy(state, model, x_te, y_te))

    rng = np.random.default_rng(0)
    history = {"step": [], "loss": [], "test accuracy": []}
    bar = tqdm(range(STEPS), desc="training", disable=QUICK)
    for step in bar:
        idx = rng.choice(len(x_tr), BATCH, replace=False)
        (model, loss), state = train_step(state, model, x_tr[idx], y_tr[idx])
        if step % 50 == 0 or step == STEPS - 1:
            acc = accuracy(state, model, x_te, y_te)
            history["step"].append(step)
            history["loss"].append(float(loss))
            history["test accuracy"].append(float(acc))
            bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{float(acc):.3f}")

    final = history["test accuracy"][-1]
    print(f"test accuracy after {STEPS} steps: {final:.3f}")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, name in zip(axes, ["loss", "test accuracy"], strict=True):
        ax.plot(history["step"], history[name])
        ax.set_xlabel("step")
        ax.set_title(name)
    fig.tight_layout()
    # Quick mode (CI) must not overwrite the full run's picture in examples/.
    folder = tempfile.mkdtemp() if QUICK else os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(folder, "quickstart.png")
    fig.savefig(out, dpi=100)
    print(f"saved {out}")
    if not QUICK and final < 0.95:
        raise SystemExit(f"expected >= 95% test accuracy, got {final:.1%}")


if __name__ == "__main__":
    main()
