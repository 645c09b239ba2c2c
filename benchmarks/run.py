"""Run every benchmark in one process: print a table, write JSON and a PNG chart.

Usage (from the repository root)::

    python benchmarks/run.py            # full run, about 20 minutes
    LIFT_BENCH_QUICK=1 python benchmarks/run.py   # smoke run, a few minutes
    python benchmarks/run.py --quick --only e2e   # one module, smoke run

Writes ``benchmarks/results.json`` (rows and machine info),
``benchmarks/results.png`` (ratios against targets) and, with the end-to-end
benchmark, ``benchmarks/e2e.png`` (throughput ratios). ``--out DIR`` writes them
elsewhere; ``--only export,scan`` runs a subset.

The dispatch targets, as settled in issue 17: lift's own code, ``lift ÷ hand-written
on lift's layout`` in instructions (callgrind), <= 1.005; and the user-facing ``lift ÷
hand-written`` in wall time <= 1.05 as the median of ``--runs`` (default 3) full runs
of ``benchmarks.dispatch``, each in a process of its own, every run shown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks import dispatch, e2e, export, instructions, others, scan
from benchmarks._timing import format_table, machine_info, quick

MODULES = {
    "export": export,
    "dispatch": dispatch,
    "scan": scan,
    "instructions": instructions,
    "others": others,
    "e2e": e2e,
}
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The contract on lift's own code (issue 17), judged on the instruction counts.
OWN_CODE_ROW = "  lift ÷ hand-written on lift's layout"
OWN_CODE_TARGET = 1.005
DISPATCH_ROW = "train step dispatch (1 layer), wall time"


def settle_targets(rows: list[dict[str, Any]]) -> None:
    """Judge lift's own code on instructions: lift ÷ hand-written on its layout."""
    for r in rows:
        if r["name"] == OWN_CODE_ROW and r["unit"] == "instr":
            r["target"], r["judged"] = OWN_CODE_TARGET, True
            r["pass"] = bool(r["ratio"] <= OWN_CODE_TARGET)
            r["note"] = "lift's own code (the contract on it)"


def run_module_in_child(name: str, q: bool) -> list[dict[str, Any]]:
    """One module's rows, measured in a fresh Python process."""
    code = (
        "import json, sys; from benchmarks import run; "
        f"rows = run.MODULES[{name!r}].main({q!r}); "
        "sys.stdout.write('\\n@@rows@@' + json.dumps(rows))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {name} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.rsplit("@@rows@@", 1)[1])


def median_of_runs(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows whose ratio (and times) are the medians over runs; the target row per run.

    Every run's ratio is listed in the note; the dispatch target is judged on the
    median, and each run's own row is shown under it, not judged.
    """
    out = []
    for i, first in enumerate(runs[0]):
        same = [run[i] for run in runs]
        if any(r["name"] != first["name"] for r in same) or first["ratio"] is None:
            out.append(first)
            continue
        r = dict(first)
        for field in ("lift", "baseline", "ratio"):
            r[field] = statistics.median(x[field] for x in same)
        r.pop("low", None)
        r.pop("high", None)
        each = ", ".join(f"{x['ratio']:.3f}" for x in same)
        r["note"] = f"median of {len(runs)} runs ({each})"
        if r["target"] is not None and r.get("judged", True):
            r["pass"] = bool(r["ratio"] <= r["target"])
        if first["name"] == DISPATCH_ROW:
            r["name"] = f"{DISPATCH_ROW}, median of {len(runs)} runs"
            out.append(r)
            for k, x in enumerate(same, 1):
                each_run = dict(x, name=f"    run {k} of {len(runs)}", judged=False)
                each_run["pass"] = None
                out.append(each_run)
            continue
        out.append(r)
    return out


def plot(rows: list[dict[str, Any]], path: Path, info: dict[str, Any]) -> None:
    """A horizontal bar chart of each ratio, with its target (lift) or as an anchor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio"] is not None and not r.get("higher")]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(shown) + 1.6))
    ys = range(len(shown))[::-1]
    colors = []
    for r in shown:
        if r["pass"] is None:  # an anchor, or a measure reported beside its target
            colors.append("#9e9e9e")
        else:
            colors.append("#2e7d32" if r["pass"] else "#c62828")
    ax.barh(list(ys), [r["ratio"] for r in shown], color=colors, height=0.7)
    for y, r in zip(ys, shown, strict=True):
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="black", lw=1.5)
        ax.text(r["ratio"] * 1.03, y, f"{r['ratio']:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(ys), [r["name"] for r in shown], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="#555555", lw=0.6, ls="--")
    ax.set_xlabel(
        "ratio to the baseline (log scale; lower is better). Green/red: lift vs its "
        "target (black tick); grey: anchors, and instruction counts (not judged)"
    )
    ax.set_title(
        f"lift benchmarks - {info['cpu']}, {info['cores']} cores, "
        f"jax {info['versions']['jax']}, {info['date'][:10]}"
        + (" (quick run)" if info["quick"] else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(rows: list[dict[str, Any]], path: Path, info: dict[str, Any]) -> None:
    """Throughput of each implementation as a ratio to its hand-written baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("higher") and r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.36 * len(shown) + 1.4))
    ys = list(range(len(shown)))[::-1]
    for y, r in zip(ys, shown, strict=True):
        color = (
            "#2e7d32" if r["pass"] else "#c62828" if r["pass"] is False else "#9e9e9e"
        )
        if "one-pass" in r["note"] and r["pass"] is None:
            color = "#b0bec5"
        ax.barh(y, r["ratio"], color=color, height=0.7)
        if "low" in r:
            ax.plot([r["low"], r["high"]], [y, y], color="black", lw=1)
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="black", lw=1.5)
        ax.text(0.02, y, f"{r['ratio']:.2f}", va="center", fontsize=7, color="white")
    names = [r["name"].removeprefix("e2e throughput, ") for r in shown]
    ax.set_yticks(ys, names, fontsize=8)
    ax.axvline(1.0, color="#555555", lw=0.6, ls="--")
    ax.set_xlabel(
        "steps per second ÷ the hand-written step's (higher is better)\n"
        "dark grey: vs the two-pass, light: vs the one-pass hand-written step",
        fontsize=8,
    )
    ax.set_title(
        f"ResNet on digits, batch {e2e.BATCH} - {info['cpu']}, {info['cores']} cores, "
        f"{info['date'][:10]}" + (" (quick run)" if info["quick"] else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; the exit code is 0 even when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--only", default=",".join(MODULES))
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="full runs of the dispatch module, each in its own process "
        "(default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (as LIFT_BENCH_QUICK=1)"
    )
    args = parser.parse_args(argv)
    q = quick() or args.quick
    if args.quick:
        os.environ["LIFT_BENCH_QUICK"] = "1"  # the children and machine_info see it
    runs = args.runs if args.runs is not None else (1 if q else 3)
    rows: list[dict[str, Any]] = []
    seconds = {}
    for name in args.only.split(","):
        start = time.perf_counter()
        if name == "dispatch" and runs > 1:
            module_rows = median_of_runs(
                [run_module_in_child(name, q) for _ in range(runs)]
            )
        else:
            module_rows = MODULES[name].main(q)
        seconds[name] = round(time.perf_counter() - start, 1)
        for r in module_rows:
            r["module"] = name
        rows += module_rows
        print(f"[{name}: {seconds[name]} s]", file=sys.stderr, flush=True)
    settle_targets(rows)
    info = machine_info()
    info["seconds"] = seconds
    info["dispatch_runs"] = runs
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
        f.write("\n")
    plot(rows, args.out / "results.png", info)
    if any(r.get("higher") for r in rows):
        plot_e2e(rows, args.out / "e2e.png", info)
    missed = [r["name"] for r in rows if r["pass"] is False]
    print(f"\n{len(rows)} rows; targets missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
