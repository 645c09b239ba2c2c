"""A small ResNet with BatchNorm, trained with lift on the scikit-learn digits.

The model is a plain dict of arrays. Each BatchNorm keeps its running mean and
variance in the dict as `lift.StateEntry`s; `lift.export_state` swaps them for keys, and
the layers read and write them with `lift.get`/`lift.set`. The training step is an
ordinary function over the weights, made pure by `lift.stateful` and compiled by
`lift.jit` (the statistics donated, so no copy of them is kept). Inference runs the
same layers under `lift.stateful(..., mutable=False)`: they read the running statistics,
and any write would raise.

Half-way, the statistics, the weights and Adam's moments go to one state file
(`lift.save_state`); at the end the run is resumed from that file (`lift.load_state`)
and must reproduce the uninterrupted run's losses exactly.

Run: python examples/resnet_digits.py   (LIFT_EXAMPLES_QUICK=1 for a few steps)
"""

import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import lift

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
STEPS = 40 if QUICK else 800
EVAL_EVERY = 10 if QUICK else 50
BATCH, CHANNELS, BLOCKS = 64, 16, 2
MOMENTUM, EPS = 0.9, 1e-5
optimizer = optax.adam(3e-3)


# --------------------------------------------------------------------------- model


def conv_bn(key, cin):
    """A 3x3 convolution (HWIO kernel, He-normal) and its BatchNorm's statistics."""
    kernel = jax.random.normal(key, (3, 3, cin, CHANNELS)) * (2 / (9 * cin)) ** 0.5
    return {
        "kernel": kernel,
        "mean": lift.StateEntry(jnp.zeros(CHANNELS)),
        "var": lift.StateEntry(jnp.ones(CHANNELS)),
    }


def init_model(key):
    keys = jax.random.split(key, 2 + 2 * BLOCKS)
    model = {"stem": conv_bn(keys[0], 1)}
    for b in range(BLOCKS):
        model[f"block{b}"] = {
            "conv1": conv_bn(keys[1 + 2 * b], CHANNELS),
            "conv2": conv_bn(keys[2 + 2 * b], CHANNELS),
        }
    w = jax.random.normal(keys[-1], (CHANNELS, 10)) / CHANNELS**0.5
    model["head"] = {"w": w, "b": jnp.zeros(10)}
    return model


def conv_bn_apply(layer, h, train):
    """Convolution, then BatchNorm: batch statistics in training, running ones after."""
    h = jax.lax.conv_general_dilated(
        h, layer["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    if train:
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        for name, batch in (("mean", mean), ("var", var)):
            old = lift.get(layer[name])
            lift.set(layer[name], MOMENTUM * old + (1 - MOMENTUM) * batch)
    else:
        mean, var = lift.get(layer["mean"]), lift.get(layer["var"])
    return (h - mean) * jax.lax.rsqrt(var + EPS)


def resnet(model, images, train):
    h = jax.nn.relu(conv_bn_apply(model["stem"], images, train))
    for b in range(BLOCKS):
        block = model[f"block{b}"]
        r = jax.nn.relu(conv_bn_apply(block["conv1"], h, train))
        h = jax.nn.relu(conv_bn_apply(block["conv2"], r, train) + h)
    return h.mean((1, 2)) @ model["head"]["w"] + model["head"]["b"]


# ------------------------------------------------------------------ train and test


def loss_fn(model, images, labels):
    logits = resnet(model, images, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@lift.jit(donate_state=True)
@lift.stateful
def train_step(model, opt_state, images, labels):
    # The statistics are threaded through the gradient, never differentiated.
    loss, grads = lift.value_and_grad(loss_fn)(model, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, model)
    return optax.apply_updates(model, updates), opt_state, loss


def accuracy(model, images, labels):
    logits = resnet(model, images, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# Inference mode: the layers read the running statistics; a write would raise.
accuracy_step = lift.jit(lift.stateful(accuracy, mutable=False))


def evaluate(state, model, images, labels):
    acc, _ = accuracy_step(state, model, images, labels)
    return float(acc)


# ---------------------------------------------------------------- one state file


def save_checkpoint(path, state, model, opt_state):
    """The statistics, the weights and Adam's moments, in one state file."""
    keys, extra = lift.export_state(
        {
            "weights": lift.StateEntry(jax.tree.leaves(model)),
            "adam": lift.StateEntry(jax.tree.leaves(opt_state)),
        },
        prefix="checkpoint",
    )
    lift.save_state(path, lift.merge_states(state, extra))
    return keys, extra


def load_checkpoint(path, state, model, opt_state, keys, extra):
    """Read a file of :func:`save_checkpoint`; ``like`` checks every array in it."""
    loaded = lift.load_state(path, like=lift.merge_states(state, extra))
    weights, adam, state = lift.partition_state(loaded, keys["weights"], keys["adam"])
    weights, adam = weights[keys["weights"]], adam[keys["adam"]]
    model = jax.tree.unflatten(jax.tree.structure(model), weights)
    opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), adam)
    return state, model, opt_state


def train(state, model, opt_state, steps, order, train_xy, on_step=None):
    """``steps`` steps on the batches ``order[i]``; returns the losses too."""
    losses = []
    for i in steps:
        images, labels = train_xy[0][order[i]], train_xy[1][order[i]]
        (model, opt_state, loss), state = train_step(
            state, model, opt_state, images, labels
        )
        losses.append(float(loss))
        if on_step is not None:
            on_step(i, state, model, opt_state)
    return state, model, opt_state, losses


def main():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1)
    labels = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, stratify=labels, shuffle=True, random_state=0
    )
    train_xy = (jnp.asarray(train_x), jnp.asarray(train_y))
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    rng = np.random.default_rng(0)
    order = [rng.choice(len(train_y), BATCH, replace=False) for _ in range(STEPS)]

    model, state = lift.export_state(init_model(jax.random.key(0)))
    opt_state = optimizer.init(model)
    print(f"{len(state)} state entries, e.g. {min(state)}")
    folder = tempfile.TemporaryDirectory(prefix="resnet-digits-")
    checkpoint = Path(folder.name) / "half-way.lift"
    half = STEPS // 2
    bar = tqdm(total=STEPS, desc="training")
    evals = []  # (step, test accuracy)
    saved = {}

    def on_step(i, state, model, opt_state):
        bar.update()
        if i + 1 == half:
            saved["keys"] = save_checkpoint(checkpoint, state, model, opt_state)
        if (i + 1) % EVAL_EVERY == 0 or i + 1 == STEPS:
            evals.append((i + 1, evaluate(state, model, test_x, test_y)))
            bar.set_postfix(test_accuracy=f"{evals[-1][1]:.3f}")

    state, model, opt_state, losses = train(
        state, model, opt_state, range(STEPS), order, train_xy, on_step
    )
    bar.close()
    final = evaluate(state, model, test_x, test_y)
    print(f"test accuracy {final:.4f} after {STEPS} steps")

    # Resume from the file written half-way: the same batches give the same numbers.
    like = (state, model, opt_state)
    resumed = load_checkpoint(checkpoint, *like, *saved["keys"])
    state2, model2, _, losses2 = train(*resumed, range(half, STEPS), order, train_xy)
    assert losses2 == losses[half:], "the resumed run must repeat the losses exactly"
    assert evaluate(state2, model2, test_x, test_y) == final
    print(
        f"resumed from {checkpoint.name} at step {half}: the same losses, bit for bit"
    )
    folder.cleanup()
    if not QUICK:
        assert final >= 0.97, f"test accuracy {final:.4f} < 0.97"

    out = Path(tempfile.mkdtemp()) if QUICK else Path(__file__).resolve().parent
    plot(losses, evals, out / "resnet_digits.png")


def plot(losses, evals, path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(np.arange(1, len(losses) + 1), losses, lw=0.7)
    left.set(xlabel="step", ylabel="training loss", yscale="log")
    steps, accs = zip(*evals, strict=True)
    right.plot(steps, accs, marker="o", ms=3)
    right.set(xlabel="step", ylabel="test accuracy", ylim=(min(accs) - 0.02, 1.0))
    fig.suptitle("ResNet with BatchNorm on the digits, trained with lift")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
