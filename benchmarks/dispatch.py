"""Train-step dispatch: ``lift.jit(lift.stateful(step))`` vs a hand-written ``jax.jit``.

The step: ``layers`` times (Linear 16->16, then BatchNorm-style normalisation whose
batch mean and variance update running statistics), a squared loss on a batch of 8,
``value_and_grad``, SGD. The hand-written step carries the statistics explicitly in a
flat dict with ``str`` keys beside a list of ``{"w", "b"}`` layers; the lift model is
the same list, each layer holding the keys of its two statistics next to its weights
(``{"w", "b", "mean", "var"}``), read and written with ``lift.get`` and ``lift.set``.
Same math, so the same jaxpr; the only difference in the data is the keys.

Measures (wall time): the per-call time of one layer's step (target <= 1.05; each
side the mean of three separately compiled copies) with anchor rows that split it
into what the data layout costs (the same explicit step written by hand on lift's
layout) and what lift's own code adds, an A/A row (the hand-written step against
three other compiled copies of itself) that shows what the method resolves on this
machine, and the layout of the docs' examples (a ``"bn"`` dict per layer); the added
time per extra stateful layer (slope over 1..32 layers, every count of both steps in
the same interleaved rounds; target <= 1.1 x hand-written); the jaxpr equation counts
(equal). ``benchmarks.instructions`` counts the instructions of the same steps, a
cross-check that does not move with the machine's load.

Run alone with ``python -m benchmarks.dispatch``.
"""

from __future__ import annotations

import statistics
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lift

from ._timing import (
    bootstrap_median,
    compare,
    compared_row,
    fit_slope,
    print_rows,
    quick,
    row,
)

__all__ = [
    "COPIES",
    "LAYERS",
    "build_hand",
    "build_lift",
    "data",
    "fresh",
    "layer_counts",
    "main",
    "same_layout_step",
    "slope_row",
    "slopes",
    "stat_keys",
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
# Calls per timed block (as in a training loop, most calls find the step's code and
# data in the CPU's caches) and rounds (see `benchmarks._timing`).
NUMBER = 200
ROUNDS = 200
LAYER_ROUNDS = 60


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


def fresh(f: Callable[..., Any]) -> Callable[..., Any]:
    """A new function object running ``f``'s code: ``jax.jit`` compiles it anew.

    ``jax.jit`` caches executables per function object, so two ``jax.jit(f)`` share
    one; a copy of a measure must be separately compiled, as each ``lift.jit`` is.
    """
    return types.FunctionType(
        f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__
    )


def build_hand(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """The jitted hand-written step (compiled anew) and its arguments."""
    d = data(layers)
    params = [{"w": w, "b": b} for w, b in zip(d["w"], d["b"], strict=True)]
    stats = {}
    for i in range(layers):
        stats[f"l{i}.mean"] = jnp.zeros(FEATURES)
        stats[f"l{i}.var"] = jnp.ones(FEATURES)
    return jax.jit(fresh(hand_step)), (params, stats, d["x"], d["y"])


def stat_keys(layer: dict[str, Any]) -> tuple[Any, Any]:
    """The keys of a lift layer's two statistics, in either layout."""
    stats = layer.get("bn", layer)
    return stats["mean"], stats["var"]


def lift_step(model: list[dict[str, Any]], x: Any, y: Any) -> tuple[Any, jax.Array]:
    """The implicit step: the statistics are read and written with ``lift.get/set``."""

    def loss(model: list[dict[str, Any]]) -> jax.Array:
        h = x
        for layer in model:
            h, m, v = normalise(h @ layer["w"] + layer["b"])
            mean, var = stat_keys(layer)
            lift.set(mean, running(lift.get(mean), m))
            lift.set(var, running(lift.get(var), v))
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
            mean, var = stat_keys(layer)
            new[mean] = running(state[mean], m)
            new[var] = running(state[var], v)
        return jnp.mean((h - y) ** 2), new

    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(model)
    return (sgd(model, grads), value), new


def build_lift(layers: int, *, nested: bool = False) -> tuple[Any, tuple[Any, ...]]:
    """``lift.jit(lift.stateful(lift_step))`` and its arguments (state first).

    ``nested`` puts each layer's statistics in a ``"bn"`` dict of their own, as the
    docs' examples do: one more container per layer for every call to flatten.
    """
    d = data(layers)
    tree = []
    for w, b in zip(d["w"], d["b"], strict=True):
        stats = {
            "mean": lift.StateEntry(jnp.zeros(FEATURES)),
            "var": lift.StateEntry(jnp.ones(FEATURES)),
        }
        tree.append({"w": w, "b": b, **({"bn": stats} if nested else stats)})
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
        mean = state[stat_keys(model[i])[0]]
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

    rounds, number = (5, 20) if q else (ROUNDS, NUMBER)
    copies = 1 if q else COPIES
    lifts = [(lifted, lift_args)] + [build_lift(1) for _ in range(copies - 1)]
    hands = [(hand, hand_args)] + [build_hand(1) for _ in range(copies - 1)]
    timing = time_steps(
        {
            "lift": lifts,
            "hand": hands,
            "hand copy": [build_hand(1) for _ in range(copies)],
            "layout": [(jax.jit(fresh(same_layout_step)), a) for _, a in lifts],
            "nested": [build_lift(1, nested=True) for _ in range(copies)],
        },
        rounds=rounds,
        number=number,
    )
    rows.append(
        compared_row(
            "train step dispatch (1 layer), wall time",
            timing,
            "lift",
            "hand",
            1.05,
        )
    )
    for name, side, base, note in ANCHORS:
        rows.append(compared_row(name, timing, side, base, None, note=note))

    rows.append(layer_scaling(q))
    return rows


ANCHORS = (
    (
        "  A/A: hand-written ÷ other compiled copies of it",
        "hand copy",
        "hand",
        "what this method resolves here (1.000 is exact)",
    ),
    (
        "  hand-written on lift's layout ÷ hand-written",
        "layout",
        "hand",
        "the same explicit step, with StateKeys in the model",
    ),
    (
        "  lift ÷ hand-written on lift's layout",
        "lift",
        "layout",
        "what lift's own code adds",
    ),
    (
        "  lift, the docs' layout ÷ hand-written",
        "nested",
        "hand",
        "each layer's statistics in a 'bn' dict of their own",
    ),
)


def layer_counts(q: bool) -> tuple[int, ...]:
    """The layer counts the per-layer slope is fitted over."""
    return QUICK_LAYERS if q else LAYERS


def slopes(
    build: Callable[[int], Any], counts: Sequence[int], *, rounds: int, number: int
) -> tuple[float, float, list[float]]:
    """Added time per layer of ``build``'s step and of the hand-written step.

    Every layer count of both steps is timed in the same interleaved rounds; each
    round gives a slope for each side (least squares over the layer counts).
    Returns ``(slope, hand-written slope, per-round ratios of the two)``, the slopes
    from the per-count median times.
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
    return slope("step", timing.median), slope("hand", timing.median), ratios


def slope_row(
    name: str,
    result: tuple[float, float, list[float]],
    target: float | None,
    *,
    judged: bool = True,
) -> dict[str, Any]:
    """The row of a :func:`slopes` result: median slope ratio and its 95% CI."""
    step_slope, hand_slope, ratios = result
    low, high = bootstrap_median(ratios)
    out = row(
        name,
        step_slope,
        hand_slope,
        target,
        ratio=statistics.median(ratios),
        unit="us/layer",
        note=f"95% CI {low:.3f}-{high:.3f} over {len(ratios)} rounds",
        judged=judged,
    )
    out["low"], out["high"] = low, high
    return out


def layer_scaling(q: bool) -> dict[str, Any]:
    """Added time per extra stateful layer, lift vs hand-written (slope ratio)."""
    rounds, number = (3, 10) if q else (LAYER_ROUNDS, NUMBER)
    counts = layer_counts(q)
    out = slope_row(
        "added dispatch per stateful layer, wall time",
        slopes(build_lift, counts, rounds=rounds, number=number),
        1.1,
    )
    out["note"] = f"slope over {', '.join(map(str, counts))} layers; {out['note']}"
    return out


if __name__ == "__main__":
    print_rows(main())
