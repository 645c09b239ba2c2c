"""Run every benchmark in one process: print a table, write JSON and a PNG chart.

Usage (from the repository root)::

    python benchmarks/run.py            # full run, several minutes
    LIFT_BENCH_QUICK=1 python benchmarks/run.py   # smoke run, under two minutes

Writes ``benchmarks/results.json`` (rows and machine info) and
``benchmarks/results.png`` (ratios against targets). ``--out DIR`` writes them
elsewhere; ``--only export,scan`` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks import dispatch, export, instructions, others, scan
from benchmarks._timing import format_table, machine_info, quick

MODULES = {
    "export": export,
    "dispatch": dispatch,
    "scan": scan,
    "instructions": instructions,
    "others": others,
}
HERE = Path(__file__).resolve().parent


def plot(rows: list[dict[str, Any]], path: Path, info: dict[str, Any]) -> None:
    """A horizontal bar chart of each ratio, with its target (lift) or as an anchor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio"] is not None]
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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; the exit code is 0 even when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--only", default=",".join(MODULES))
    args = parser.parse_args(argv)
    q = quick()
    rows: list[dict[str, Any]] = []
    seconds = {}
    for name in args.only.split(","):
        start = time.perf_counter()
        module_rows = MODULES[name].main(q)
        seconds[name] = round(time.perf_counter() - start, 1)
        for r in module_rows:
            r["module"] = name
        rows += module_rows
        print(f"[{name}: {seconds[name]} s]", file=sys.stderr, flush=True)
    info = machine_info()
    info["seconds"] = seconds
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
        f.write("\n")
    plot(rows, args.out / "results.png", info)
    missed = [r["name"] for r in rows if r["pass"] is False]
    print(f"\n{len(rows)} rows; targets missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
