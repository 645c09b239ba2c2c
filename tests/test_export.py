"""export_state and import_state: exact inverses, prefixes, collisions, errors."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lift
from lift import (
    StateEntry,
    StateKey,
    export_state,
    import_state,
    merge_states,
)
from tests.corpus import (
    CASES,
    CORPUS,
    ROUND_TRIP,
    assert_identical,
    entry_objects,
    keys_in,
    sharing,
)
from tests.strategies import Pair, exported, trees

# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("case", ROUND_TRIP, ids=str)
def test_round_trip_is_exact(case):
    tree = case.build()
    back = import_state(*export_state(tree))
    assert_identical(back, tree)


@pytest.mark.parametrize("case", ROUND_TRIP, ids=str)
def test_export_leaves_the_input_alone(case):
    tree = case.build()
    before = entry_objects(tree)
    values = [e.value for e in before]
    export_state(tree)
    after = entry_objects(tree)
    assert all(a is b for a, b in zip(before, after, strict=True))
    assert all(e.value is v for e, v in zip(after, values, strict=True))


@pytest.mark.parametrize("case", ROUND_TRIP, ids=str)
def test_state_holds_the_entry_values_themselves(case):
    tree = case.build()
    out, state = export_state(tree)
    for entry, key in zip(entry_objects(tree), keys_in(out), strict=True):
        assert state[key] is entry.value


def test_two_equal_entries_are_two_keys():
    # Sharing is object identity: entries must not compare (or hash) by value.
    a, b = StateEntry(1), StateEntry(1)
    assert StateEntry.__hash__ is object.__hash__
    assert a != b
    _, state = export_state([a, b])
    assert list(map(str, state)) == ["[0]", "[1]"]


def test_shared_entry_is_shared_again_after_import():
    entry = StateEntry(jnp.zeros(2))
    tree = {"a": entry, "b": [entry], "c": StateEntry(jnp.ones(2))}
    out, state = export_state(tree)
    assert out["a"] == out["b"][0] == "['a']"
    assert len(state) == 2
    back = import_state(out, state)
    assert back["a"] is back["b"][0]
    assert back["a"] is not back["c"]
    assert back["a"].value is entry.value


def test_import_then_export_is_the_identity_on_exported_trees():
    tree, state = export_state(CASES["dict_nested"].build())
    again, state_again = export_state(import_state(tree, state))
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(tree)
    assert state_again.keys() == state.keys()
    assert all(state_again[k] is state[k] for k in state)


def test_export_without_entries_returns_the_tree_itself():
    tree = {"w": jnp.ones(2)}
    out, state = export_state(tree)
    assert out is tree
    assert state == {}


def test_existing_keys_are_kept_and_import_with_their_state():
    case = CASES["existing_key_elsewhere"]
    tree = case.build()
    out, state = export_state(tree)
    assert list(state) == ["[1]['x']"]
    assert out[0] == out[2] == "encoder['w']"
    old = {StateKey("encoder['w']"): jnp.full(2, 7.0)}
    back = import_state(out, merge_states(state, old))
    assert back[0] is back[2]
    assert back[0].value is old[StateKey("encoder['w']")]
    assert back[1]["x"].value is state[StateKey("[1]['x']")]


def test_same_structure_different_sharing_gives_different_keys():
    # Keys may be cached per structure; the sharing pattern must be part of it.
    e = StateEntry(jnp.zeros(2))
    distinct, _ = export_state([StateEntry(jnp.zeros(2)), StateEntry(jnp.zeros(2))])
    shared, state = export_state([e, e])
    distinct_again, _ = export_state(
        [StateEntry(jnp.zeros(2)), StateEntry(jnp.zeros(2))]
    )
    assert distinct == ["[0]", "[1]"]
    assert shared == ["[0]", "[0]"]
    assert list(state) == ["[0]"]
    assert distinct_again == ["[0]", "[1]"]


def test_is_leaf_hides_entries_below_it():
    hidden = {"inner": StateEntry(jnp.zeros(1))}
    tree = {"a": hidden, "b": StateEntry(jnp.ones(1))}
    out, state = export_state(tree, is_leaf=lambda x: x is hidden)
    assert list(state) == ["['b']"]
    assert out["a"] is hidden


# -------------------------------------------------------------------------- prefix


@pytest.mark.parametrize("case", ROUND_TRIP, ids=str)
def test_prefix_roots_every_key(case):
    tree = case.build()
    out, state = export_state(tree, prefix="encoder")
    expected = ["encoder" + k for k in case.expected_keys]
    assert [str(k) for k in keys_in(out)] == expected
    assert all(k.startswith("encoder") for k in state)
    assert_identical(import_state(out, state), tree)


def test_prefixes_make_two_exports_merge_without_collision():
    enc, enc_state = export_state(CASES["dict_nested"].build(), prefix="enc")
    dec, dec_state = export_state(CASES["dict_nested"].build(), prefix="dec")
    state = merge_states(enc_state, dec_state)
    assert sorted(state) == [
        "dec['bn']['mean']",
        "dec['bn']['var']",
        "enc['bn']['mean']",
        "enc['bn']['var']",
    ]
    both = import_state({"enc": enc, "dec": dec}, state)
    assert both["enc"]["bn"]["mean"].value is enc_state[StateKey("enc['bn']['mean']")]
    assert both["dec"]["bn"]["var"].value is dec_state[StateKey("dec['bn']['var']")]


def test_without_prefix_two_exports_collide_on_merge():
    _, one = export_state(CASES["dict_nested"].build())
    _, two = export_state(CASES["dict_nested"].build())
    with pytest.raises(ValueError, match=r"\['bn'\]\['mean'\]"):
        merge_states(one, two)


def test_prefix_must_be_a_string():
    with pytest.raises(TypeError, match="prefix") as info:
        export_state({"a": StateEntry(1)}, prefix=3)  # type: ignore[arg-type]
    assert isinstance(info.value, lift.LiftError)


# ---------------------------------------------------------------------- collisions


def test_new_key_equal_to_an_existing_key_raises_with_both_paths():
    tree = {"a": StateEntry(jnp.zeros(1)), "b": StateKey("['a']")}
    with pytest.raises(ValueError, match=r"\['a'\]") as info:
        export_state(tree)
    assert isinstance(info.value, lift.LiftError)
    message = str(info.value)
    assert "['b']" in message  # where the existing key sits
    assert "prefix=" in message  # how to fix


def test_collision_is_caught_after_a_similar_tree_was_exported():
    # A tree of the same structure whose existing key does not collide is exported
    # first; the colliding one must still raise, not reuse the first tree's keys.
    export_state({"a": StateEntry(jnp.zeros(1)), "b": StateKey("['c']")})
    with pytest.raises(ValueError, match=r"\['a'\]"):
        export_state({"a": StateEntry(jnp.zeros(1)), "b": StateKey("['a']")})


def test_collision_with_prefix_is_caught():
    tree = [StateKey("m[1]"), StateEntry(jnp.zeros(1))]
    with pytest.raises(lift.LiftError, match=r"m\[1\]"):
        export_state(tree, prefix="m")
    out, state = export_state(tree, prefix="n")
    assert list(state) == ["n[1]"]
    assert out[0] == "m[1]"


# -------------------------------------------------------------------- import errors


def test_import_missing_keys_lists_every_missing_path():
    out, state = export_state(CASES["many_layers"].build())
    kept = {k: v for k, v in state.items() if "['var']" not in k}
    with pytest.raises(KeyError) as info:
        import_state(out, kept)
    assert isinstance(info.value, lift.LiftError)
    message = str(info.value)
    for i in range(3):
        assert f"['layers'][{i}]['bn']['var']" in message
    assert "['layers'][0]['bn']['mean']" in message.split("closest")[-1]
    assert "export_state" in message  # how to fix


def test_import_from_an_empty_state_says_it_is_empty():
    out, _ = export_state({"a": StateEntry(1)})
    with pytest.raises(KeyError, match="empty"):
        import_state(out, {})


def test_strict_import_refuses_unused_keys():
    out, state = export_state({"a": StateEntry(1)})
    extra = {**state, StateKey("['zzz']"): 2, StateKey("['yyy']"): 3}
    with pytest.raises(KeyError) as info:
        import_state(out, extra)
    assert isinstance(info.value, lift.LiftError)
    message = str(info.value)
    assert "['zzz']" in message
    assert "['yyy']" in message
    assert "strict=False" in message


def test_non_strict_import_allows_unused_keys():
    out, state = export_state({"a": StateEntry(1)})
    extra = {**state, StateKey("['zzz']"): 2}
    back = import_state(out, extra, strict=False)
    assert back["a"].value == 1
    # A missing key is an error even when not strict.
    with pytest.raises(KeyError, match=r"\['a'\]"):
        import_state(out, {StateKey("['zzz']"): 2}, strict=False)


def test_entries_do_not_nest():
    with pytest.raises(TypeError, match="nest") as info:
        StateEntry(StateEntry(1))
    assert isinstance(info.value, lift.LiftError)
    with pytest.raises(TypeError, match="nest"):
        StateEntry(StateKey("['a']"))


@pytest.mark.parametrize("bad", [StateEntry(1), StateKey("['b']")], ids=type)
def test_import_refuses_a_state_value_that_would_nest(bad):
    out, state = export_state({"a": StateEntry(1), "c": StateEntry(2)})
    state = {**state, StateKey("['a']"): bad}
    with pytest.raises(TypeError, match=r"\['a'\].*do not nest") as info:
        import_state(out, state)
    assert isinstance(info.value, lift.LiftError)


# ---------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(trees())
def test_property_round_trip_is_exact(tree):
    assert_identical(import_state(*export_state(tree)), tree)


@settings(max_examples=40, deadline=None)
@given(exported(), st.sampled_from(["a", "enc.", "m['x']"]))
def test_property_prefix_round_trip_and_disjoint_merge(drawn, prefix):
    tree, out, state = drawn
    p_out, p_state = export_state(tree, prefix=prefix)
    assert [str(k) for k in keys_in(p_out)] == [prefix + k for k in keys_in(out)]
    assert_identical(import_state(p_out, p_state), tree)
    merged = merge_states(p_state, export_state(tree, prefix="zz")[1])
    assert len(merged) == 2 * len(state)


@settings(max_examples=40, deadline=None)
@given(exported())
def test_property_import_shares_what_export_shared(drawn):
    tree, out, state = drawn
    back = import_state(out, state)
    assert sharing(entry_objects(back)) == sharing(entry_objects(tree))
    assert len({id(e) for e in entry_objects(back)}) == len(state)


def test_pair_from_testing_is_a_namedtuple_node():
    leaves = jax.tree_util.tree_leaves_with_path(Pair(1, 2))
    assert [jax.tree_util.keystr(p) for p, _ in leaves] == [".first", ".second"]


def test_corpus_covers_every_node_kind():
    names = {case.name for case in CORPUS}
    for needed in (
        "root_entry",
        "dict_int_keys",
        "namedtuple",
        "dataclass",
        "custom_keyless",
        "custom_with_keys",
        "shared_two_places",
        "existing_key",
        "empty_containers",
        "entry_value_dict",
    ):
        assert needed in names
    assert len(CORPUS) >= 40


# ------------------------------------------------- what export refuses up front


@pytest.mark.parametrize(
    ("tree", "outer", "inner"),
    [
        (
            {"o": StateEntry({"inner": StateEntry(jnp.zeros(1))})},
            "['o']",
            "['o']['inner']",
        ),
        (
            [StateEntry(Pair(jnp.zeros(1), StateEntry(jnp.ones(1))))],
            "[0]",
            "[0].second",
        ),
        ({"o": StateEntry([StateKey("['x']")])}, "['o']", "['o'][0]"),
    ],
    ids=["dict", "namedtuple", "key"],
)
def test_nested_entries_are_refused_naming_the_path(tree, outer, inner):
    with pytest.raises(lift.LiftTypeError) as info:
        export_state(tree)
    message = str(info.value)
    assert repr(outer) in message
    assert repr(inner) in message
    assert "do not nest" in message


def test_entries_holding_pytrees_of_arrays_still_export():
    tree, state = export_state({"ema": StateEntry(Pair(jnp.zeros(1), jnp.ones(1)))})
    assert isinstance(state[tree["ema"]], Pair)


@pytest.mark.parametrize(
    "tree",
    [
        {1: StateEntry(jnp.zeros(1)), "a": 2.0},
        {"m": {None: {"x": StateEntry(jnp.zeros(1))}, "b": StateEntry(jnp.ones(1))}},
        {(1, 2): StateEntry(jnp.zeros(1)), 3: StateEntry(jnp.zeros(1))},
        {"a": StateEntry(jnp.zeros(1)), 1: 2.0},
        {"m": {"x": StateEntry(jnp.zeros(1)), None: jnp.ones(1)}},
    ],
    ids=[
        "int-and-str",
        "none-and-str-nested",
        "tuple-and-int",
        "state-under-str-only",
        "array-under-none",
    ],
)
def test_dicts_holding_state_with_keys_jax_cannot_sort_are_refused(tree):
    # JAX sorts a dict's keys when it flattens it: such a tree fails in `lift.jit`.
    with pytest.raises(ValueError, match="Comparator"):
        jax.tree_util.tree_structure(tree)
    with pytest.raises(lift.LiftValueError, match="cannot be ordered") as info:
        export_state(tree)
    assert "one type" in str(info.value)


def test_dicts_with_int_keys_only_still_export():
    tree, state = export_state(
        {0: StateEntry(jnp.zeros(1)), 1: StateEntry(jnp.ones(1))}
    )
    assert list(state) == ["[0]", "[1]"]
    assert import_state(tree, state)[1].value.tolist() == [1.0]


def test_a_70000_character_key_works_end_to_end(tmp_path):
    # No limit on a key's length: export, a lifted jit step and a state file.
    name = "k" * 70_000
    tree, state = export_state({name: StateEntry(jnp.zeros(3))})
    (key,) = state
    assert len(key) == 70_004

    @lift.jit
    @lift.stateful
    def step(t):
        lift.set(t[name], lift.get(t[name]) + 1)

    _, new = step(state, tree)
    lift.save_state(tmp_path / "s", new)
    loaded = lift.load_state(tmp_path / "s", like=state)
    assert loaded[key].tolist() == [1.0, 1.0, 1.0]


def test_export_and_import_leave_the_collector_as_they_found_it():
    import gc

    tree = {"a": [StateEntry(jnp.zeros(1)) for _ in range(3)]}
    assert gc.isenabled()
    out, state = export_state(tree)
    import_state(out, state)
    assert gc.isenabled()
    gc.disable()
    try:
        export_state(tree)
        import_state(out, state)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_exports_in_threads_restore_the_collector():
    import gc
    import threading

    tree = {f"l{i}": {"bn": StateEntry(jnp.zeros(1))} for i in range(2000)}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                import_state(*export_state(tree))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert gc.isenabled()


def test_a_dict_without_state_that_jax_cannot_sort_is_refused_too():
    # JAX would refuse the exported tree in every transform, state or not.
    with pytest.raises(lift.LiftValueError, match=r"dict at \"\['b'\]\" has keys"):
        export_state({"a": StateEntry(jnp.zeros(1)), "b": {1: 2.0, "c": 3.0}})


def test_the_keys_of_a_dict_are_compared_once(monkeypatch):
    from lift import _swap

    calls = []
    check = _swap._check_keys
    monkeypatch.setattr(
        _swap, "_check_keys", lambda node, path: calls.append(path) or check(node, path)
    )
    tree = {"layers": {i: StateEntry(jnp.zeros(1)) for i in range(50)}, "w": 1.0}
    _, state = export_state(tree)
    assert len(state) == 50
    assert calls == ["['layers']"]  # all-str dicts need no comparison


def test_a_dict_subclass_jax_cannot_sort_is_a_lift_error_naming_its_path():
    odd = collections.defaultdict(int, {"a": StateEntry(jnp.zeros(1)), 1: 2})
    with pytest.raises(lift.LiftValueError, match=r"defaultdict at \"\['m'\]\""):
        export_state({"m": odd})


@pytest.mark.parametrize("at_root", [False, True])
def test_a_state_value_jax_cannot_flatten_is_refused_naming_its_key(at_root):
    x = jnp.ones(2)
    entry = StateEntry({1: x, "a": x})
    with pytest.raises(lift.LiftValueError, match="cannot be flattened") as info:
        export_state(entry if at_root else {"w": entry})
    assert ("''" if at_root else "\"['w']\"") in str(info.value)


def test_update_state_and_set_refuse_a_value_jax_cannot_flatten():
    x = jnp.ones(2)
    tree, state = export_state({"w": StateEntry({"a": x, "b": x})})
    bad = {1: x, "a": x}
    with pytest.raises(lift.LiftValueError, match=r"update_state.*\['w'\]"):
        lift.update_state(state, {tree["w"]: bad})
    step = lift.stateful(lambda: lift.set(tree["w"], bad))
    for f in (step, lift.jit(step)):
        with pytest.raises(lift.LiftValueError, match=r"lift.set.*cannot be flattened"):
            f(state)
