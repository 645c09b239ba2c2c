"""Small stateful models and helpers shared by the tests.

Each model comes as a builder (a pytree holding ``StateEntry``s), an implicit step that
uses ``lift.get``/``lift.set``, and a pure reference written with plain ``jnp`` math and
explicit threading, so tests can compare lift against hand-written JAX.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import lax

import lift

MOMENTUM = 0.9
EPS = 1e-5
FEATURES = 3


# ------------------------------------------------------------------------- counter


def make_counter(start: int = 0) -> tuple[dict, dict]:
    """An exported ``{"n": int32 counter}`` tree and its state."""
    return lift.export_state({"n": lift.StateEntry(jnp.asarray(start, jnp.int32))})


def tick(tree: dict, by: Any = 1) -> Any:
    """Increment the counter of ``tree`` (implicit); return its old value."""
    old = lift.get(tree["n"])
    lift.set(tree["n"], old + by)
    return old


# ---------------------------------------------------------------------- batch norm


def make_bn(features: int = FEATURES) -> dict:
    """A BatchNorm-like layer: parameters, running mean/var and a step counter."""
    return {
        "scale": jnp.linspace(0.5, 1.5, features, dtype=jnp.float32),
        "bias": jnp.linspace(-0.1, 0.1, features, dtype=jnp.float32),
        "mean": lift.StateEntry(jnp.zeros(features, jnp.float32)),
        "var": lift.StateEntry(jnp.ones(features, jnp.float32)),
        "count": lift.StateEntry(jnp.zeros((), jnp.int32)),
    }


def batch_stats(x: jax.Array, axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
    """Mean and (biased) variance over the batch.

    With ``axis_name``, ``x`` is one example under ``vmap`` and the statistics are
    ``pmean``-ed over the named axis; otherwise ``x`` is ``(batch, features)``.
    """
    if axis_name is None:
        mean = jnp.mean(x, axis=0, keepdims=True)
        return mean[0], jnp.mean((x - mean) ** 2, axis=0)
    mean = lax.pmean(x, axis_name)
    return mean, lax.pmean((x - mean) ** 2, axis_name)


def normalize(model: dict, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias``, broadcasting explicitly.

    The explicit broadcast keeps the helpers valid under strict rank promotion.
    """

    def lead(v: jax.Array) -> jax.Array:
        return jnp.reshape(v, (1,) * (x.ndim - v.ndim) + v.shape)

    scale = lead(model["scale"]) / jnp.sqrt(lead(var) + EPS)
    return (x - lead(mean)) * scale + lead(model["bias"])


def bn_step(model: dict, x: jax.Array, axis_name: Any = None) -> jax.Array:
    """Normalise ``x`` with batch statistics and update the running ones (implicit)."""
    mean, var = batch_stats(x, axis_name)
    lift.set(model["mean"], MOMENTUM * lift.get(model["mean"]) + (1 - MOMENTUM) * mean)
    lift.set(model["var"], MOMENTUM * lift.get(model["var"]) + (1 - MOMENTUM) * var)
    lift.set(model["count"], lift.get(model["count"]) + 1)
    return normalize(model, x, mean, var)


def bn_reference(
    model: dict, values: dict[str, Any], x: jax.Array
) -> tuple[jax.Array, dict[str, Any]]:
    """The same step, pure: ``values`` maps "mean"/"var"/"count" to arrays."""
    mean, var = batch_stats(x)
    new = {
        "mean": MOMENTUM * values["mean"] + (1 - MOMENTUM) * mean,
        "var": MOMENTUM * values["var"] + (1 - MOMENTUM) * var,
        "count": values["count"] + 1,
    }
    return normalize(model, x, mean, var), new


def bn_values(model: dict, state: dict) -> dict[str, Any]:
    """The running statistics of an exported BatchNorm ``model``, by name."""
    return {name: state[model[name]] for name in ("mean", "var", "count")}


# ------------------------------------------------------------------------- helpers


class TraceCounter:
    """Counts how often a function is traced (its Python body runs).

    For "traced at most ``n`` times" use ``chex.assert_max_traces``. This counter is
    for exact counts that must *grow* (a changed static argument retraces), and for
    functions traced with static arguments only, which Chex does not count (it counts
    calls whose arguments hold a tracer, and shows no count).
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        """Record one trace; call this inside the traced function."""
        self.count += 1


def assert_states_close(
    got: dict, expected: dict, *, rtol: float = 1e-6, atol: float = 1e-6
) -> None:
    """Same keys and structure, every leaf of the same shape and dtype, and close."""
    chex.assert_trees_all_close(got, expected, rtol=rtol, atol=atol, strict=True)
