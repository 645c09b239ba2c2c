"""An Equinox CNN with BatchNorm, converted to lift and trained on scikit-learn digits.

The model is plain Equinox: `eqx.nn.Conv2d`, `eqx.nn.BatchNorm` (which calls
`state.get`/`state.set` on an `eqx.nn.State`), built with `eqx.nn.make_with_state`.
`lift.equinox.from_equinox` moves its state into a lift state dict; `lift.equinox.lower`
makes it an implicit `x -> y` whose statistics update through the current frame. The
training step is then ordinary lift: `lift.vmap(..., axis_name="batch")` for BatchNorm's
batch axis, `lift.value_and_grad` (state threaded, never differentiated), `lift.jit`.
At the end, `to_equinox` gives back a model and an `eqx.nn.State` for Equinox's own API.

Run: python examples/equinox_batchnorm.py   (LIFT_EXAMPLES_QUICK=1 for a few steps)
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lift
import lift.equinox

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
STEPS, BATCH, LR = (5 if QUICK else 300), 64, 3e-3


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k_conv, k_head = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, kernel_size=3, padding=1, key=k_conv)
        self.bn = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch")
        self.head = eqx.nn.Linear(8 * 4 * 4, 10, key=k_head)

    def __call__(self, x, state):  # x: (1, 8, 8), one image; Equinox's convention
        x, state = self.bn(self.conv(x), state)
        x = jax.nn.relu(x).reshape(8, 4, 2, 4, 2).mean(axis=(2, 4))  # 2x2 pooling
        return self.head(x.reshape(-1)), state


def loss_fn(tree, images, labels):
    logits = lift.vmap(lift.equinox.lower(tree), axis_name="batch")(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


optimizer = optax.adam(LR)


@lift.jit
@lift.stateful
def train_step(tree, opt_state, images, labels):
    loss, grads = lift.value_and_grad(loss_fn)(tree, images, labels)
    params = eqx.filter(tree, eqx.is_array)
    updates, opt_state = optimizer.update(
        eqx.filter(grads, eqx.is_array), opt_state, params
    )
    return eqx.apply_updates(tree, updates), opt_state, loss


def accuracy(tree, images, labels):
    model = lift.equinox.lower(eqx.nn.inference_mode(tree))
    logits = lift.vmap(model, axis_name="batch")(images)
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# Inference: an immutable frame, so any state write would be an error.
evaluate = lift.jit(lift.stateful(accuracy, mutable=False))


def main():
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int32)
    # The quickstart's split: shuffled, stratified, a quarter for testing.
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )

    model, eqx_state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
    tree, state = lift.equinox.from_equinox(model, eqx_state)
    print("state keys:", sorted(state))
    opt_state = optimizer.init(eqx.filter(tree, eqx.is_array))

    rng = np.random.default_rng(0)
    for step in range(STEPS):
        idx = rng.choice(len(train_x), BATCH, replace=False)
        (tree, opt_state, loss), state = train_step(
            state, tree, opt_state, train_x[idx], train_y[idx]
        )
        if step % max(1, STEPS // 10) == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {float(loss):.4f}")

    acc, _ = evaluate(state, tree, test_x, test_y)
    print(f"test accuracy {float(acc):.3f}")
    # Back to Equinox: the same model and an `eqx.nn.State` with the trained statistics.
    model, eqx_state = lift.equinox.to_equinox(tree, state)
    counter = eqx_state.get(model.bn.batch_counter)
    print("BatchNorm updates seen by Equinox's State:", int(counter))


if __name__ == "__main__":
    main()
