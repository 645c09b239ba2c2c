"""The benchmarks' helpers: interleaved timing, intervals, rows, instruction dumps."""

from __future__ import annotations

import statistics

import pytest

from benchmarks import instructions
from benchmarks._timing import (
    Timing,
    bootstrap_median,
    compare,
    compared_row,
    fit_slope,
    format_table,
    row,
)


def test_compare_times_every_copy_each_round_and_warms_each_up():
    calls: dict[str, int] = {"a0": 0, "a1": 0, "b": 0}
    order: list[str] = []

    def counter(name):
        def call():
            calls[name] += 1
            order.append(name)

        return call

    timing = compare(
        {"a": [counter("a0"), counter("a1")], "b": counter("b")},
        rounds=3,
        number=4,
        warmup=2,
        block=False,
    )
    assert calls == {"a0": 2 + 12, "a1": 2 + 12, "b": 2 + 12}
    assert [len(timing.rounds[n]) for n in ("a", "b")] == [3, 3]
    assert all(t >= 0 for n in ("a", "b") for t in timing.rounds[n])
    # Copies are interleaved with the other names: a0, b, a1 in round 0 (after warm-up).
    timed = order[6:]
    assert timed[:12] == ["a0"] * 4 + ["b"] * 4 + ["a1"] * 4
    # The order of the names alternates each round.
    assert timed[12:24] == ["b"] * 4 + ["a0"] * 4 + ["a1"] * 4


def test_fit_slope_is_the_least_squares_slope():
    assert fit_slope([1, 2, 4, 8], [3, 5, 9, 17]) == pytest.approx(2.0)


def test_bootstrap_median_brackets_the_median_and_repeats():
    xs = [1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0, 1.04, 0.96]
    low, high = bootstrap_median(xs)
    assert low <= statistics.median(xs) <= high
    assert (low, high) == bootstrap_median(xs)  # a fixed seed
    tight = bootstrap_median([1.0 + (x - 1.0) / 10 for x in xs])
    assert tight[1] - tight[0] < high - low


def test_a_row_reported_beside_its_target_is_not_judged():
    judged = row("a", 2.0, 1.0, 1.5)
    reported = row("b", 2.0, 1.0, 1.5, judged=False)
    anchor = row("c", 2.0, 1.0, None)
    assert judged["pass"] is False
    assert reported["pass"] is None
    assert anchor["pass"] is None
    table = format_table([judged, reported, anchor])
    assert "<= 1.5 *" in table
    assert "not judged" in table
    assert "not judged" not in format_table([judged, anchor])


def test_compared_row_gives_the_median_ratio_and_its_interval():
    timing = Timing(["a", "b"])
    timing.rounds["a"] = [2.0, 2.2, 1.8, 2.0, 2.1]
    timing.rounds["b"] = [1.0, 1.0, 1.0, 1.0, 1.0]
    out = compared_row("m", timing, "a", "b", 2.5)
    assert out["ratio"] == pytest.approx(2.0)
    assert out["low"] <= 2.0 <= out["high"]
    assert out["pass"] is True
    assert "over 5 rounds" in out["note"]


def _dump(path, label, calls, total):
    path.write_text(
        f"version: 1\ndesc: Trigger: Client Request: {label}|{calls}\n"
        f"events: Ir\nsummary: {total}\ntotals: {total}\n"
    )


def test_instruction_dumps_give_the_median_pass_and_the_mean_copy(tmp_path):
    _dump(tmp_path / "cg.7.1", "hand#0", 10, 1000)
    _dump(tmp_path / "cg.7.2", "hand#0", 10, 1300)
    _dump(tmp_path / "cg.7.3", "hand#0", 10, 1100)  # median of the passes: 110
    _dump(tmp_path / "cg.7.4", "hand#1", 10, 1300)  # another copy: 130
    _dump(tmp_path / "cg.7.5", "lift 4", 5, 600)
    (tmp_path / "cg.7").write_text("desc: Trigger: Program termination\n")
    counts = instructions.parse(sorted(tmp_path.glob("cg.*.*")))
    assert counts == {"hand": 120.0, "lift 4": 120.0}


def test_instruction_rows_are_ratios_and_slopes_of_the_counts():
    layers = instructions.plan(True)["layers"]
    counts = {"hand": 100.0, "hand copy": 101.0, "lift": 104.0, "layout": 103.0}
    counts |= {"nested": 106.0, "scan hand": 200.0, "scan hand copy": 200.0}
    counts["scan lift"] = 220.0
    counts |= {"tree hand": 10.0, "tree layout": 12.5, "tree none": 11.0}
    for n in layers:
        counts[f"hand {n}"] = 50.0 + 10.0 * n
        counts[f"lift {n}"] = 52.0 + 12.0 * n
    rows = {r["name"].strip(): r for r in instructions.rows_from(counts, True)}
    step = rows["train step dispatch (1 layer), instructions"]
    assert step["ratio"] == 1.04
    assert step["target"] == 1.05
    assert step["pass"] is None  # a cross-check: shown beside the target
    slope = rows["added dispatch per stateful layer, instructions"]
    assert slope["ratio"] == pytest.approx(1.2)
    assert rows["scan run, 100 steps, instructions"]["ratio"] == 1.1
    assert rows["A/A: hand-written ÷ another compiled copy of it"]["ratio"] == 1.01
    # The layout's extra tree work on top of the hand-written step: (100 + 2.5) / 100.
    assert rows["of which JAX's tree work, lift's layout"]["ratio"] == 1.025
    assert rows["of which JAX's tree work, None for each StateKey"]["ratio"] == 1.01
    names = [r["name"].strip() for r in instructions.rows_from(counts, True)]
    at = names.index("hand-written on lift's layout ÷ hand-written")
    assert names[at + 1] == "of which JAX's tree work, lift's layout"


def test_tree_work_flattens_the_arguments_and_rebuilds_the_outputs():
    import jax

    import lift

    with jax.numpy_rank_promotion("allow"):  # the benchmark's step broadcasts its bias
        work = instructions._tree_work()
    assert set(work) == {"tree hand", "tree layout", "tree none"}
    (model, _), state = work["tree layout"]()
    assert all(isinstance(k, lift.StateKey) for k in state)
    assert set(state) == set(
        v for layer in model for v in layer.values() if isinstance(v, lift.StateKey)
    )
    (bare, _), bare_state = work["tree none"]()
    assert [sorted(layer) for layer in bare] == [sorted(layer) for layer in model]
    assert all(type(k) is str for k in bare_state)
    assert all(layer["mean"] is None and layer["var"] is None for layer in bare)
    params, stats, _ = work["tree hand"]()
    assert [sorted(layer) for layer in params] == [["b", "w"]]
    assert len(stats) == len(bare_state) == 2


def test_a_throughput_row_passes_at_or_above_its_target():
    fast = row("t", 1.0, 1.0, 0.98, ratio=0.99, higher=True)
    slow = row("t", 1.0, 1.0, 0.98, ratio=0.97, higher=True)
    assert fast["pass"] is True
    assert slow["pass"] is False
    assert ">= 0.98" in format_table([fast])
    assert "<= 0.98" in format_table([row("u", 1.0, 1.0, 0.98)])


def _dispatch_rows(ratio, anchor):
    return [
        row("train step dispatch (1 layer), wall time", ratio, 1.0, 1.05),
        row("  A/A: hand-written ÷ other compiled copies of it", anchor, 1.0, None),
    ]


def test_the_dispatch_target_is_judged_on_the_median_of_the_runs():
    from benchmarks import run

    runs = [_dispatch_rows(r, a) for r, a in ((1.07, 1.0), (1.02, 1.01), (1.04, 0.99))]
    rows = run.median_of_runs(runs)
    names = [r["name"] for r in rows]
    assert names[0] == "train step dispatch (1 layer), wall time, median of 3 runs"
    assert rows[0]["ratio"] == pytest.approx(1.04)
    assert rows[0]["pass"] is True
    assert "1.070, 1.020, 1.040" in rows[0]["note"]
    # Each run shown under the median, not judged (one of them is above the target).
    assert names[1:4] == [f"    run {k} of 3" for k in (1, 2, 3)]
    assert [r["ratio"] for r in rows[1:4]] == [1.07, 1.02, 1.04]
    assert all(r["pass"] is None for r in rows[1:4])
    assert rows[4]["ratio"] == pytest.approx(1.0)  # the anchor: its median too
    missed = run.median_of_runs([_dispatch_rows(r, 1.0) for r in (1.07, 1.06, 1.0)])
    assert missed[0]["pass"] is False


def test_lift_own_code_is_judged_on_instructions_only():
    from benchmarks import run

    name = "  lift ÷ hand-written on lift's layout"
    counts = row(name, 1006.0, 1000.0, None, unit="instr")
    wall = row(name, 1.2, 1.0, None)
    run.settle_targets([counts, wall])
    assert counts["target"] == 1.005
    assert counts["pass"] is False  # 1.006 > 1.005
    assert wall["target"] is None
    assert wall["pass"] is None
    within = row(name, 1004.0, 1000.0, None, unit="instr")
    run.settle_targets([within])
    assert within["pass"] is True
