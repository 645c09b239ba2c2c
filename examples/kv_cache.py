"""Autoregressive decoding with a KV cache, stepped by `lift.scan`.

The attention layer keeps its key/value cache and the write position as state. Each
decoding step reads the cache, writes one new row and advances the position; `lift.scan`
carries all of it through the loop. At the end we check that incremental decoding gives
the same logits as one causal attention pass over the whole generated sequence.

Run: python examples/kv_cache.py   (LIFT_EXAMPLES_QUICK=1 for a short sequence)
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

import lift

QUICK = os.environ.get("LIFT_EXAMPLES_QUICK") == "1"
VOCAB, DIM, MAX_LEN = 32, 16, (8 if QUICK else 64)


def make_decoder(key):
    ks = jax.random.split(key, 5)
    return {
        "embed": jax.random.normal(ks[0], (VOCAB, DIM)),
        "wq": jax.random.normal(ks[1], (DIM, DIM)) / jnp.sqrt(DIM),
        "wk": jax.random.normal(ks[2], (DIM, DIM)) / jnp.sqrt(DIM),
        "wv": jax.random.normal(ks[3], (DIM, DIM)) / jnp.sqrt(DIM),
        "unembed": jax.random.normal(ks[4], (DIM, VOCAB)) / jnp.sqrt(DIM),
        "cache": {
            "k": lift.StateEntry(jnp.zeros((MAX_LEN, DIM))),
            "v": lift.StateEntry(jnp.zeros((MAX_LEN, DIM))),
            "pos": lift.StateEntry(jnp.zeros((), jnp.int32)),
        },
    }


def decode_step(model, token):
    """One token in, next-token logits out; appends to the cache."""
    cache = model["cache"]
    x = model["embed"][token]
    pos = lift.get(cache["pos"])
    keys = lift.get(cache["k"]).at[pos].set(x @ model["wk"])
    values = lift.get(cache["v"]).at[pos].set(x @ model["wv"])
    lift.set(cache["k"], keys)
    lift.set(cache["v"], values)
    lift.set(cache["pos"], pos + 1)
    scores = keys @ (x @ model["wq"]) / jnp.sqrt(DIM)
    scores = jnp.where(jnp.arange(MAX_LEN) <= pos, scores, -jnp.inf)
    return (jax.nn.softmax(scores) @ values) @ model["unembed"]


@lift.jit
@lift.stateful
def generate(model, first_token):
    def body(token, _):
        logits = decode_step(model, token)
        next_token = jnp.argmax(logits).astype(jnp.int32)
        return next_token, (token, logits)

    _, (tokens, logits) = lift.scan(body, first_token, None, length=MAX_LEN)
    return tokens, logits


def full_attention(model, tokens):
    """The same layer without a cache: causal attention over the whole sequence."""
    x = model["embed"][tokens]
    q, k, v = x @ model["wq"], x @ model["wk"], x @ model["wv"]
    scores = q @ k.T / jnp.sqrt(DIM)
    causal = jnp.tril(jnp.ones((len(tokens), len(tokens)), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    return (jax.nn.softmax(scores) @ v) @ model["unembed"]


def main():
    model, state = lift.export_state(make_decoder(jax.random.key(0)))
    print("state:", {str(k): v.shape for k, v in state.items()})

    (tokens, logits), state = generate(state, model, jnp.asarray(3, jnp.int32))
    print("generated:", np.asarray(tokens).tolist())
    print("cache position after decoding:", int(state[model["cache"]["pos"]]))

    reference = full_attention(model, tokens)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)
    print("incremental decoding matches full causal attention")


if __name__ == "__main__":
    main()
