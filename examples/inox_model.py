"""An Inox MLP with BatchNorm, converted to lift and trained on scikit-learn digits.

The model is plain Inox: `inox.nn.Linear`, `inox.nn.BatchNorm` (which reads
`state[self.stats]` and returns `update_state(...)`), and a user-written module that
counts the images it saw. `lift.inox.from_inox` swaps Inox's `StateEntry`s for lift
keys; `lift.inox.lower` makes the module an implicit `x -> y` whose state updates go
through the current frame. Training differentiates only `inox.nn.Parameter`s, as Inox
does, with `lift.value_and_grad` under `lift.jit`. At the end, `to_inox` gives back an
exported Inox module and state dict.

Run: python examples/inox_model.py   (LIFT_EXAMPLES_QUICK=1 for a few steps)
"""

import os

import inox.nn as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lift
import lift.inox

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
STEPS, BATCH, LR = (5 if QUICK else 300), 64, 3e-3


class Seen(nn.Module):
    """A user-written stateful module: counts the training examples it saw."""

    def __init__(self):
        self.count = nn.StateEntry(jnp.zeros((), jnp.int32))
        self.training = True  # toggled by Inox's `module.train(mode)`

    def __call__(self, x, state):
        if not self.training:
            return x, state
        return x, nn.update_state(state, {self.count: state[self.count] + len(x)})


class MLP(nn.Module):
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.seen = Seen()
        self.l1 = nn.Linear(64, 64, key=k1)
        self.bn = nn.BatchNorm(64)
        self.l2 = nn.Linear(64, 10, key=k2)

    def __call__(self, x, state):  # x: (N, 64), a batch; Inox's convention
        x, state = self.seen(x, state)
        x, state = self.bn(self.l1(x), state)
        return self.l2(jax.nn.relu(x)), state


optimizer = optax.adam(LR)


@lift.jit
@lift.stateful
def train_step(tree, opt_state, images, labels):
    static, params, others = tree.partition(nn.Parameter)

    def loss_fn(params):
        logits = lift.inox.lower(static(params, others))(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = lift.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return static(optax.apply_updates(params, updates), others), opt_state, loss


def accuracy(tree, images, labels):
    logits = lift.inox.lower(tree)(images)
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# Inference: an immutable frame, so any state write would be an error.
evaluate = lift.jit(lift.stateful(accuracy, mutable=False))


def main():
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    # The quickstart's split: shuffled, stratified, a quarter for testing.
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )

    tree, state = lift.inox.from_inox(MLP(jax.random.key(0)))
    print("state keys:", sorted(state))
    opt_state = optimizer.init(tree.partition(nn.Parameter)[1])

    rng = np.random.default_rng(0)
    for step in range(STEPS):
        idx = rng.choice(len(train_x), BATCH, replace=False)
        (tree, opt_state, loss), state = train_step(
            state, tree, opt_state, train_x[idx], train_y[idx]
        )
        if step % max(1, STEPS // 10) == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {float(loss):.4f}")

    tree.train(False)  # Inox's evaluation mode: BatchNorm uses its running statistics
    acc, _ = evaluate(state, tree, test_x, test_y)
    print(f"test accuracy {float(acc):.3f}")
    module, inox_state = lift.inox.to_inox(tree, state)
    print("examples seen, from Inox's state:", int(inox_state[module.seen.count]))


if __name__ == "__main__":
    main()
