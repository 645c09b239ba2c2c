"""Shared timing utilities: interleaved rounds, medians, rows, machine facts.

Every measure is a ratio against a baseline timed in the same process, in interleaved
rounds (A, B, A, B, ...: the order alternates each round), so that a noisy machine
slows both sides alike. Warm-up calls (compilation, caches) are excluded; outputs are
waited on with :func:`jax.block_until_ready`. The ratio reported is the median of the
per-round ratios, and the times the medians of the per-round times.

Short rounds, many of them: on a shared machine the speed of the CPU drifts by tens
of percent within milliseconds, so the two sides of a ratio must run close together
in time. :meth:`Timing.interval` gives a bootstrap confidence interval of a ratio, and
an "A/A" ratio (a function against another compiled copy of itself) shows what the
method resolves on the machine at hand.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

__all__ = [
    "Timing",
    "bootstrap_median",
    "compare",
    "compared_row",
    "fit_slope",
    "format_table",
    "machine_info",
    "print_rows",
    "quick",
    "row",
    "skipped_row",
    "time_calls",
]


def quick() -> bool:
    """Whether ``LIFT_BENCH_QUICK=1`` asks for a fast smoke run (CI)."""
    return os.environ.get("LIFT_BENCH_QUICK", "") not in ("", "0")


def clock() -> Callable[[], float]:
    """The timer: wall time, or with ``LIFT_BENCH_TIMER=process`` this process's CPU.

    Wall time (the default) is what a user waits for. On a machine shared with other
    busy processes, the CPU time of this process (all its threads, including XLA's)
    is far less disturbed by them, at the price of not counting idle waits.
    """
    if os.environ.get("LIFT_BENCH_TIMER", "wall") == "process":
        return time.process_time
    return time.perf_counter


def time_calls(fn: Callable[[], Any], number: int, *, block: bool = True) -> float:
    """Seconds per call of ``fn()`` over ``number`` calls, waiting on the last output.

    Calls are dispatched back to back, as in a training loop; the wait at the end
    makes sure the work queued by asynchronous dispatch is counted. ``block=False``
    skips it, for functions that only move Python objects (the wait would walk the
    output tree and be timed too).
    """
    now = clock()
    out = None
    start = now()
    for _ in range(number):
        out = fn()
    if block:
        jax.block_until_ready(out)
    return (now() - start) / number


class Timing:
    """Per-round seconds per call of several callables timed in interleaved rounds."""

    def __init__(self, names: Sequence[str]) -> None:
        self.rounds: dict[str, list[float]] = {name: [] for name in names}

    def median(self, name: str) -> float:
        """Median seconds per call of ``name`` over the rounds."""
        return statistics.median(self.rounds[name])

    def ratios(self, name: str, baseline: str) -> list[float]:
        """Per round, ``name``'s time divided by ``baseline``'s time."""
        pairs = zip(self.rounds[name], self.rounds[baseline], strict=True)
        return [a / b for a, b in pairs]

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of ``name``'s time divided by ``baseline``'s time."""
        return statistics.median(self.ratios(name, baseline))

    def interval(
        self, name: str, baseline: str, *, level: float = 0.95, resamples: int = 1000
    ) -> tuple[float, float]:
        """Bootstrap confidence interval of :meth:`ratio` (rounds resampled)."""
        return bootstrap_median(self.ratios(name, baseline), level, resamples)


def bootstrap_median(
    xs: Sequence[float], level: float = 0.95, resamples: int = 1000
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``xs`` (a fixed seed)."""
    rng = random.Random(0)
    meds = sorted(
        statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples)
    )
    tail = int(resamples * (1 - level) / 2)
    return meds[tail], meds[resamples - 1 - tail]


def compare(
    fns: dict[str, Callable[[], Any] | Sequence[Callable[[], Any]]],
    *,
    rounds: int,
    number: int = 1,
    warmup: int = 2,
    setup: Callable[[int], dict[str, Callable[[], Any]]] | None = None,
    block: bool = True,
) -> Timing:
    """Time each callable of ``fns`` in ``rounds`` interleaved rounds.

    Args:
        fns: name -> zero-argument callable, or a list of copies of it (separately
            built and compiled: each executable and its buffers land at their own
            addresses, which moves one copy's time by a percent or two). Every
            callable is timed in each round; a name's time for the round is the
            mean over its copies, and the copies of all names are interleaved.
        rounds: how many rounds; the order of the callables alternates each round.
        number: calls per round of each callable (timed together).
        warmup: untimed calls of each callable before the first round.
        setup: if given, called with the round index before each round and returns
            the callables to time in that round (for measures that need a fresh
            input each round, e.g. a new tree structure); ``fns`` is then only used
            for the names and the warm-up.
        block: wait on each output with :func:`jax.block_until_ready` (off for
            functions that dispatch no JAX computation).

    Returns:
        The :class:`Timing` of every round.
    """
    names = list(fns)
    for copies in map(_copies, fns.values()):
        for fn in copies:
            for _ in range(warmup):
                out = fn()
                if block:
                    jax.block_until_ready(out)
    timing = Timing(names)
    for r in range(rounds):
        current = fns if setup is None else setup(r)
        groups = {name: _copies(current[name]) for name in names}
        order = names if r % 2 == 0 else names[::-1]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        # As timeit does: collect between measurements, not during them, so that one
        # function's garbage is not collected on another's clock. Once a round: a
        # collection evicts the CPU's caches, and would slow the block after it.
        gc.collect()
        gc.disable()
        try:
            for i in range(max(map(len, groups.values()))):
                for name in order:
                    if i < len(groups[name]):
                        seconds[name].append(
                            time_calls(groups[name][i], number, block=block)
                        )
        finally:
            gc.enable()
        for name in names:
            timing.rounds[name].append(statistics.fmean(seconds[name]))
    return timing


def _copies(
    fn: Callable[[], Any] | Sequence[Callable[[], Any]],
) -> Sequence[Callable[[], Any]]:
    return fn if isinstance(fn, (list, tuple)) else [fn]


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den


def row(
    name: str,
    lift: float,
    baseline: float,
    target: float | None,
    *,
    ratio: float | None = None,
    unit: str = "us",
    note: str = "",
    judged: bool = True,
    higher: bool = False,
) -> dict[str, Any]:
    """One result row; ``ratio`` defaults to ``lift / baseline``.

    ``target`` ``None`` marks an anchor (another library), which has no pass/fail;
    ``judged=False`` shows a measure beside its target without judging it (the target
    is judged on another row: an instruction count beside the time it cross-checks).
    ``higher=True`` marks a ratio where higher is better (a throughput): it passes at
    or above its target.
    """
    if ratio is None:
        ratio = lift / baseline
    ok = target is not None and (ratio >= target if higher else ratio <= target)
    out = {
        "name": name,
        "lift": lift,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "pass": None if target is None or not judged else bool(ok),
        "judged": target is not None and judged,
        "unit": unit,
        "note": note,
    }
    if higher:
        out["higher"] = True
    return out


def compared_row(
    name: str,
    timing: Timing,
    side: str,
    baseline: str,
    target: float | None,
    *,
    unit: str = "us",
    note: str = "",
    judged: bool = True,
) -> dict[str, Any]:
    """``side`` against ``baseline`` of one :func:`compare`: medians, ratio, 95% CI."""
    low, high = timing.interval(side, baseline)
    rounds = len(timing.rounds[side])
    ci = f"95% CI {low:.3f}-{high:.3f} over {rounds} rounds"
    out = row(
        name,
        timing.median(side),
        timing.median(baseline),
        target,
        ratio=timing.ratio(side, baseline),
        unit=unit,
        note=f"{note}; {ci}" if note else ci,
        judged=judged,
    )
    out["low"], out["high"] = low, high
    return out


def skipped_row(name: str, why: str) -> dict[str, Any]:
    """A row for a measure that could not run (a library is not installed)."""
    return {
        "name": name,
        "lift": None,
        "baseline": None,
        "ratio": None,
        "target": None,
        "pass": None,
        "unit": "",
        "note": f"skipped: {why}",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """The machine and library versions a run was measured on."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "versions": {
            name: _version(name)
            for name in (
                "jax-lift",
                "jax",
                "jaxlib",
                "equinox",
                "inox",
                "flax",
                "dm-haiku",
            )
        },
        "quick": quick(),
        "timer": os.environ.get("LIFT_BENCH_TIMER", "wall"),
    }


def print_rows(rows: Sequence[dict[str, Any]]) -> None:
    """Print rows as the table ``run.py`` prints."""
    print(format_table(rows))


def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "us":
        if x < 1e-3:
            return f"{x * 1e6:.1f} us"
        return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"
    if unit == "us/layer":
        return f"{x * 1e6:.2f} us"
    if unit == "eqns":
        return f"{x:.0f}"
    if unit in ("instr", "instr/layer"):
        return f"{x / 1e3:.1f}k"
    if unit == "bytes":
        return f"{x / 1e3:.1f} kB"
    return f"{x:.3g}"


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The rows as a text (or Markdown) table: measure, lift, baseline, ratio, ..."""
    header = ["measure", "lift", "baseline", "ratio", "target", "ok"]
    lines = []
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r["pass"]]
        if r["note"].startswith("skipped"):
            ok = r["note"]
        if r["target"] is None:
            target = "anchor"
        else:
            sign = ">=" if r.get("higher") else "<="
            target = f"{sign} {r['target']:g}" + ("" if r.get("judged", True) else " *")
        lines.append(
            [
                r["name"],
                _num(r["lift"], r["unit"]),
                _num(r["baseline"], r["unit"]),
                "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
                target,
                ok,
            ]
        )
    footer = []
    if any(r["target"] is not None and not r.get("judged", True) for r in rows):
        footer = ["* shown beside the target, not judged (it is judged on another row)"]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join([*out, "", *footer] if footer else out)
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out + footer)
