"""End-to-end training throughput: a small ResNet on the digits, in every library.

The model: a 3x3 convolution (1 -> 16 channels) and BatchNorm, two residual blocks of
two convolutions (16 -> 16) with BatchNorm each, global average pooling and a dense
layer to 10 classes: 9,530 parameters and 160 BatchNorm statistics (running mean and
variance of five BatchNorms, momentum 0.9, no learned scale or offset: Inox's
BatchNorm has none, so none has). Softmax cross-entropy, ``optax.adam``, batches of 64
of the 8x8 ``sklearn`` digits images, cycling through the data set.

Every implementation starts from the same numbers (:func:`init_params`, copied into
each library's own layers) and is the step its library's documentation would have a
user write: the hand-written pure step (``jax.jit`` with its parameters, statistics
and optimizer state donated, the statistics in a separate dict), lift
(``lift.jit(lift.stateful(step), donate_state=True)``, and ``donate_argnums=(0, 1)``
for the model and the optimizer state where ``lift.jit`` accepts it), Equinox, Flax
NNX, Flax Linen, Haiku and Inox (in :mod:`benchmarks.e2e_libs`). Linen, NNX and
Haiku compute the batch variance in one pass (E[x^2] - E[x]^2), which is cheaper than
the two-pass formula; they are compared with a hand-written step that does the same.

Measures: steps per second as a ratio to the matching hand-written step (higher is
better), all implementations timed in the same interleaved rounds, with an A/A row;
the time of the first call (trace, compile, run) as a ratio to the hand-written
step's, each implementation built anew each round; and the compiled memory of lift's
step against the hand-written one's (``memory_analysis()``: argument, output, alias
and temporary bytes, which must be equal).

Run alone with ``python -m benchmarks.e2e``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lift

from ._timing import bootstrap_median, compare, print_rows, quick, row, skipped_row

__all__ = [
    "TARGET",
    "Trainer",
    "batches",
    "build_hand",
    "build_lift",
    "forward",
    "init_params",
    "main",
]

CHANNELS = 16
BLOCKS = 2
BATCH = 64
LR = 3e-3
MOMENTUM = 0.9
EPS = 1e-5
TARGET = 0.98  # lift's throughput >= 0.98 x the hand-written step's
ROUNDS, NUMBER = 50, 10  # short blocks, many rounds (see benchmarks._timing)
COMPILE_ROUNDS = 3
OPTIMIZER = optax.adam(LR)
LABELS = {
    "hand one-pass": "hand-written, one-pass variance (anchor)",
    "hand copy": "A/A: hand-written, another compiled copy",
    "hand, statistics donated": "hand-written, only statistics donated",
    "lift.jit": "lift.jit(lift.stateful(step))",
}
# Anchors left out of a quick run (each costs a compilation).
ANCHORS_ONLY_IN_FULL = ("hand copy", "hand, statistics donated")


def batches(batch: int | None = None, layout: str = "NHWC") -> list[tuple[Any, Any]]:
    """The digits in batches (default ``BATCH``), the last partial batch dropped."""
    from sklearn.datasets import load_digits

    batch = BATCH if batch is None else batch

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    if layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    labels = digits.target.astype(np.int32)
    return [
        (jnp.asarray(images[i : i + batch]), jnp.asarray(labels[i : i + batch]))
        for i in range(0, len(labels) - batch + 1, batch)
    ]


def bn_names() -> list[str]:
    """The dotted names of the conv layers, each followed by a BatchNorm."""
    blocks = (f"block{b}.conv{c}" for b in range(BLOCKS) for c in (1, 2))
    return ["stem", *blocks]


def init_params(seed: int = 0) -> dict[str, Any]:
    """The initial weights every implementation copies: HWIO kernels, He-normal."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 + 2 * BLOCKS))

    def kernel(cin: int) -> jax.Array:
        shape = (3, 3, cin, CHANNELS)
        return jax.random.normal(next(keys), shape) * (2 / (9 * cin)) ** 0.5

    params: dict[str, Any] = {"stem": {"kernel": kernel(1)}}
    for b in range(BLOCKS):
        params[f"block{b}"] = {
            c: {"kernel": kernel(CHANNELS)} for c in ("conv1", "conv2")
        }
    w = jax.random.normal(next(keys), (CHANNELS, 10)) / CHANNELS**0.5
    params["head"] = {"w": w, "b": jnp.zeros(10)}
    return params


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 3x3 'SAME' convolution, NHWC input, HWIO kernel."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def moments(h: jax.Array, onepass: bool) -> tuple[jax.Array, jax.Array]:
    """Batch mean and (biased) variance per channel, in two passes or in one."""
    mean = h.mean((0, 1, 2))
    if onepass:
        return mean, jnp.maximum(0.0, jnp.square(h).mean((0, 1, 2)) - jnp.square(mean))
    return mean, jnp.square(h - mean[None, None, None]).mean((0, 1, 2))


def normalise(h: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """BatchNorm's normalisation with the batch statistics."""
    return (h - mean[None, None, None]) * jax.lax.rsqrt(var + EPS)[None, None, None]


def running(old: jax.Array, new: jax.Array) -> jax.Array:
    """The running-statistic update."""
    return MOMENTUM * old + (1 - MOMENTUM) * new


BatchNorm = Callable[[str, dict[str, Any], jax.Array], jax.Array]


def forward(model: dict[str, Any], x: jax.Array, bn: BatchNorm) -> jax.Array:
    """The ResNet's logits; ``bn(name, layer, h)`` is the BatchNorm after each conv."""

    def conv_bn(name: str, layer: dict[str, Any], h: jax.Array) -> jax.Array:
        return bn(name, layer, conv(h, layer["kernel"]))

    h = jax.nn.relu(conv_bn("stem", model["stem"], x))
    for b in range(BLOCKS):
        block = model[f"block{b}"]
        r = jax.nn.relu(conv_bn(f"block{b}.conv1", block["conv1"], h))
        h = jax.nn.relu(conv_bn(f"block{b}.conv2", block["conv2"], r) + h)
    head = model["head"]
    return h.mean((1, 2)) @ head["w"] + head["b"][None]


def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def initial_stats() -> dict[str, jax.Array]:
    """The hand-written step's statistics: a flat dict, ``"<layer>.mean"`` keys."""
    stats = {}
    for name in bn_names():
        stats[f"{name}.mean"] = jnp.zeros(CHANNELS)
        stats[f"{name}.var"] = jnp.ones(CHANNELS)
    return stats


def hand_step(onepass: bool) -> Callable[..., Any]:
    """The hand-written pure step ``(params, stats, opt_state, x, y)``."""

    def step(params: Any, stats: Any, opt_state: Any, x: Any, y: Any) -> Any:
        def loss(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            new = {}

            def bn(name: str, layer: dict[str, Any], h: jax.Array) -> jax.Array:
                m, v = moments(h, onepass)
                new[f"{name}.mean"] = running(stats[f"{name}.mean"], m)
                new[f"{name}.var"] = running(stats[f"{name}.var"], v)
                return normalise(h, m, v)

            return xent(forward(params, x, bn), y), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new, opt_state, value

    return step


class Trainer:
    """One implementation's training loop: each call runs one step on the next batch.

    ``step(*carry, x, y)`` is the compiled step and ``split(carry, out)`` gives the
    next carry and the loss; the carry is replaced after each call, so that donated
    buffers are never reused.
    """

    def __init__(
        self,
        step: Callable[..., Any],
        carry: tuple[Any, ...],
        split: Callable[[tuple[Any, ...], Any], tuple[tuple[Any, ...], Any]],
        data: list[tuple[Any, Any]],
    ) -> None:
        self.step, self.carry, self.split, self.data = step, carry, split, data
        self.calls = 0

    def __call__(self) -> Any:
        x, y = self.data[self.calls % len(self.data)]
        self.calls += 1
        out = self.step(*self.carry, x, y)
        self.carry, loss = self.split(self.carry, out)
        return loss


def build_hand(
    onepass: bool = False, *, donate: tuple[int, ...] = (0, 1, 2)
) -> Trainer:
    """The hand-written step under ``jax.jit`` (compiled anew for each trainer)."""
    params = init_params()
    step = jax.jit(hand_step(onepass), donate_argnums=donate)
    carry = (params, initial_stats(), OPTIMIZER.init(params))
    return Trainer(step, carry, lambda _, out: (out[:3], out[3]), batches())


def lift_model() -> tuple[dict[str, Any], dict[Any, jax.Array]]:
    """:func:`init_params` with each conv layer holding its two statistics as state."""
    tree = init_params()
    for name in bn_names():
        layer = tree
        for part in name.split("."):
            layer = layer[part]
        layer["mean"] = lift.StateEntry(jnp.zeros(CHANNELS))
        layer["var"] = lift.StateEntry(jnp.ones(CHANNELS))
    return lift.export_state(tree)


def lift_step(model: dict[str, Any], opt_state: Any, x: Any, y: Any) -> Any:
    """The implicit step: BatchNorm reads and writes its statistics in place."""

    def loss(model: dict[str, Any]) -> jax.Array:
        def bn(name: str, layer: dict[str, Any], h: jax.Array) -> jax.Array:
            m, v = moments(h, onepass=False)
            lift.set(layer["mean"], running(lift.get(layer["mean"]), m))
            lift.set(layer["var"], running(lift.get(layer["var"]), v))
            return normalise(h, m, v)

        return xent(forward(model, x, bn), y)

    value, grads = lift.value_and_grad(loss)(model)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, model)
    return optax.apply_updates(model, updates), opt_state, value


def lift_jit_options() -> dict[str, Any]:
    """``lift.jit`` options: the state donated, and parameters when lift allows it."""
    try:
        lift.jit(lambda model, opt_state: None, donate_argnums=(0, 1))
    except (TypeError, ValueError):  # this lift refuses donate_argnums
        return {"donate_state": True}
    return {"donate_state": True, "donate_argnums": (0, 1)}


def build_lift() -> Trainer:
    """``lift.jit(lift.stateful(lift_step))``: state first, then model and optimizer."""
    model, state = lift_model()
    step = lift.jit(lift.stateful(lift_step), **lift_jit_options())

    def split(_: Any, out: Any) -> tuple[tuple[Any, ...], Any]:
        (model, opt_state, value), state = out
        return (state, model, opt_state), value

    return Trainer(step, (state, model, OPTIMIZER.init(model)), split, batches())


def builders() -> dict[str, tuple[str | None, bool, Callable[[], Trainer]]]:
    """Name -> (module it needs, one-pass variance, builder), baselines first."""
    from . import e2e_libs

    out: dict[str, tuple[str | None, bool, Callable[[], Trainer]]] = {
        "hand": (None, False, build_hand),
        "hand one-pass": (None, True, lambda: build_hand(True)),
        "hand copy": (None, False, build_hand),
        "hand, statistics donated": (None, False, lambda: build_hand(donate=(1,))),
        "lift.jit": (None, False, build_lift),
    }
    for name, (module, onepass, build) in e2e_libs.BUILDERS.items():
        out[name] = (module, onepass, build)
    return out


def _available(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def first_call(trainer: Trainer) -> float:
    """Seconds of a new trainer's first call: trace, compile and run one step."""
    start = time.perf_counter()
    jax.block_until_ready(trainer())
    return time.perf_counter() - start


def main(quick_run: bool | None = None) -> list[dict[str, Any]]:
    """Time every implementation's training step; throughput rows, then compile rows."""
    q = quick() if quick_run is None else quick_run
    skipped: list[dict[str, Any]] = []
    build: dict[str, Callable[[], Trainer]] = {}
    onepass: dict[str, bool] = {}
    for name, (module, one, builder) in builders().items():
        if q and name in ANCHORS_ONLY_IN_FULL:
            continue
        if _available(module):
            build[name], onepass[name] = builder, one
        else:
            skipped.append(skipped_row(f"e2e throughput, {name}", f"no {module}"))
    # One untimed step first: it fills the caches JAX shares between functions.
    jax.block_until_ready(build_hand()())
    trainers = {name: b() for name, b in build.items()}
    compiles = {name: [first_call(t)] for name, t in trainers.items()}
    rounds, number = (3, 5) if q else (ROUNDS, NUMBER)
    timing = compare(trainers, rounds=rounds, number=number, warmup=3)
    rows = [throughput_row(timing, name, onepass) for name in build if name != "hand"]
    rows += memory_rows(trainers["lift.jit"], trainers["hand"])
    # More first calls, each of a trainer built anew, in alternating order.
    again = [n for n in build if n not in ANCHORS_ONLY_IN_FULL]
    for r in range(0 if q else COMPILE_ROUNDS - 1):
        for name in again[:: -1 if r % 2 == 0 else 1]:
            compiles[name].append(first_call(build[name]()))
    for name in again:
        if not name.startswith("hand"):
            base = "hand one-pass" if onepass[name] else "hand"
            s, b = statistics.median(compiles[name]), statistics.median(compiles[base])
            label = LABELS.get(name, name)
            rows.append(row(f"e2e first step (compile), {label}", s, b, None))
    return rows + skipped


def memory(trainer: Trainer) -> dict[str, int]:
    """Bytes of the compiled step's arguments, outputs, aliases and temporaries."""
    x, y = trainer.data[0]
    stats = trainer.step.lower(*trainer.carry, x, y).compile().memory_analysis()
    return {
        what: getattr(stats, f"{what}_size_in_bytes")
        for what in ("argument", "output", "alias", "temp")
    }


def memory_rows(lifted: Trainer, hand: Trainer) -> list[dict[str, Any]]:
    """The compiled memory of lift's step and the hand-written one's (target: equal)."""
    ours, theirs = memory(lifted), memory(hand)
    donated = ", ".join(f"{k}={v}" for k, v in lift_jit_options().items())
    rows = []
    for what in ours:
        r = row(
            f"e2e compiled memory, {what} bytes",
            ours[what],
            theirs[what],
            1.0,
            unit="bytes",
            note=f"memory_analysis(); lift.jit({donated}) vs donate_argnums=(0, 1, 2)",
        )
        r["pass"] = ours[what] == theirs[what]  # equal, not merely no more
        rows.append(r)
    return rows


def throughput_row(timing: Any, name: str, onepass: dict[str, bool]) -> dict[str, Any]:
    """Steps per second of ``name`` over its baseline's, per round; median and CI."""
    base = "hand one-pass" if onepass[name] and name != "hand one-pass" else "hand"
    ratios = [1 / r for r in timing.ratios(name, base)]
    low, high = bootstrap_median(ratios)
    out = row(
        f"e2e throughput, {LABELS.get(name, name)}",
        timing.median(name),
        timing.median(base),
        TARGET if name == "lift.jit" else None,
        ratio=statistics.median(ratios),
        note=f"vs {'one' if base == 'hand one-pass' else 'two'}-pass hand-written; "
        f"95% CI {low:.3f}-{high:.3f} over {len(ratios)} rounds"
        + (f"; lift.jit options {lift_jit_options()}" if name == "lift.jit" else ""),
        higher=True,
    )
    out["low"], out["high"] = low, high
    return out


if __name__ == "__main__":
    print_rows(main())
