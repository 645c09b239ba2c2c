"""The walk that names entries: its shortcuts agree with JAX's own key paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings

import lift
from lift import StateEntry, export_state
from lift._paths import entry_paths
from tests.corpus import CORPUS, is_entry
from tests.strategies import trees


def jax_entry_paths(tree):
    """Every entry occurrence's path, as ``tree_flatten_with_path`` spells it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_entry)
    return [jax.tree_util.keystr(p) for p, x in flat if is_entry(x)]


def check_walks(tree):
    fast = entry_paths(tree, None)
    exact = entry_paths(tree, None, exact=True)
    assert fast[1] == exact[1] == jax_entry_paths(tree)
    assert [id(e) for e in fast[0]] == [id(e) for e in exact[0]]
    assert fast[2] == exact[2]


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_fast_walk_gives_jax_paths_on_the_corpus(case):
    tree = case.build()
    check_walks(tree)
    check_walks(tree)  # again, from what the first walk remembered


@settings(max_examples=60, deadline=None)
@given(trees())
def test_property_fast_walk_gives_jax_paths(tree):
    check_walks(tree)


@jax.tree_util.register_pytree_with_keys_class
class Named:
    """A custom node whose child names are its node data."""

    def __init__(self, names, values):
        self.names, self.values = tuple(names), tuple(values)

    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.DictKey(n) for n in self.names]
        return list(zip(keys, self.values, strict=True)), self.names

    @classmethod
    def tree_unflatten(cls, names, values):
        return cls(names, values)


def test_custom_node_names_follow_its_node_data():
    a = Named(["x", "y"], [StateEntry(jnp.zeros(1)), StateEntry(jnp.ones(1))])
    b = Named(["p", "q"], [StateEntry(jnp.zeros(1)), StateEntry(jnp.ones(1))])
    check_walks([a, b])
    _, state = export_state([a, b])
    assert list(map(str, state)) == ["[0]['x']", "[0]['y']", "[1]['p']", "[1]['q']"]


def test_equinox_module_fields_static_and_nested():
    eqx = pytest.importorskip("equinox")

    class Inner(eqx.Module):
        mean: StateEntry
        scale: float = eqx.field(static=True, default=1.0)

    class Outer(eqx.Module):
        first: Inner
        skip: jax.Array
        second: Inner
        tag: str = eqx.field(static=True, default="t")

    def build(tag):
        e = StateEntry(jnp.zeros(2))
        return Outer(Inner(e), jnp.ones(1), Inner(StateEntry(jnp.ones(2))), tag)

    for tag in ("a", "b"):
        check_walks([build(tag), build(tag)])
    _, state = export_state(build("c"))
    assert list(map(str, state)) == [".first.mean", ".second.mean"]


def test_node_flattening_differently_with_keys_is_refused():
    class Odd:
        def __init__(self, a, b):
            self.a, self.b = a, b

    jax.tree_util.register_pytree_with_keys(
        Odd,
        # With keys, one child is missing: JAX's flatten and the key walk would
        # disagree about which entry is where.
        lambda n: (((jax.tree_util.GetAttrKey("b"), n.b),), None),
        lambda _, c: Odd(*c),
        lambda n: ((n.a, n.b), None),
    )
    tree = Odd(StateEntry(jnp.zeros(1)), StateEntry(jnp.ones(1)))
    with pytest.raises(ValueError, match="flattens differently") as info:
        export_state(tree)
    assert isinstance(info.value, lift.LiftError)


def test_full_memos_are_emptied_and_the_keys_stay_right(monkeypatch):
    import lift._paths as paths

    monkeypatch.setattr(paths, "_MEMO_LIMIT", 1)
    trees = [
        [Named([f"n{i}"], [StateEntry(jnp.zeros(1))]) for i in range(3)],
        [Named(["a", "b"], [StateEntry(jnp.zeros(1)), StateEntry(jnp.ones(1))])],
    ]
    for tree in trees * 2:
        check_walks(tree)
    assert len(paths._NAMES) <= 1
