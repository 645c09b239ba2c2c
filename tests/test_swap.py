"""The walks that swap entries for keys and back: JAX's names, only what changes.

``export_state`` and ``import_state`` do not flatten the tree; they walk it in Python
and rebuild only the containers that hold an entry (or a key). These tests hold the
walks to JAX's own rules: the key of every entry is its ``keystr`` path, the rebuilt
tree has exactly the structure JAX's unflatten would give, and whatever holds no
entry comes back as the very same object.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import lift
from lift import StateEntry, StateKey, export_state, import_state
from tests.corpus import CORPUS, is_entry, is_key, keys_in
from tests.strategies import trees


def _entry_leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_entry)


def check_export(tree, prefix=""):
    """The exported tree is JAX's tree with each entry replaced by its path's key."""
    flat, treedef = _entry_leaves(tree)
    out, state = export_state(tree, prefix=prefix or None)
    out_leaves, out_def = jax.tree_util.tree_flatten(out, is_leaf=is_key)
    assert out_def == treedef  # a key where each entry was, nothing else moved
    first: dict[int, str] = {}
    for (path, leaf), got in zip(flat, out_leaves, strict=True):
        if is_entry(leaf):
            name = first.setdefault(id(leaf), prefix + jax.tree_util.keystr(path))
            assert type(got) is StateKey
            assert got == name
            assert state[got] is leaf.value
        elif not is_key(leaf):
            assert got is leaf
    assert len(state) == len(first)
    return out, state


def check_import(out, state):
    """Import gives back entries where the keys were, one entry per key."""
    back = import_state(out, state)
    keys = keys_in(out)
    entries = [x for x in jax.tree_util.tree_leaves(back, is_leaf=is_entry)]
    entries = [x for x in entries if is_entry(x)]
    assert len(entries) == len(keys)
    made: dict[StateKey, StateEntry] = {}
    for key, entry in zip(keys, entries, strict=True):
        assert made.setdefault(key, entry) is entry
        assert entry.value is state[key]
    return back


@pytest.mark.parametrize("case", [c for c in CORPUS if not c.has_keys], ids=str)
def test_walks_follow_jax_on_the_corpus(case):
    tree = case.build()
    check_import(*check_export(tree))
    check_import(*check_export(tree, prefix="p."))  # again, from the memos


@settings(max_examples=60, deadline=None)
@given(trees())
def test_property_walks_follow_jax(tree):
    check_import(*check_export(tree))


def test_long_sequences_are_named_past_the_remembered_positions():
    from lift import _swap

    n = _swap._INDEXED + 3
    tree = {"xs": [StateEntry(jnp.float32(i)) for i in range(n)], "t": (1.0, [2.0])}
    tree["t"][1].append(StateEntry(jnp.zeros(2)))
    out, state = check_export(tree)
    assert out["xs"][n - 1] == f"['xs'][{n - 1}]"
    assert out["xs"][_swap._INDEXED - 1] == f"['xs'][{_swap._INDEXED - 1}]"
    assert out["t"][1][1] == "['t'][1][1]"
    check_import(out, state)


def test_subtrees_without_entries_are_the_same_objects():
    params = {"w": jnp.ones(2), "deep": [{"b": jnp.zeros(1)}]}
    stats = [jnp.ones(1), (jnp.zeros(1),)]
    tree = {"params": params, "stats": stats, "bn": {"mean": StateEntry(jnp.zeros(2))}}
    out, state = export_state(tree)
    assert out["params"] is params
    assert out["stats"] is stats
    assert out["bn"] is not tree["bn"]
    assert type(tree["bn"]["mean"]) is StateEntry
    back = import_state(out, state)
    assert back["params"] is params
    assert back["stats"] is stats


def test_dicts_keep_their_order():
    tree = {"z": StateEntry(jnp.zeros(1)), "a": jnp.ones(1), "m": StateEntry(1)}
    out, state = export_state(tree)
    assert list(out) == ["z", "a", "m"]
    assert list(import_state(out, state)) == ["z", "a", "m"]
    assert sorted(state) == ["['m']", "['z']"]


def test_import_keeps_entries_already_in_the_tree():
    kept = StateEntry(jnp.ones(1))
    out, state = export_state({"a": StateEntry(jnp.zeros(1))})
    back = import_state({**out, "b": kept}, state)
    assert back["b"] is kept


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
    out, state = check_export([a, b])
    assert list(map(str, state)) == ["[0]['x']", "[0]['y']", "[1]['p']", "[1]['q']"]
    assert type(out[0]) is Named
    assert out[0].names == ("x", "y")
    check_import(out, state)


def test_custom_node_naming_two_entries_alike_is_a_collision():
    tree = Named(["x", "x"], [StateEntry(jnp.zeros(1)), StateEntry(jnp.ones(1))])
    with pytest.raises(ValueError, match=r"key \"\['x'\]\" twice") as info:
        export_state(tree)
    assert isinstance(info.value, lift.LiftError)
    assert "the key of another entry" in str(info.value)


def test_shared_entry_in_a_custom_node_takes_its_first_path_in_jax_order():
    e = StateEntry(jnp.zeros(1))
    # Insertion order names it ['z'] first; JAX's (sorted) flatten order ['a'].
    out, state = check_export({"z": Named(["k"], [e]), "a": [e]})
    assert list(state) == ["['a'][0]"]
    assert out["z"].values == ("['a'][0]",)


def test_equinox_modules_static_nested_and_rebuilt():
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
        return Outer(
            Inner(StateEntry(jnp.zeros(2))),
            jnp.ones(1),
            Inner(StateEntry(jnp.ones(2)), 3.0),
            tag,
        )

    tree = build("c")
    out, state = check_export(tree)
    assert list(map(str, state)) == [".first.mean", ".second.mean"]
    assert type(out) is Outer
    assert out.tag == "c"
    assert out.second.scale == 3.0
    assert out.skip is tree.skip
    assert type(tree.first.mean) is StateEntry  # the input is left alone
    assert vars(out) is not vars(tree)
    back = check_import(out, state)
    assert type(back.first) is Inner
    assert back.skip is tree.skip
    # What Equinox itself rebuilds from the exported tree's leaves.
    leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=is_key)
    assert (
        jax.tree_util.tree_structure(treedef.unflatten(leaves), is_leaf=is_key)
        == treedef
    )
    for tag in ("a", "b"):
        check_export([build(tag), build(tag)])


def test_registered_dataclass_is_rebuilt_by_its_own_unflatten():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Cell:
        h: object
        n: int = dataclasses.field(metadata={"static": True})

    cell = Cell(StateEntry(jnp.zeros(2)), 7)
    out, state = check_export(cell)
    assert type(out) is Cell
    assert out.n == 7
    assert out.h == ".h"
    assert check_import(out, state).h.value is state[StateKey(".h")]


def test_unregistered_objects_are_leaves():
    class Opaque:
        pass

    thing = Opaque()
    out, state = export_state({"o": thing, "e": StateEntry(1)})
    assert out["o"] is thing
    assert list(state) == ["['e']"]


def test_node_flattening_differently_with_keys_is_refused():
    class Odd:
        def __init__(self, a, b):
            self.a, self.b = a, b

    jax.tree_util.register_pytree_with_keys(
        Odd,
        # With keys, one child is missing: the children cannot all be named.
        lambda n: (((jax.tree_util.GetAttrKey("b"), n.b),), None),
        lambda _, c: Odd(*c),
        lambda n: ((n.a, n.b), None),
    )
    tree = Odd(StateEntry(jnp.zeros(1)), StateEntry(jnp.ones(1)))
    with pytest.raises(ValueError, match="flattens to 2 children, but to 1") as info:
        export_state(tree)
    assert isinstance(info.value, lift.LiftError)


def test_full_memos_are_emptied_and_the_keys_stay_right(monkeypatch):
    import lift._naming as naming

    monkeypatch.setattr(naming.NAMES, "limit", 1)
    monkeypatch.setattr(naming.FIELDS, "limit", 1)
    built = [
        [Named([f"n{i}"], [StateEntry(jnp.zeros(1))]) for i in range(3)],
        [Named(["a", "b"], [StateEntry(jnp.zeros(1)), StateEntry(jnp.ones(1))])],
    ]
    for tree in built * 2:
        check_export(tree)
    assert len(naming.NAMES) <= 1


# ----------------------------------------------- names of custom nodes' children


def _keystr_of_entry(tree):
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, lift.StateEntry)
    )[0]
    return [jax.tree_util.keystr(p) for p, _ in flat]


def test_child_names_do_not_depend_on_what_was_exported_before():
    # Equal node data that print differently (1 == True == 1.0 == np.int32(1), and
    # 0.0 == -0.0) name children differently: each export names them as JAX does.
    for key in [True, 1, 1.0, np.int32(1), np.float64(1.0), 0.0, -0.0]:
        tree = collections.OrderedDict({key: lift.StateEntry(jnp.zeros(()))})
        _, state = lift.export_state(tree)
        assert [str(k) for k in state] == _keystr_of_entry(tree), key


class _Bad:
    pass


def _bad_flatten(_):
    raise AttributeError("flatten failed")


jax.tree_util.register_pytree_node(_Bad, _bad_flatten, lambda _, c: _Bad())


class _Keyed:
    def __init__(self, x):
        self.x = x


def _keyed_with_keys(_):
    raise RuntimeError("keys broken")


jax.tree_util.register_pytree_with_keys(
    _Keyed, _keyed_with_keys, lambda _, c: _Keyed(*c), lambda k: ((k.x,), None)
)


def test_a_node_whose_flatten_fails_is_a_lift_error_naming_its_path():
    with pytest.raises(lift.LiftValueError, match=r"_Bad at \"\['a'\]\[0\]\"") as info:
        lift.export_state({"a": [_Bad()], "s": lift.StateEntry(jnp.zeros(1))})
    assert "AttributeError: flatten failed" in str(info.value)


def test_a_node_whose_flatten_with_keys_fails_is_a_lift_error_naming_its_path():
    assert jax.tree_util.tree_leaves(_Keyed(1.0)) == [1.0]  # JAX's flatten works
    with pytest.raises(lift.LiftValueError, match=r"_Keyed at \"\['b'\]\"") as info:
        lift.export_state({"a": lift.StateEntry(jnp.zeros(1)), "b": _Keyed(1.0)})
    assert "with keys" in str(info.value)


def test_a_dict_subclass_whose_key_comparison_raises_is_a_lift_error():
    class Odd:
        def __lt__(self, other):
            raise RuntimeError("no order")

        __gt__ = __lt__

    odd = collections.defaultdict(int, {Odd(): 1, "a": lift.StateEntry(jnp.zeros(1))})
    with pytest.raises(lift.LiftValueError, match="defaultdict at the root"):
        lift.export_state(odd)
