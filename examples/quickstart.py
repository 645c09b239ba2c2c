"""Quickstart: mark state in a model, export it, and look at the keys.

A model is any pytree. `lift.StateEntry` marks the parts that change as the model
runs (here BatchNorm-style running statistics and a step counter);
`lift.export_state` swaps each entry for a `lift.StateKey` and returns the state as
a flat dict keyed by path.

Run: python examples/quickstart.py   (LIFT_EXAMPLES_QUICK=1 for a smaller model)
"""

import os

import jax
import jax.numpy as jnp

import lift

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
WIDTH = 4 if QUICK else 32


def make_model(key):
    k1, k2 = jax.random.split(key)
    return {
        "dense1": {"w": jax.random.normal(k1, (WIDTH, WIDTH)), "b": jnp.zeros(WIDTH)},
        "bn": {
            "mean": lift.StateEntry(jnp.zeros(WIDTH)),
            "var": lift.StateEntry(jnp.ones(WIDTH)),
        },
        "dense2": {"w": jax.random.normal(k2, (WIDTH, 1)), "b": jnp.zeros(1)},
        "steps": lift.StateEntry(jnp.zeros((), jnp.int32)),
    }


def main():
    model, state = lift.export_state(make_model(jax.random.key(0)))
    print("state keys:")
    for key, value in state.items():
        print(f"  {key}: {value.dtype}{list(value.shape)}")
    # The exported model holds keys where the entries were.
    assert model["bn"]["mean"] in state
    # import_state is the exact inverse.
    restored = lift.import_state(model, state)
    assert isinstance(restored["steps"], lift.StateEntry)


if __name__ == "__main__":
    main()
