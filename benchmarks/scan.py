"""``lift.scan`` of a stateful body vs a hand-written ``lax.scan`` with explicit state.

The body (100 steps): ``h = tanh(h @ w + x_t)``, then running mean and variance of
``h`` are updated (state), and ``sum(h)`` is emitted. The lift version reads and
writes the statistics with ``lift.get``/``lift.set`` inside ``lift.scan``, under
``lift.jit(lift.stateful(...))``; the hand-written one carries them in the
``lax.scan`` carry, under ``jax.jit``.

Measures: run time per call (target <= 1.05; each side the mean of three separately
compiled copies, as in ``benchmarks.dispatch``, with an A/A row; its instruction count
is in ``benchmarks.instructions``), compile time of
``jax.jit(f).lower(...).compile()`` with fresh function objects every round so no
cache helps either side (target <= 1.05), and jaxpr equation counts, scan body
included (must be equal).

Run alone with ``python -m benchmarks.scan``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import lift

from ._timing import compare, compared_row, print_rows, quick, row
from .dispatch import COPIES, NUMBER, eqn_count, running

__all__ = ["STEPS", "build_hand", "build_lift", "main"]

STEPS = 100
FEATURES = 16
ROUNDS = 150
COMPILE_ROUNDS = 41


def _data() -> tuple[jax.Array, jax.Array, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    w = jax.random.normal(k1, (FEATURES, FEATURES)) / FEATURES**0.5
    return (
        w,
        jax.random.normal(k2, (FEATURES,)),
        jax.random.normal(k3, (STEPS, FEATURES)),
    )


def make_hand() -> Callable[..., Any]:
    """A fresh hand-written function (a new object, so no trace cache applies)."""

    def run(w: Any, stats: dict, h0: Any, xs: Any) -> Any:
        def body(carry: Any, x: Any) -> Any:
            h, st = carry
            h = jnp.tanh(h @ w + x)
            st = {"mean": running(st["mean"], h), "var": running(st["var"], h * h)}
            return (h, st), h.sum()

        (h, stats), ys = lax.scan(body, (h0, stats), xs)
        return (h, ys), stats

    return run


def make_lift() -> Callable[..., Any]:
    """A fresh pure function ``lift.stateful(run)``."""

    def run(model: dict, h0: Any, xs: Any) -> Any:
        def body(h: Any, x: Any) -> Any:
            h = jnp.tanh(h @ model["w"] + x)
            mean, var = model["mean"], model["var"]
            lift.set(mean, running(lift.get(mean), h))
            lift.set(var, running(lift.get(var), h * h))
            return h, h.sum()

        return lift.scan(body, h0, xs)

    return lift.stateful(run)


def build_hand() -> tuple[Any, tuple[Any, ...]]:
    """The jitted hand-written scan and its arguments."""
    w, h0, xs = _data()
    stats = {"mean": jnp.zeros(FEATURES), "var": jnp.ones(FEATURES)}
    return jax.jit(make_hand()), (w, stats, h0, xs)


def build_lift() -> tuple[Any, tuple[Any, ...]]:
    """The lift scan under ``lift.jit`` and its arguments (state first)."""
    w, h0, xs = _data()
    model, state = lift.export_state(
        {
            "w": w,
            "mean": lift.StateEntry(jnp.zeros(FEATURES)),
            "var": lift.StateEntry(jnp.ones(FEATURES)),
        }
    )
    return lift.jit(make_lift()), (state, model, h0, xs)


def main(quick_run: bool | None = None) -> list[dict[str, Any]]:
    """Run the scan measures and return their rows."""
    q = quick() if quick_run is None else quick_run
    hand, hand_args = build_hand()
    lifted, lift_args = build_lift()

    (h, ys), stats = hand(*hand_args)
    ((lh, lys), state) = lifted(*lift_args)
    model = lift_args[1]
    assert jnp.allclose(h, lh, atol=1e-5)
    assert jnp.allclose(ys, lys, atol=1e-4)
    assert jnp.allclose(stats["var"], state[model["var"]], atol=1e-5)

    rows = []
    hand_eqns = eqn_count(jax.make_jaxpr(make_hand())(*hand_args))
    lift_eqns = eqn_count(jax.make_jaxpr(make_lift())(*lift_args))
    rows.append(
        row("jaxpr equations, scan (recursive)", lift_eqns, hand_eqns, 1.0, unit="eqns")
    )

    rounds, number = (5, 20) if q else (ROUNDS, NUMBER)
    copies = 1 if q else COPIES
    lifts = [(lifted, lift_args)] + [build_lift() for _ in range(copies - 1)]
    hands = [(hand, hand_args)] + [build_hand() for _ in range(copies - 1)]
    timing = compare(
        {
            "lift": [lambda f=f, a=a: f(*a) for f, a in lifts],
            "hand": [lambda f=f, a=a: f(*a) for f, a in hands],
            "hand copy": [
                lambda f=f, a=a: f(*a) for f, a in (build_hand() for _ in lifts)
            ],
        },
        rounds=rounds,
        number=number,
        warmup=3,
    )
    rows.append(
        compared_row(
            f"scan run, {STEPS} steps, wall time",
            timing,
            "lift",
            "hand",
            1.05,
        )
    )
    rows.append(
        compared_row(
            "  A/A: hand-written ÷ other compiled copies of it",
            timing,
            "hand copy",
            "hand",
            None,
            note="what this method resolves here (1.000 is exact)",
        )
    )

    def fresh(_: int) -> dict[str, Callable[[], Any]]:
        lf, hf = make_lift(), make_hand()
        return {
            "lift": lambda: jax.jit(lf).lower(*lift_args).compile(),
            "hand": lambda: jax.jit(hf).lower(*hand_args).compile(),
        }

    rounds = 3 if q else COMPILE_ROUNDS
    timing = compare(fresh(-1), rounds=rounds, warmup=1, setup=fresh)
    rows.append(
        compared_row(
            f"scan compile, {STEPS} steps",
            timing,
            "lift",
            "hand",
            1.05,
            note="trace + lower + compile, fresh functions each round",
        )
    )
    return rows


if __name__ == "__main__":
    print_rows(main())
