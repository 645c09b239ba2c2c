"""One stateful step, the same outputs and state eager, jitted, vmapped, scanned.

A ``variant`` fixture runs a BatchNorm-like step with running mean/var and a counter
several steps in a row; every variant must match both the eager run and a pure
reference written with plain ``jnp`` math. States are compared with Chex
(``assert_trees_all_close(..., strict=True)``: same keys, shapes, dtypes and values).

``chex.variants`` is not used for the fixture: it parametrizes ``chex.TestCase``
(unittest) methods, not pytest tests, and its variants are JAX's ``jit``/``pmap`` with
and without device placement, while these are lift's ``jit``, ``vmap`` with a named
batch axis over one and many lanes, and ``scan``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FEATURES, bn_reference, bn_step, bn_values, make_bn

import lift

STEPS = 3
BATCH = 4
RTOL = 1e-5
ATOL = 1e-6


@dataclass(frozen=True)
class Variant:
    """How to run ``STEPS`` steps of the BatchNorm step, and on how many examples."""

    name: str
    batch: int
    run: Callable  # (model, state, xs[steps, batch, features]) -> (ys, state)


def _run_eager(model, state, xs):
    step = lift.stateful(lambda x: bn_step(model, x))
    ys = []
    for x in xs:
        y, state = step(state, x)
        ys.append(y)
    return jnp.stack(ys), state


def _run_jit(model, state, xs):
    step = lift.jit(lift.stateful(lambda x: bn_step(model, x)))
    ys = []
    for x in xs:
        y, state = step(state, x)
        ys.append(y)
    return jnp.stack(ys), state


def _run_vmap(model, state, xs):
    # One example per vmap lane; the statistics are pmean-ed over the batch axis.
    per_example = lift.vmap(
        lambda x: bn_step(model, x, axis_name="batch"), axis_name="batch"
    )
    step = lift.stateful(per_example)
    ys = []
    for x in xs:
        y, state = step(state, x)
        ys.append(y)
    return jnp.stack(ys), state


def _run_scan(model, state, xs):
    def body(carry, x):
        return carry, bn_step(model, x)

    (_, ys), state = lift.stateful(lambda xs: lift.scan(body, 0.0, xs))(state, xs)
    return ys, state


VARIANTS = {
    "eager": Variant("eager", BATCH, _run_eager),
    "jit": Variant("jit", BATCH, _run_jit),
    "vmap1": Variant("vmap1", 1, _run_vmap),
    "vmapn": Variant("vmapn", BATCH, _run_vmap),
    "scan": Variant("scan", BATCH, _run_scan),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> Variant:
    """Each way of running the step."""
    return VARIANTS[request.param]


@pytest.fixture
def data() -> np.ndarray:
    """``STEPS`` batches of ``BATCH`` examples, not centred and not unit-variance."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(STEPS, BATCH, FEATURES)) * [1.0, 3.0, 0.5] + [2.0, -1.0, 0]
    return xs.astype(np.float32)


@pytest.fixture
def model():
    """The exported BatchNorm-like layer."""
    return lift.export_state(make_bn())


def _pure_reference(tree, state, xs):
    values = bn_values(tree, state)
    ys = []
    for x in xs:
        y, values = bn_reference(tree, values, jnp.asarray(x))
        ys.append(y)
    return np.stack(ys), values


def _assert_matches(ys, state, tree, ref_ys, ref_values):
    expected = {tree[name]: ref for name, ref in ref_values.items()}
    chex.assert_trees_all_close(
        (ys, state), (ref_ys, expected), rtol=RTOL, atol=ATOL, strict=True
    )


def test_variant_matches_eager(variant, model, data):
    tree, state = model
    xs = data[:, : variant.batch]
    ys, new = variant.run(tree, state, xs)
    ref_ys, ref_state = _run_eager(tree, state, xs)
    chex.assert_shape(ys, (STEPS, variant.batch, FEATURES))
    _assert_matches(ys, new, tree, ref_ys, bn_values(tree, ref_state))
    assert int(new[tree["count"]]) == STEPS


def test_variant_matches_pure_reference(variant, model, data):
    tree, state = model
    xs = data[:, : variant.batch]
    ys, new = variant.run(tree, state, xs)
    ref_ys, ref_values = _pure_reference(tree, state, xs)
    _assert_matches(ys, new, tree, ref_ys, ref_values)


def test_variant_statistics_move(variant, model, data):
    """Guards the comparisons above: the running statistics really change."""
    tree, state = model
    xs = data[:, : variant.batch]
    _, new = variant.run(tree, state, xs)
    assert not np.allclose(new[tree["mean"]], state[tree["mean"]])
    if variant.batch > 1:
        assert not np.allclose(new[tree["var"]], state[tree["var"]])
    # the input state is untouched
    np.testing.assert_array_equal(state[tree["mean"]], np.zeros(FEATURES))
    assert int(state[tree["count"]]) == 0


def test_variant_continues_from_its_own_state(variant, model, data):
    tree, state = model
    xs = data[:, : variant.batch]
    _, mid = variant.run(tree, state, xs[:1])
    _, end = variant.run(tree, mid, xs[1:])
    _, ref = _run_eager(tree, state, xs)
    chex.assert_trees_all_close(end, ref, rtol=RTOL, atol=ATOL, strict=True)
