"""Anchors: the same measures through Equinox, Inox, Flax NNX and Haiku.

Each library runs the train step of :mod:`benchmarks.dispatch` (same weights, same
math: Linear, batch normalisation with running statistics as the library's state,
squared loss, ``value_and_grad``, SGD) with its own state mechanism and its own
``jit``. The ratio is against the hand-written ``jax.jit`` step timed in the same
interleaved rounds. A library that is not installed is skipped (the ``bench`` extra
installs them all). Anchors have no target: they show where lift stands.

Also the tree-layer anchors: Inox's ``export_state`` and Equinox's
``make_with_state`` (given an already built model) vs ``tree_flatten_with_path``,
and ``nnx.scan`` of a stateful body vs the hand-written ``lax.scan``.

Run alone with ``python -m benchmarks.others``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import dispatch
from ._timing import (
    compare,
    print_rows,
    quick,
    row,
    skipped_row,
)
from .dispatch import FEATURES, data, normalise, running, sgd

__all__ = ["BUILDERS", "main"]

Builder = Callable[[int], tuple[Any, tuple[Any, ...]]]


def _available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------- Equinox


def build_equinox(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """``eqx.filter_jit`` step; statistics in ``eqx.nn.State`` via ``StateIndex``."""
    import equinox as eqx

    class Layer(eqx.Module):
        w: jax.Array
        b: jax.Array
        mean: eqx.nn.StateIndex
        var: eqx.nn.StateIndex

        def __init__(self, w: jax.Array, b: jax.Array) -> None:
            self.w, self.b = w, b
            self.mean = eqx.nn.StateIndex(jnp.zeros(FEATURES))
            self.var = eqx.nn.StateIndex(jnp.ones(FEATURES))

    d = data(layers)
    model, state = eqx.nn.make_with_state(
        lambda: [Layer(w, b) for w, b in zip(d["w"], d["b"], strict=True)]
    )()

    @eqx.filter_jit
    def step(model: list, state: Any, x: Any, y: Any) -> Any:
        def loss(model: list) -> Any:
            h, new = x, state
            for layer in model:
                h, m, v = normalise(h @ layer.w + layer.b)
                new = new.set(layer.mean, running(new.get(layer.mean), m))
                new = new.set(layer.var, running(new.get(layer.var), v))
            return jnp.mean((h - y) ** 2), new

        (value, new), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        return (
            eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads)),
            new,
            value,
        )

    return step, (model, state, d["x"], d["y"])


# -------------------------------------------------------------------------- Inox


def build_inox(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """``inox.jit`` step; statistics in Inox's state dict via ``nn.StateEntry``."""
    import inox
    import inox.nn as nn

    class Layer(nn.Module):
        def __init__(self, w: jax.Array, b: jax.Array) -> None:
            self.w, self.b = w, b
            self.mean = nn.StateEntry(jnp.zeros(FEATURES))
            self.var = nn.StateEntry(jnp.ones(FEATURES))

    d = data(layers)
    model, state = nn.export_state(
        [Layer(w, b) for w, b in zip(d["w"], d["b"], strict=True)]
    )

    @inox.jit
    def step(model: list, state: dict, x: Any, y: Any) -> Any:
        def loss(model: list) -> Any:
            h, new = x, {}
            for layer in model:
                h, m, v = normalise(h @ layer.w + layer.b)
                new[layer.mean] = running(state[layer.mean], m)
                new[layer.var] = running(state[layer.var], v)
            return jnp.mean((h - y) ** 2), new

        (value, new), grads = inox.value_and_grad(loss, has_aux=True)(model)
        model = jax.tree.map(
            lambda p, g: p - 0.1 * g if isinstance(p, jax.Array) else p, model, grads
        )
        return model, nn.update_state(state, new), value

    return step, (model, state, d["x"], d["y"])


# ---------------------------------------------------------------------- Flax NNX


def _nnx_model(layers: int) -> Any:
    from flax import nnx

    class Layer(nnx.Module):
        def __init__(self, w: jax.Array, b: jax.Array) -> None:
            self.w, self.b = nnx.Param(w), nnx.Param(b)
            self.mean = nnx.BatchStat(jnp.zeros(FEATURES))
            self.var = nnx.BatchStat(jnp.ones(FEATURES))

    d = data(layers)
    model = nnx.List([Layer(w, b) for w, b in zip(d["w"], d["b"], strict=True)])
    return model, d


def _nnx_loss(model: Any, x: Any, y: Any) -> Any:
    h = x
    for layer in model:
        h, m, v = normalise(h @ layer.w[...] + layer.b[...])
        layer.mean[...] = running(layer.mean[...], m)
        layer.var[...] = running(layer.var[...], v)
    return jnp.mean((h - y) ** 2)


def build_nnx(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """``nnx.jit`` step mutating ``nnx.BatchStat`` in place."""
    from flax import nnx

    model, d = _nnx_model(layers)

    @nnx.jit
    def step(model: Any, x: Any, y: Any) -> Any:
        value, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, sgd(params, grads))
        return value

    return step, (model, d["x"], d["y"])


def build_nnx_split(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """NNX the functional way: ``nnx.split``/``nnx.merge`` around plain ``jax.jit``."""
    from flax import nnx

    model, d = _nnx_model(layers)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def step(params: Any, stats: Any, x: Any, y: Any) -> Any:
        model = nnx.merge(graphdef, params, stats)
        value, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
        nnx.update(model, sgd(nnx.state(model, nnx.Param), grads))
        _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        return params, stats, value

    return step, (params, stats, d["x"], d["y"])


# ------------------------------------------------------------------------- Haiku


def build_haiku(layers: int) -> tuple[Any, tuple[Any, ...]]:
    """``hk.transform_with_state`` + ``jax.jit``."""
    import haiku as hk

    d = data(layers)

    def forward(x: Any, y: Any) -> Any:
        h = x
        for i in range(layers):
            with hk.name_scope(f"l{i}"):
                w = hk.get_parameter("w", (FEATURES, FEATURES), init=jnp.zeros)
                b = hk.get_parameter("b", (FEATURES,), init=jnp.zeros)
                h, m, v = normalise(h @ w + b)
                mean = hk.get_state("mean", (FEATURES,), init=jnp.zeros)
                var = hk.get_state("var", (FEATURES,), init=jnp.ones)
                hk.set_state("mean", running(mean, m))
                hk.set_state("var", running(var, v))
        return jnp.mean((h - y) ** 2)

    fwd = hk.without_apply_rng(hk.transform_with_state(forward))
    params, state = fwd.init(None, d["x"], d["y"])
    params = {
        name: {"w": d["w"][int(name[1:])], "b": d["b"][int(name[1:])]}
        for name in params
    }

    @jax.jit
    def step(params: Any, state: Any, x: Any, y: Any) -> Any:
        def loss(params: Any) -> Any:
            return fwd.apply(params, state, x, y)

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return sgd(params, grads), new, value

    return step, (params, state, d["x"], d["y"])


BUILDERS: dict[str, tuple[str, Builder]] = {
    "eqx.filter_jit": ("equinox", build_equinox),
    "inox.jit": ("inox", build_inox),
    "nnx.jit": ("flax.nnx", build_nnx),
    "nnx split/merge + jax.jit": ("flax.nnx", build_nnx_split),
    "haiku + jax.jit": ("haiku", build_haiku),
}


def _check_value(name: str, step: Any, args: tuple[Any, ...]) -> None:
    """The library's step computes the hand-written loss (same math, same weights)."""
    hand, hand_args = dispatch.build_hand(1)
    want = hand(*hand_args)[2]
    out = step(*args)
    got = out if name == "nnx.jit" else out[-1]
    assert jnp.allclose(want, got, atol=1e-5), (name, want, got)


def dispatch_rows(q: bool) -> list[dict[str, Any]]:
    """Train-step dispatch and per-layer scaling of each library vs hand-written."""
    rows = []
    rounds, number = (3, 50) if q else (21, 300)
    layer_rounds, layer_number = (2, 10) if q else (9, 50)
    for name, (module, build) in BUILDERS.items():
        if not _available(module):
            rows.append(skipped_row(f"train step dispatch, {name}", f"no {module}"))
            continue
        step, args = build(1)
        _check_value(name, step, args)
        timing = dispatch.time_steps(
            {"lib": (step, args), "hand": dispatch.build_hand(1)},
            rounds=rounds,
            number=number,
        )
        rows.append(
            row(
                f"train step dispatch, {name}",
                timing.median("lib"),
                timing.median("hand"),
                None,
                ratio=timing.ratio("lib", "hand"),
            )
        )
        result = dispatch.slopes(
            build,
            dispatch.layer_counts(q),
            rounds=layer_rounds,
            number=layer_number,
        )
        rows.append(
            dispatch.slope_row(f"added dispatch per layer, {name}", result, None)
        )
    return rows


def export_rows(q: bool) -> list[dict[str, Any]]:
    """Inox ``export_state`` and Equinox ``make_with_state`` vs flatten-with-path."""
    from .export import dict_tree, eqx_tree

    rows = []
    flatten = jax.tree_util.tree_flatten_with_path
    sizes = (1_000,) if q else (1_000, 10_000, 100_000)
    plan = {1_000: (5 if q else 21, 5), 10_000: (3 if q else 11, 1), 100_000: (5, 1)}
    if _available("inox"):
        import inox.nn

        for leaves in sizes:
            tree = dict_tree(leaves, entry=inox.nn.StateEntry)
            rounds, number = plan[leaves]
            timing = compare(
                {
                    "lib": lambda tree=tree: inox.nn.export_state(tree),
                    "flatten": lambda tree=tree: flatten(tree),
                },
                rounds=rounds,
                number=number,
                warmup=1,
                block=False,
            )
            rows.append(
                row(
                    f"inox export_state, {leaves // 1000}k dict",
                    timing.median("lib"),
                    timing.median("flatten"),
                    None,
                    ratio=timing.ratio("lib", "flatten"),
                )
            )
    else:
        rows.append(skipped_row("inox export_state", "no inox"))
    if _available("equinox"):
        import equinox as eqx

        # ~100x slower than a flatten: 100k would take minutes.
        for leaves in sizes[:1] if q else sizes[:2]:
            tree = eqx_tree(leaves, entry=eqx.nn.StateIndex)
            rounds, number = plan[leaves]
            timing = compare(
                {
                    "lib": lambda tree=tree: eqx.nn.make_with_state(lambda: tree)(),
                    "flatten": lambda tree=tree: flatten(tree),
                },
                rounds=max(3, rounds // 3),
                number=1,
                warmup=1,
                block=False,
            )
            rows.append(
                row(
                    f"eqx make_with_state, {leaves // 1000}k eqx",
                    timing.median("lib"),
                    timing.median("flatten"),
                    None,
                    ratio=timing.ratio("lib", "flatten"),
                    note="model built beforehand",
                )
            )
    else:
        rows.append(skipped_row("eqx make_with_state", "no equinox"))
    return rows


def scan_rows(q: bool) -> list[dict[str, Any]]:
    """``nnx.scan`` of the stateful body of :mod:`benchmarks.scan` vs ``lax.scan``."""
    if not _available("flax.nnx"):
        return [skipped_row("nnx.scan run", "no flax")]
    from flax import nnx

    from . import scan

    hand, hand_args = scan.build_hand()
    w, stats, h0, xs = hand_args

    class Cell(nnx.Module):
        def __init__(self) -> None:
            self.w = nnx.Param(w)
            self.mean = nnx.BatchStat(stats["mean"])
            self.var = nnx.BatchStat(stats["var"])

    def body(carry: Any, x: Any) -> Any:
        cell, h = carry
        h = jnp.tanh(h @ cell.w[...] + x)
        cell.mean[...] = running(cell.mean[...], h)
        cell.var[...] = running(cell.var[...], h * h)
        return (cell, h), h.sum()

    @nnx.jit
    def run(cell: Cell, h0: Any, xs: Any) -> Any:
        scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        (_, h), ys = scan((cell, h0), xs)
        return h, ys

    cell = Cell()
    h, _ = run(cell, h0, xs)
    want = hand(*hand_args)[0][0]
    assert jnp.allclose(h, want, atol=1e-5)
    rounds, number = (3, 20) if q else (21, 100)
    timing = compare(
        {"lib": lambda: run(cell, h0, xs), "hand": lambda: hand(*hand_args)},
        rounds=rounds,
        number=number,
        warmup=2,
    )
    return [
        row(
            f"nnx.scan run, {scan.STEPS} steps",
            timing.median("lib"),
            timing.median("hand"),
            None,
            ratio=timing.ratio("lib", "hand"),
        )
    ]


def main(quick_run: bool | None = None) -> list[dict[str, Any]]:
    """Run every anchor and return the rows."""
    q = quick() if quick_run is None else quick_run
    return dispatch_rows(q) + scan_rows(q) + export_rows(q)


if __name__ == "__main__":
    print_rows(main())
