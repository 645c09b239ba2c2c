"""The benchmarks' timing helper: every copy of every function is timed each round."""

from __future__ import annotations

import pytest

from benchmarks._timing import compare, fit_slope


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
