"""The end-to-end benchmark's models compute what the hand-written step computes.

lift's step must give the hand-written step's numbers bit for bit (same jaxpr, same
arithmetic), over several steps; every other library's model starts from the same
initial numbers (its first loss equals the hand-written one's within float rounding).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import e2e, e2e_libs

STEPS = 4


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(e2e, "BATCH", 8)
    monkeypatch.setattr(e2e, "BLOCKS", 1)  # less to compile
    # optax (Adam's bias correction) and the libraries' layers rely on JAX's default
    # promotion rules, which the test suite makes strict.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def run(trainer: e2e.Trainer, steps: int) -> list[np.ndarray]:
    return [np.asarray(trainer()) for _ in range(steps)]


def test_lift_step_is_bitwise_the_hand_written_step():
    hand, lifted = e2e.build_hand(), e2e.build_lift()
    hand_losses, lift_losses = run(hand, STEPS), run(lifted, STEPS)
    assert all(np.isfinite(hand_losses))
    assert hand_losses[0] != hand_losses[-1]  # it trains: the numbers move
    np.testing.assert_array_equal(lift_losses, hand_losses)
    params, stats, _ = hand.carry
    state, model, _ = lifted.carry
    for name in e2e.bn_names():
        layer = model
        for part in name.split("."):
            layer = layer[part]
        for stat in ("mean", "var"):
            want = np.asarray(stats[f"{name}.{stat}"])
            np.testing.assert_array_equal(np.asarray(state[layer[stat]]), want, name)
        np.testing.assert_array_equal(
            np.asarray(layer["kernel"]), np.asarray(_at(params, name)["kernel"])
        )
    assert len(state) == 2 * len(e2e.bn_names())


def _at(tree, name):
    for part in name.split("."):
        tree = tree[part]
    return tree


_BASELINES: dict[bool, list[np.ndarray]] = {}


def baseline(onepass: bool) -> list[np.ndarray]:
    """The hand-written step's first losses (each variant compiled once per session)."""
    if onepass not in _BASELINES:
        _BASELINES[onepass] = run(e2e.build_hand(onepass=onepass), STEPS)
    return _BASELINES[onepass]


def test_the_one_pass_baseline_differs_only_in_rounding():
    two, one = baseline(False), baseline(True)
    np.testing.assert_allclose(one, two, rtol=1e-4)


@pytest.mark.parametrize("name", list(e2e_libs.BUILDERS))
def test_each_library_starts_from_the_hand_written_numbers(name):
    module, onepass, build = e2e_libs.BUILDERS[name]
    pytest.importorskip(module)
    got = run(build(), 2)
    want = baseline(onepass)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert np.isfinite(got[1])
    assert got[1] != got[0]  # its second step trained


def test_lift_donates_state_model_and_optimizer_state():
    assert e2e.lift_jit_options() == {"donate_state": True, "donate_argnums": (0, 1)}


def test_lift_compiles_to_the_memory_of_the_hand_written_step():
    ours = e2e.memory(e2e.build_lift())
    theirs = e2e.memory(e2e.build_hand(donate=(0, 1, 2)))
    assert ours == theirs
    stats_only = e2e.memory(e2e.build_hand(donate=(1,)))
    assert ours["alias"] > stats_only["alias"]  # parameters and Adam's state too
