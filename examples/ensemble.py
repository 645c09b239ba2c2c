"""A vmapped ensemble: eight classifiers trained at once, each with its own statistics.

Each member has BatchNorm-style running statistics. Building the members with
`lift.vmap` over the constructor stacks their parameters *and* their state; `lift.vmap`
then maps that state over the members automatically (its keys are inside the mapped
argument), so no state axis has to be spelled out. The ensemble is evaluated in
inference mode (`lift.stateful(..., mutable=False)`), reading the running statistics.

Data: scikit-learn's digits, split shuffled and stratified, a quarter for testing (the
same split as the quickstart).
Run: python examples/ensemble.py   (LIFT_EXAMPLES_QUICK=1 for a few steps)
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lift

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
MEMBERS, HIDDEN, STEPS, LR = 8, 32, (5 if QUICK else 400), 0.1


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


def make_member(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (64, HIDDEN)) / 8.0,
        "w2": jax.random.normal(k2, (HIDDEN, 10)) / jnp.sqrt(HIDDEN),
        "bn": {
            "mean": lift.StateEntry(jnp.zeros(HIDDEN)),
            "var": lift.StateEntry(jnp.ones(HIDDEN)),
        },
    }


def member_forward(member, x, train):
    h = x @ member["w1"]
    bn = member["bn"]
    if train:
        mean, var = h.mean(0), h.var(0)
        lift.set(bn["mean"], 0.9 * lift.get(bn["mean"]) + 0.1 * mean)
        lift.set(bn["var"], 0.9 * lift.get(bn["var"]) + 0.1 * var)
    else:  # the running statistics, only read
        mean, var = lift.get(bn["mean"]), lift.get(bn["var"])
    h = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5))
    return h @ member["w2"]


def member_loss(member, x, y):
    logits = member_forward(member, x, train=True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def member_step(member, x, y):
    loss, grads = lift.value_and_grad(member_loss)(member, x, y)
    return jax.tree.map(lambda p, g: p - LR * g, member, grads), loss


# Each member gets its own bootstrap batch: map over members and batches together.
train_step = lift.jit(lift.stateful(lift.vmap(member_step, in_axes=(0, 0, 0))))


@lift.jit
def predict(state, members, x):
    # Inference mode: the members' statistics are read, and a `lift.set` would raise.
    forward = lift.vmap(member_forward, in_axes=(0, None, None))
    logits, _ = lift.stateful(forward, mutable=False)(state, members, x, False)
    return jax.nn.softmax(logits).mean(0)  # average the members' probabilities


def main():
    x_train, x_test, y_train, y_test = digits_split()

    members = lift.vmap(make_member)(jax.random.split(jax.random.key(0), MEMBERS))
    members, state = lift.export_state(members)
    print({str(k): v.shape for k, v in state.items()})  # one row of state per member

    rng = np.random.default_rng(0)
    for step in range(STEPS):
        idx = rng.integers(0, len(x_train), (MEMBERS, 64))
        (members, losses), state = train_step(
            state, members, x_train[idx], y_train[idx]
        )
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  member losses {np.round(np.asarray(losses), 2)}")

    probs = predict(state, members, x_test)
    acc = jnp.mean(jnp.argmax(probs, -1) == y_test)
    print(f"ensemble test accuracy {float(acc):.3f}")


if __name__ == "__main__":
    main()
