"""Instruction counts: lift against hand-written JAX, reproducible run to run.

A cross-check of the wall times of ``benchmarks.dispatch`` and ``benchmarks.scan``:
on a shared machine the speed of the CPU drifts, while Valgrind's callgrind counts the
instructions executed, which repeat to about a percent whatever else the machine
does. The targets are judged on the wall times; here they are shown beside the
counts, not judged (a cache miss costs more than an add, so the two can differ).

One child process runs under ``valgrind --tool=callgrind`` with instrumentation off
until every function is compiled and warmed up; a small C helper (built here with the
system's C compiler against Valgrind's ``callgrind.h``) then zeroes the counters
before, and dumps them after, ``calls`` calls of each function, in three passes (in
order, reversed, in order); the median of the three is used, and a side of the 1-layer
step or of the scan is the mean of three separately compiled copies. XLA runs
synchronously in the child (``jax_cpu_enable_async_dispatch`` off), so every
instruction of a call, its computation included, runs on the calling thread and is
counted once. Cache misses are not simulated: the counts are of what the code does,
and the computations of both sides are the same jaxpr.

Measures, each ``lift ÷ hand-written`` in instructions per call: the 1-layer train step
of ``benchmarks.dispatch`` with the same anchors (A/A, layout, lift's own code, the
docs' layout), the added instructions per extra stateful layer (slope over 1..32
layers) and the 100-step scan of ``benchmarks.scan``. Two more anchors split the
layout's cost: JAX's flatten of the arguments and unflatten of the outputs alone, for
lift's layout and for the same layout holding ``None`` where the keys are, each added
to the hand-written step. Needs ``valgrind`` and a C compiler (Debian: ``apt install
valgrind gcc``); without them the rows say so and are skipped.

Run alone with ``python -m benchmarks.instructions``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._timing import fit_slope, print_rows, quick, row, skipped_row

__all__ = ["child", "main", "plan"]

ROOT = Path(__file__).resolve().parent.parent
HELPER = r"""
#include <valgrind/callgrind.h>
void lift_cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void lift_cg_zero(void) { CALLGRIND_ZERO_STATS; }
void lift_cg_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""
TIMEOUT = 3600


def plan(q: bool) -> dict[str, Any]:
    """What the child measures: calls per function and the layer counts."""
    return {
        "calls": 40 if q else 300,
        "layer_calls": 10 if q else 60,
        "scan_calls": 20 if q else 100,
        "layers": [1, 4, 8] if q else [1, 2, 4, 8, 16, 32],
        "copies": 1 if q else 3,
    }


def _functions(p: dict[str, Any]) -> dict[str, tuple[Callable[..., Any], Any, int]]:
    """Label -> (function, arguments, calls): everything the child counts.

    The 1-layer step and the scan have ``copies`` separately compiled copies per side
    (labelled ``name#i``): the count of one copy moves by up to a percent or two with
    where its executable and arguments land, and a side's count is their mean.
    """
    import jax

    from . import dispatch, scan

    builders: dict[str, tuple[Callable[[], tuple[Any, Any]], int]] = {
        "hand": (lambda: dispatch.build_hand(1), p["calls"]),
        "hand copy": (lambda: dispatch.build_hand(1), p["calls"]),
        "lift": (lambda: dispatch.build_lift(1), p["calls"]),
        "layout": (
            lambda: (
                jax.jit(dispatch.fresh(dispatch.same_layout_step)),
                dispatch.build_lift(1)[1],
            ),
            p["calls"],
        ),
        "nested": (lambda: dispatch.build_lift(1, nested=True), p["calls"]),
        "scan hand": (scan.build_hand, p["scan_calls"]),
        "scan hand copy": (scan.build_hand, p["scan_calls"]),
        "scan lift": (scan.build_lift, p["scan_calls"]),
    }
    fns = {}
    for name, (build, calls) in builders.items():
        for i in range(p["copies"]):
            fns[f"{name}#{i}"] = (*build(), calls)
    for layers in p["layers"]:
        fns[f"hand {layers}"] = (*dispatch.build_hand(layers), p["layer_calls"])
        fns[f"lift {layers}"] = (*dispatch.build_lift(layers), p["layer_calls"])
    for name, work in _tree_work().items():
        fns[name] = (work, (), p["calls"])
    return fns


def _tree_work() -> dict[str, Callable[[], Any]]:
    """JAX's tree work in a 1-layer call: flatten the arguments, unflatten the outputs.

    For the hand-written step, for lift's layout, and for lift's layout with ``None``
    in place of each ``StateKey`` (and ``str`` keys in the state): what the layout's
    extra dict entries cost apart from what its ``StateKey`` nodes cost.
    """
    import jax

    import lift

    from . import dispatch

    hand, hand_args = dispatch.build_hand(1)
    args = dispatch.build_lift(1)[1]
    out = jax.jit(dispatch.same_layout_step)(*args)
    state, model, x, y = args
    (_, value), _ = out
    bare = [
        {k: None if isinstance(v, lift.StateKey) else v for k, v in layer.items()}
        for layer in model
    ]
    bare_state = {str(k): v for k, v in state.items()}
    cases = {
        "tree hand": (hand_args, hand(*hand_args)),
        "tree layout": (args, out),
        "tree none": ((bare_state, bare, x, y), ((bare, value), bare_state)),
    }
    work = {}
    for name, (arguments, outputs) in cases.items():
        leaves, treedef = jax.tree.flatten(outputs)

        def one(args: Any = arguments, leaves: Any = leaves, treedef: Any = treedef):
            jax.tree.flatten(args)
            return treedef.unflatten(leaves)

        work[name] = one
    return work


def child(helper: str, plan_json: str) -> None:
    """Run inside callgrind: warm every function up, then count each one twice."""
    import ctypes

    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    lib = ctypes.CDLL(helper)
    fns = _functions(json.loads(plan_json))
    for f, args, _ in fns.values():
        for _ in range(5):
            out = f(*args)
        jax.block_until_ready(out)
    lib.lift_cg_start()
    order = list(fns.items())
    for label, (f, args, calls) in order + order[::-1] + order:
        for _ in range(3):
            out = f(*args)
        jax.block_until_ready(out)
        lib.lift_cg_zero()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        lib.lift_cg_dump(f"{label}|{calls}".encode())


def _missing() -> str | None:
    if shutil.which("valgrind") is None:
        return "no valgrind on PATH"
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler (cc) on PATH"
    return None


def count(q: bool) -> dict[str, float]:
    """Instructions per call of every function of :func:`plan`, from one child run."""
    with tempfile.TemporaryDirectory(prefix="lift-callgrind-") as tmp:
        out = Path(tmp)
        (out / "helper.c").write_text(HELPER)
        compiler = shutil.which("cc") or shutil.which("gcc") or "cc"
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", "helper.so", "helper.c"],
            cwd=out,
            check=True,
            capture_output=True,
        )
        code = (
            "import sys; from benchmarks.instructions import child; "
            "child(sys.argv[1], sys.argv[2])"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}/cg.%p",
                sys.executable,
                "-c",
                code,
                str(out / "helper.so"),
                json.dumps(plan(q)),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the callgrind child failed:\n{done.stderr[-3000:]}")
        return parse(sorted(out.glob("cg.*.*"), key=_dump_number))


def _dump_number(path: Path) -> int:
    return int(path.name.rsplit(".", 1)[1])


def parse(dumps: list[Path]) -> dict[str, float]:
    """Name -> instructions per call, from callgrind dumps.

    A label's count is the median over its passes; a name's is the mean over its
    copies (labels ``name#0``, ``name#1``, ...; a label without ``#`` is one copy).
    """
    passes: dict[str, list[float]] = {}
    for path in dumps:
        text = path.read_text()
        trigger = re.search(r"^desc: Trigger: Client Request: (.*)\|(\d+)$", text, re.M)
        total = re.search(r"^summary: (\d+)", text, re.M)
        if trigger and total:
            per_call = int(total.group(1)) / int(trigger.group(2))
            passes.setdefault(trigger.group(1), []).append(per_call)
    copies: dict[str, list[float]] = {}
    for label, counts in passes.items():
        copies.setdefault(label.split("#")[0], []).append(statistics.median(counts))
    return {name: statistics.fmean(counts) for name, counts in copies.items()}


ANCHORS = (
    ("  A/A: hand-written ÷ another compiled copy of it", "hand copy", "hand", ""),
    (
        "  hand-written on lift's layout ÷ hand-written",
        "layout",
        "hand",
        "the same explicit step, with StateKeys in the model",
    ),
    ("  lift ÷ hand-written on lift's layout", "lift", "layout", "lift's own code"),
    (
        "  lift, the docs' layout ÷ hand-written",
        "nested",
        "hand",
        "each layer's statistics in a 'bn' dict of their own",
    ),
)


# The hand-written step plus the extra tree work of a layout, over the hand-written
# step: how much of the layout anchor JAX's flatten and unflatten explain.
TREE_ANCHORS = (
    (
        "    of which JAX's tree work, lift's layout",
        "tree layout",
        "flatten of the arguments + unflatten of the outputs, beyond hand-written's",
    ),
    (
        "    of which JAX's tree work, None for each StateKey",
        "tree none",
        "the same dict entries in the model holding None: the entries' share",
    ),
)


def _tree_rows(counts: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for name, side, note in TREE_ANCHORS:
        extra = counts[side] - counts["tree hand"]
        step = counts["hand"] + extra
        rows.append(row(name, step, counts["hand"], None, unit="instr", note=note))
    return rows


def rows_from(counts: dict[str, float], q: bool) -> list[dict[str, Any]]:
    """The result rows for the counts of :func:`count`."""
    rows = [
        row(
            "train step dispatch (1 layer), instructions",
            counts["lift"],
            counts["hand"],
            1.05,
            unit="instr",
            judged=False,
        )
    ]
    for name, side, base, note in ANCHORS:
        rows.append(
            row(name, counts[side], counts[base], None, unit="instr", note=note)
        )
        if side == "layout":
            rows.extend(_tree_rows(counts))
    layers = plan(q)["layers"]
    lift_slope = fit_slope(layers, [counts[f"lift {n}"] for n in layers])
    hand_slope = fit_slope(layers, [counts[f"hand {n}"] for n in layers])
    rows.append(
        row(
            "added dispatch per stateful layer, instructions",
            lift_slope,
            hand_slope,
            1.1,
            unit="instr/layer",
            judged=False,
            note="slope over " + ", ".join(map(str, layers)) + " layers",
        )
    )
    rows.append(
        row(
            "scan run, 100 steps, instructions",
            counts["scan lift"],
            counts["scan hand"],
            1.05,
            unit="instr",
            judged=False,
        )
    )
    rows.append(
        row(
            "  A/A: hand-written scan ÷ another compiled copy of it",
            counts["scan hand copy"],
            counts["scan hand"],
            None,
            unit="instr",
        )
    )
    return rows


def main(quick_run: bool | None = None) -> list[dict[str, Any]]:
    """Count instructions in a callgrind child and return the rows."""
    q = quick() if quick_run is None else quick_run
    why = _missing()
    if why is not None:
        return [skipped_row("instruction counts (callgrind)", why)]
    return rows_from(count(q), q)


if __name__ == "__main__":
    print_rows(main())
