"""``state_axes`` / ``state_specs`` filters, and the ``xs`` that ``lift.scan`` reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import lift


@pytest.fixture
def stacked():
    """Four layers' statistics stacked on axis 0, under ``bn.mean``."""
    tree = {"bn": {"mean": lift.StateEntry(jnp.zeros((4, 3)))}}
    return lift.export_state(tree)


def _scan(pattern):
    def run():
        return lift.scan(
            lambda c, x: (c, None), 0.0, jnp.ones(4), state_axes={pattern: 0}
        )

    return run


# ------------------------------------------------------- a filter matching no key


def test_scan_refuses_a_filter_that_matches_no_key(stacked):
    # The docs idiom `layers.*` on a tree without a `layers` segment used to carry
    # the whole stack into every step, without an error.
    _, state = stacked
    with pytest.raises(lift.LiftValueError) as err:
        lift.stateful(_scan("layers.*"))(state)
    msg = str(err.value)
    assert "'layers.*'" in msg
    assert "lift.scan" in msg
    assert "'bn.mean'" in msg  # the (short) list of keys


def test_vmap_refuses_a_misspelt_filter_naming_the_closest_path():
    tree, state = lift.export_state({"last": lift.StateEntry(jnp.zeros((4, 3)))})
    f = lift.vmap(lambda x: x + lift.get(tree["last"]), state_axes={"lats": 0})
    with pytest.raises(lift.LiftValueError) as err:
        lift.stateful(f)(state, jnp.ones((4, 3)))
    msg = str(err.value)
    assert "'lats'" in msg
    assert "lift.vmap" in msg
    assert "closest existing path is 'last'" in msg


def test_a_statekey_filter_for_a_missing_key_is_refused(stacked):
    _, state = stacked
    with pytest.raises(lift.LiftValueError) as err:
        lift.stateful(_scan(lift.StateKey("['bn']['maen']")))(state)
    assert "['bn']['maen']" in str(err.value)
    assert "closest existing path is \"['bn']['mean']\"" in str(err.value)


def test_a_type_filter_matching_no_value_is_refused(stacked):
    _, state = stacked
    with pytest.raises(lift.LiftValueError, match="matches no key"):
        lift.stateful(_scan(np.ndarray))(state)


def test_a_long_state_is_not_listed_whole():
    entries = {f"k{i}": lift.StateEntry(jnp.zeros((2,))) for i in range(20)}
    _, state = lift.export_state(entries)
    f = lift.vmap(lambda x: x, state_axes={"zzz.*": 0})
    with pytest.raises(lift.LiftValueError) as err:
        lift.stateful(f)(state, jnp.ones(2))
    assert "20 keys in all" in str(err.value)


def test_shard_map_refuses_a_state_spec_filter_that_matches_no_key(stacked):
    _, state = stacked
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    f = lift.shard_map(
        lambda x: x,
        mesh=mesh,
        in_specs=P(),
        out_specs=P(),
        state_specs={"layers.*": P("data")},
    )
    with pytest.raises(lift.LiftValueError) as err:
        lift.stateful(f)(state, jnp.ones(2))
    assert "'layers.*'" in str(err.value)
    assert "shard_map" in str(err.value)


def test_matching_filters_and_predicates_are_accepted(stacked):
    tree, state = stacked
    _, new = lift.stateful(_scan("bn.*"))(state)
    assert new[tree["bn"]["mean"]].shape == (4, 3)
    # A predicate may select nothing: the way to name optional state.
    _, new = lift.stateful(_scan(lambda key, value: "cache" in key))(state)
    assert new[tree["bn"]["mean"]].shape == (4, 3)


def test_an_unmatched_filter_is_allowed_when_there_is_no_state():
    # Nothing to map: the same wrapper runs over models without state.
    out, _ = lift.stateful(_scan("layers.*"))({})
    assert out == (0.0, None)
    out = lift.vmap(lambda x: 2 * x, state_axes={"layers.*": 0})(jnp.ones(3))
    np.testing.assert_array_equal(out, 2 * np.ones(3))


# ------------------------------------------------------- scan over scalar xs


@pytest.mark.parametrize(
    ("xs", "where"),
    [(jnp.float32(1), "`xs`"), ((1.0, jnp.arange(4.0)), "`xs[0]`")],
    ids=["scalar", "python-float-leaf"],
)
@pytest.mark.parametrize("axes", [True, False], ids=["state_axes", "carried"])
def test_scan_refuses_an_xs_leaf_without_a_leading_axis(stacked, xs, where, axes):
    _, state = stacked
    state_axes = {"bn.*": 0} if axes else None

    def run():
        return lift.scan(lambda c, x: (c, None), 0.0, xs, state_axes=state_axes)

    with pytest.raises(lift.LiftValueError) as err:
        lift.stateful(run)(state)
    assert where in str(err.value)
    assert "no leading axis" in str(err.value)
