"""Train-step dispatch: ``lift.jit(lift.stateful(step))`` vs a hand-written ``jax.jit``.

The step: ``layers`` times (Linear 16->16, then BatchNorm-style normalisation whose
batch mean and variance update running statistics), a squared loss on a batch of 8,
``value_and_grad``, SGD. The hand-written step carries the statistics explicitly in a
dict with ``str`` keys; the lift step reads and writes them with ``lift.get`` and
``lift.set`` on keys made by ``lift.export_state``. Same math, so the same jaxpr.

Measures: the per-call time of one layer's step (ratio, target <= 1.05; each side
is the mean of three separately compiled copies); two anchor
rows split it into what the data layout costs (the same explicit step written by hand,
with the statistics keyed by the ``StateKey`` s that live in the model) and what lift's
own code adds on top of that. Also the added time per extra stateful layer (slope over
1..32 layers, every count of both steps in the same interleaved rounds; target <= 1.1 x
hand-written) and the jaxpr equation counts (equal).

Run alone with ``python -m benchmarks.dispatch``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lift

from ._timing import compare, fit_slope, print_rows, quick, row

__all__ = [
    "COPIES",
    "LAYERS",
    "build_hand",
    "build_lift",
    "data",
    "layer_counts",
    "main",
    "same_layout_step",
    "slopes",
    "time_steps",
]

LAYERS = (1, 2, 4, 8, 16, 32)
QUICK_LAYERS = (1, 4, 8)
FEATURES = 16
BATCH = 8
LR = 0.1
MOMENTUM = 0.9
EPS = 1e-5
# Separately compiled copies of each step in the 1-layer measure: two compiled copies
# of the very same function differ by up to ~2% here (where the executable and its
# buffers land), which would otherwise decide a 5% target.
COPIES = 3


def data(layers: int) -> dict[str, Any]:
    """Weights, biases, input and target shared by every implementation of the step."""
    keys = jax.random.split(jax.random.key(0), layers + 2)
    return {
        "w": [
            jax.random.normal(k, (FEATURES, FEATURES)) / FEATURES**0.5
            for k in keys[:layers]
        ],
        "b": [jnp.zeros(FEATURES) for _ in range(layers)],
        "x": jax.random.normal(keys[-2], (BATCH, FEATURES)),
        "y": jax.random.normal(keys[-1], (BATCH, FEATURES)),
    }


def normalise(h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The batch-norm part of a layer: normalised ``h``, batch mean and variance."""
    m, v = h.mean(0), h.var(0)
    return (h - m) / jnp.sqrt(v + EPS), m, v


def running(old: jax.Array, new: jax.Array) -> jax.Array:
    """The running-statistic update."""
    return MOMENTUM * old + (1 - MOMENTUM) * new


def sgd(params: Any, grads: Any) -> Any:
    """One SGD step."""
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def hand_step(
    params: list[dict[str, jax.Array]], stats: dict[str, jax.Array], x: Any, y: Any
) -> tuple[Any, dict[str, jax.Array], jax.Array]:
    """The hand-written pure step: explicit statistics with ``str`` keys."""

    def loss(params: list[dict[str, jax.Array]]) -> tuple[jax.Array, Any]:
        h, batch = x, {}
        for i, layer in enumerate(params):
            h, m, v = normalise(h @ layer["w"] + layer["b"])
            batch[f"l{i}.mean"], batch[f"l{i}.var"] = m, v
        return jnp.mean((h - y) ** 2), batch

    (value, batch), grads = jax.value_and_grad(loss, has_aux=True)(params)
    new_stats = {k: running(stats[k], batch[k]) for k in stats}
    return sgd(params, grads), new_stats, value


def build_hand(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """The jitted hand-written step and its arguments."""
    d = data(layers)
    params = [{"w": w, "b": b} for w, b in zip(d["w"], d["b"], strict=True)]
    stats = {}
    for i in range(layers):
        stats[f"l{i}.mean"] = jnp.zeros(FEATURES)
        stats[f"l{i}.var"] = jnp.ones(FEATURES)
    return jax.jit(hand_step), (params, stats, d["x"], d["y"])


def lift_step(model: list[dict[str, Any]], x: Any, y: Any) -> tuple[Any, jax.Array]:
    """The implicit step: the statistics are read and written with ``lift.get/set``."""

    def loss(model: list[dict[str, Any]]) -> jax.Array:
        h = x
        for layer in model:
            h, m, v = normalise(h @ layer["w"] + layer["b"])
            bn = layer["bn"]
            lift.set(bn["mean"], running(lift.get(bn["mean"]), m))
            lift.set(bn["var"], running(lift.get(bn["var"]), v))
        return jnp.mean((h - y) ** 2)

    value, grads = lift.value_and_grad(loss)(model)
    return sgd(model, grads), value


def same_layout_step(
    state: dict[Any, jax.Array], model: list[dict[str, Any]], x: Any, y: Any
) -> tuple[tuple[Any, jax.Array], dict[Any, jax.Array]]:
    """Hand-written, explicit threading, on lift's layout: keys in the model."""

    def loss(model: list[dict[str, Any]]) -> tuple[jax.Array, Any]:
        h, new = x, {}
        for layer in model:
            h, m, v = normalise(h @ layer["w"] + layer["b"])
            bn = layer["bn"]
            new[bn["mean"]] = running(state[bn["mean"]], m)
            new[bn["var"]] = running(state[bn["var"]], v)
        return jnp.mean((h - y) ** 2), new

    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(model)
    return (sgd(model, grads), value), new


def build_lift(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """``lift.jit(lift.stateful(lift_step))`` and its arguments (state first)."""
    d = data(layers)
    tree = [
        {
            "w": w,
            "b": b,
            "bn": {
                "mean": lift.StateEntry(jnp.zeros(FEATURES)),
                "var": lift.StateEntry(jnp.ones(FEATURES)),
            },
        }
        for w, b in zip(d["w"], d["b"], strict=True)
    ]
    model, state = lift.export_state(tree)
    return lift.jit(lift.stateful(lift_step)), (state, model, d["x"], d["y"])


def eqn_count(jaxpr: Any) -> int:
    """Equations of a (closed) jaxpr, counting those of sub-jaxprs recursively."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else (param,)
            for sub in subs:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += eqn_count(sub)
    return total


def check_same_result(hand: Any, hand_args: Any, lifted: Any, lift_args: Any) -> None:
    """Fail loudly if the two steps do not compute the same thing."""
    params, stats, value = hand(*hand_args)
    (model, lvalue), state = lifted(*lift_args)
    assert jnp.allclose(value, lvalue), (value, lvalue)
    for i, layer in enumerate(params):
        assert jnp.allclose(layer["w"], model[i]["w"], atol=1e-6)
        mean = state[model[i]["bn"]["mean"]]
        assert jnp.allclose(stats[f"l{i}.mean"], mean, atol=1e-6)


def time_steps(steps: dict[str, Any], *, rounds: int, number: int) -> Any:
    """Interleaved timing of jitted steps, each called on its own arguments.

    A step is ``(function, arguments)``, or a list of such copies (see
    :func:`benchmarks._timing.compare`).
    """

    def calls(step: Any) -> Any:
        if isinstance(step, list):
            return [calls(copy) for copy in step]
        f, a = step
        return lambda: f(*a)

    fns = {name: calls(step) for name, step in steps.items()}
    return compare(fns, rounds=rounds, number=number, warmup=3)


def main(quick_run: bool | None = None) -> list[dict[str, Any]]:
    """Run the dispatch measures and return their rows."""
    q = quick() if quick_run is None else quick_run
    rows = []

    hand, hand_args = build_hand(1)
    lifted, lift_args = build_lift(1)
    check_same_result(hand, hand_args, lifted, lift_args)
    hand_eqns = eqn_count(jax.make_jaxpr(hand_step)(*hand_args))
    lift_eqns = eqn_count(jax.make_jaxpr(lift.stateful(lift_step))(*lift_args))
    rows.append(
        row("jaxpr equations, 1-layer step", lift_eqns, hand_eqns, 1.0, unit="eqns")
    )
    _, hand8_args = build_hand(8)
    _, lift8_args = build_lift(8)
    hand_eqns = eqn_count(jax.make_jaxpr(hand_step)(*hand8_args))
    lift_eqns = eqn_count(jax.make_jaxpr(lift.stateful(lift_step))(*lift8_args))
    rows.append(
        row("jaxpr equations, 8-layer step", lift_eqns, hand_eqns, 1.0, unit="eqns")
    )

    rounds, number = (5, 100) if q else (41, 1000)
    copies = 1 if q else COPIES
    lifts = [(lifted, lift_args)] + [build_lift(1) for _ in range(copies - 1)]
    timing = time_steps(
        {
            "lift": lifts,
            "hand": [(hand, hand_args)] + [build_hand(1) for _ in range(copies - 1)],
            "layout": [(jax.jit(same_layout_step), args) for _, args in lifts],
        },
        rounds=rounds,
        number=number,
    )
    rows.append(
        row(
            "train step dispatch (1 layer)",
            timing.median("lift"),
            timing.median("hand"),
            1.05,
            ratio=timing.ratio("lift", "hand"),
        )
    )
    rows.append(
        row(
            "  hand-written on lift's layout ÷ hand-written",
            timing.median("layout"),
            timing.median("hand"),
            None,
            ratio=timing.ratio("layout", "hand"),
            note="the same explicit step, with StateKeys in the model",
        )
    )
    rows.append(
        row(
            "  lift ÷ hand-written on lift's layout",
            timing.median("lift"),
            timing.median("layout"),
            None,
            ratio=timing.ratio("lift", "layout"),
            note="what lift's own code adds",
        )
    )

    rows.append(layer_scaling(q))
    return rows


def layer_counts(q: bool) -> tuple[int, ...]:
    """The layer counts the per-layer slope is fitted over."""
    return QUICK_LAYERS if q else LAYERS


def slopes(
    build: Callable[[int], Any], counts: Sequence[int], *, rounds: int, number: int
) -> tuple[float, float, float]:
    """Added time per layer of ``build``'s step and of the hand-written step.

    Every layer count of both steps is timed in the same interleaved rounds; each
    round gives a slope for each side (least squares over the layer counts).
    Returns ``(slope, hand-written slope, median over rounds of their ratio)``, the
    slopes from the per-count median times.
    """
    steps = {}
    for layers in counts:
        steps[f"step {layers}"] = build(layers)
        steps[f"hand {layers}"] = build_hand(layers)
    timing = time_steps(steps, rounds=rounds, number=number)

    def slope(side: str, times: Callable[[str], float]) -> float:
        return fit_slope(counts, [times(f"{side} {n}") for n in counts])

    ratios = [
        slope("step", lambda k, r=r: timing.rounds[k][r])
        / slope("hand", lambda k, r=r: timing.rounds[k][r])
        for r in range(rounds)
    ]
    return (
        slope("step", timing.median),
        slope("hand", timing.median),
        statistics.median(ratios),
    )


def layer_scaling(q: bool) -> dict[str, Any]:
    """Added time per extra stateful layer, lift vs hand-written (slope ratio)."""
    rounds, number = (3, 30) if q else (41, 200)
    counts = layer_counts(q)
    lift_slope, hand_slope, ratio = slopes(
        build_lift, counts, rounds=rounds, number=number
    )
    return row(
        "added dispatch per stateful layer",
        lift_slope,
        hand_slope,
        1.1,
        ratio=ratio,
        unit="us/layer",
        note="slope over " + ", ".join(map(str, counts)) + " layers",
    )


if __name__ == "__main__":
    print_rows(main())
