"""StateKey: str semantics, pickling, pytree behaviour, and the keys export gives."""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lift
from lift import StateEntry, StateKey, export_state, filter_state
from lift._keys import dotted, matches
from tests.corpus import (
    CORPUS,
    ROUND_TRIP,
    Case,
    entry_objects,
    entry_paths,
    is_entry_or_key,
    is_key,
    keys_in,
    sharing,
)
from tests.strategies import exported

REPO = Path(__file__).resolve().parents[1]


def new_keys(case: Case) -> list[str]:
    """The keys export gives the entries of ``case``, in flatten order."""
    tree = case.build()
    flat = jax.tree_util.tree_leaves(tree, is_leaf=is_entry_or_key)
    where = [i for i, x in enumerate(flat) if isinstance(x, StateEntry)]
    out, _ = export_state(tree)
    flat_out = jax.tree_util.tree_leaves(out, is_leaf=is_key)
    assert len(flat_out) == len(flat)
    return [str(flat_out[i]) for i in where]


# ------------------------------------------------------------------ the str contract


def test_key_is_a_str():
    key = StateKey("['bn']['mean']")
    assert isinstance(key, str)
    assert key == "['bn']['mean']"
    assert str(key) == "['bn']['mean']"
    assert type(str(key)) is str
    assert key.path == "['bn']['mean']"
    assert type(key.path) is str


@given(st.text(max_size=12))
def test_key_hash_and_equality_are_the_str_ones(text):
    key = StateKey(text)
    assert hash(key) == hash(text)
    assert key == text
    assert StateKey(text) == key
    assert {key: 1}[text] == 1
    assert {text: 1}[key] == 1


@given(st.text(max_size=6), st.text(max_size=6))
def test_key_ordering_is_the_str_ordering(a, b):
    ka, kb = StateKey(a), StateKey(b)
    assert (ka < kb) == (a < b)
    assert (ka <= kb) == (a <= b)
    assert (ka > kb) == (a > b)
    assert (ka == kb) == (a == b)
    # Total: exactly one of <, ==, > holds.
    assert [ka < kb, ka == kb, ka > kb].count(True) == 1


@given(st.lists(st.text(max_size=5), max_size=8))
def test_keys_sort_totally_like_their_strings(texts):
    keys = [StateKey(t) for t in texts]
    assert [str(k) for k in sorted(keys)] == sorted(texts)
    assert all(type(k) is StateKey for k in sorted(keys))


@given(st.text(max_size=12))
def test_key_pickles(text):
    key = StateKey(text)
    again = pickle.loads(pickle.dumps(key))
    assert type(again) is StateKey
    assert again == key


def test_state_dict_pickles_with_its_keys():
    _, state = export_state({"a": StateEntry(np.arange(3)), "b": [StateEntry(1.0)]})
    again = pickle.loads(pickle.dumps(state))
    assert sorted(again) == sorted(state)
    assert all(type(k) is StateKey for k in again)
    np.testing.assert_array_equal(again[StateKey("['a']")], np.arange(3))


@given(st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"])))
def test_key_repr_evaluates_back(text):
    key = StateKey(text)
    assert repr(key).startswith('StateKey("')
    assert eval(repr(key), {"StateKey": StateKey}) == key


@pytest.mark.parametrize("text", ["a\nb", "tab\there", "nul\x00", "['it\\'s']"])
def test_key_repr_escapes_control_characters(text):
    # A dict key may hold any character; the repr must still be one line of Python.
    key = StateKey(text)
    assert "\n" not in repr(key)
    assert eval(repr(key), {"StateKey": StateKey}) == key


# -------------------------------------------------------------- a childless pytree


def test_key_is_a_childless_pytree_node():
    key = StateKey("['a']")
    leaves, treedef = jax.tree_util.tree_flatten(key)
    assert leaves == []
    assert treedef.num_nodes == 1
    again = jax.tree_util.tree_unflatten(treedef, [])
    assert type(again) is StateKey
    assert again == key
    # The path is part of the structure: different keys, different structures.
    assert treedef != jax.tree_util.tree_structure(StateKey("['b']"))
    assert treedef == jax.tree_util.tree_structure(StateKey("['a']"))
    assert hash(treedef) == hash(jax.tree_util.tree_structure(StateKey("['a']")))
    assert "StateKey(\"['a']\")" in str(treedef)  # printed as the key


def test_key_flattens_through_a_bounded_memo(monkeypatch):
    import lift._keys as keys

    monkeypatch.setattr(keys._FLATTENED, "limit", 2)
    built = [StateKey(f"['k{i}']") for i in range(5)]
    defs = [jax.tree_util.tree_structure({"k": k}) for k in built]
    assert len(keys._FLATTENED) <= 2
    # Structures made before the memo was emptied still unflatten to their key.
    for key, treedef in zip(built, defs, strict=True):
        again = jax.tree_util.tree_unflatten(treedef, [])["k"]
        assert type(again) is StateKey
        assert again == key
        assert treedef == jax.tree_util.tree_structure({"k": StateKey(str(key))})


def _exported(case: Case):
    tree, _ = export_state(case.build())
    return tree


def _assert_same(out, tree):
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    assert [str(k) for k in keys_in(out)] == [str(k) for k in keys_in(tree)]
    assert all(type(k) is StateKey for k in keys_in(out))
    for a, b in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_exported_tree_passes_through_jit(case):
    tree = _exported(case)
    seen = []

    def f(t):
        seen.append(keys_in(t))
        return t

    out = jax.jit(f)(tree)
    _assert_same(out, tree)
    assert seen == [keys_in(tree)]


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_exported_tree_passes_through_vmap(case):
    tree = _exported(case)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), tree)
    seen = []

    def f(t):
        seen.append(keys_in(t))
        return t

    out = jax.vmap(f)(stacked) if jax.tree_util.tree_leaves(stacked) else stacked
    _assert_same(out, stacked)
    # Unbatched: the tree closed over, keys reach the body intact.
    ys = jax.vmap(lambda x: (f(tree), x)[1])(jnp.arange(2))
    np.testing.assert_array_equal(ys, jnp.arange(2))
    assert all(keys == keys_in(tree) for keys in seen)


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_exported_tree_passes_through_scan(case):
    tree = _exported(case)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x, x]), tree)

    def body(carry, x):
        assert keys_in(carry) == keys_in(tree)
        assert keys_in(x) == keys_in(tree)
        return carry, x

    carry, ys = jax.lax.scan(body, tree, stacked, length=3)
    _assert_same(carry, tree)
    _assert_same(ys, stacked)


# ----------------------------------------------------------------- the corpus keys


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_corpus_paths_are_jax_keystr(case):
    # The hand-written paths are what JAX itself names the entries.
    assert tuple(entry_paths(case.build())) == case.paths


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_export_keys_are_the_expected_ones(case):
    assert tuple(new_keys(case)) == case.expected_keys


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_keys_are_unique_per_entry(case):
    objs = entry_objects(case.build())
    keys = new_keys(case)
    # One key per distinct entry object, and distinct objects get distinct keys.
    assert sharing(keys, by=str) == sharing(objs)
    _, state = export_state(case.build())
    assert len(state) == len({id(o) for o in objs})


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_same_model_built_twice_gives_equal_keys(case):
    one, state_one = export_state(case.build())
    two, state_two = export_state(case.build())
    assert keys_in(one) == keys_in(two)
    assert list(state_one) == list(state_two)
    assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(two)


_PRINT_KEYS = """
import json
from lift import export_state
from tests.corpus import CORPUS
from tests.test_keys import new_keys
print(json.dumps({case.name: new_keys(case) for case in CORPUS}))
"""


def _keys_in_subprocess(seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _PRINT_KEYS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_keys_are_equal_across_processes_with_different_hash_seeds():
    one = _keys_in_subprocess("1")
    two = _keys_in_subprocess("4242")
    assert one == two
    assert one == {case.name: new_keys(case) for case in CORPUS}
    assert sum(len(v) for v in one.values()) > 50


# -------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(exported())
def test_property_keys_are_jax_keystr_of_the_first_path(drawn):
    tree, out, state = drawn
    paths = entry_paths(tree)
    first = sharing(entry_objects(tree))
    assert [str(k) for k in keys_in(out)] == [paths[i] for i in first]
    assert sorted(state) == sorted({paths[i] for i in first})


@settings(max_examples=40, deadline=None)
@given(exported())
def test_property_keys_are_unique(drawn):
    tree, out, state = drawn
    objs = entry_objects(tree)
    assert len(state) == len({id(o) for o in objs})
    assert sharing(keys_in(out), by=str) == sharing(objs)


@settings(max_examples=15, deadline=None)
@given(exported())
def test_property_exported_tree_passes_through_jit(drawn):
    _, out, _ = drawn
    _assert_same(jax.jit(lambda t: t)(out), out)


@pytest.mark.parametrize("case", ROUND_TRIP[:3], ids=str)
def test_key_survives_a_json_round_trip_of_its_path(case):
    # Keys are plain paths: saving them as strings and reading them back is lossless.
    _, state = export_state(case.build())
    names = json.loads(json.dumps(list(state)))
    assert [StateKey(n) for n in names] == list(state)


def test_import_lift_imports_neither_lift_testing_nor_hypothesis():
    code = (
        "import sys, lift\n"
        "assert 'lift.testing' not in sys.modules\n"
        "assert 'hypothesis' not in sys.modules\n"
        "import lift.testing\n"
        "assert 'hypothesis' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------ the pattern language

# Segments with every character the language gives a meaning to, or might be read as.
_TEXT = st.text(alphabet=st.sampled_from("ab.*?'\"[]\\ 0é\n"), max_size=4)
_SEGMENT = st.one_of(
    _TEXT.map(jax.tree_util.DictKey),
    st.integers(0, 12).map(jax.tree_util.SequenceKey),
    st.sampled_from(["a", "b", "ab", "step"]).map(jax.tree_util.GetAttrKey),
)
_PATH = st.lists(_SEGMENT, min_size=1, max_size=4).map(tuple)
_PATTERN = st.text(alphabet=st.sampled_from("ab.*?'\" 0é\n"), max_size=7)


def _segment_text(part: Any) -> str:
    for field in ("key", "idx", "name"):
        if hasattr(part, field):
            return str(getattr(part, field))
    raise AssertionError(part)


def _reference_dotted(path: tuple) -> str:
    return ".".join(_segment_text(p) for p in path)


def _glob(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters; everything else matches itself."""

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(text)
        if pattern[i] == "*":
            return match(i + 1, j) or (j < len(text) and match(i, j + 1))
        return j < len(text) and pattern[i] == text[j] and match(i + 1, j + 1)

    return match(0, 0)


def _reference(path: tuple, pattern: str) -> bool:
    """The documented language, written out: a leading dot is optional."""
    if not pattern.startswith((".", "*")):
        pattern = "." + pattern
    return _glob(pattern, "." + _reference_dotted(path))


def _state_of(paths: list[tuple]) -> dict:
    return {StateKey(jax.tree_util.keystr(p)): p for p in paths}


@settings(max_examples=200, deadline=None)
@given(st.lists(_PATH, min_size=1, max_size=6), _PATTERN)
def test_property_glob_selects_what_the_reference_matcher_selects(paths, pattern):
    state = _state_of(paths)
    expected = {k for k, path in state.items() if _reference(path, pattern)}
    assert set(filter_state(state, pattern)) == expected


@settings(max_examples=200, deadline=None)
@given(_PATH, _PATTERN)
def test_property_a_pattern_never_matches_outside_its_literal_prefix(path, pattern):
    key = StateKey(jax.tree_util.keystr(path))
    if matches(key, pattern):
        literal = pattern if pattern.startswith((".", "*")) else "." + pattern
        assert ("." + dotted(key)).startswith(literal.split("*")[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(_PATH, min_size=1, max_size=6))
def test_property_the_printed_form_of_a_key_selects_exactly_that_key(paths):
    state = _state_of(paths)
    for key in state:
        if "[" in key:  # a printed form with `[` is literal, whatever it holds
            assert list(filter_state(state, str(key))) == [key]
        assert list(filter_state(state, key)) == [key]  # a StateKey always is


@settings(max_examples=100, deadline=None)
@given(_PATH)
def test_property_dotted_form_is_the_segments_joined(path):
    assert dotted(jax.tree_util.keystr(path)) == _reference_dotted(path)


def _odd_state() -> dict:
    names = ["bn", "norm", "b", "c.d", "..", "", "*", "c"]
    tree = {name: {"mean": StateEntry(jnp.zeros(1))} for name in names}
    tree["c"]["d"] = StateEntry(jnp.zeros(1))
    tree["b"] = StateEntry(jnp.zeros(1))
    return export_state(tree)[1]


def test_printed_form_with_a_glob_is_refused_showing_the_dotted_pattern():
    # fnmatch read `['bn']` as a character class and selected `['norm']['mean']`
    # and `['b']`: now refused, with the pattern to write instead.
    state = _odd_state()
    with pytest.raises(lift.LiftValueError) as info:
        filter_state(state, "['bn']*")
    message = str(info.value)
    assert "\"['bn']*\"" in message
    # `*` right after a subscript means "below this key": `bn.*`, not `bn*`, which
    # would also select `['bn2']` and `['bnmean']`.
    assert "the keys below \"['bn']\", use the dotted pattern 'bn.*'" in message
    assert "'bn*'" not in message
    assert isinstance(info.value, ValueError)
    assert sorted(filter_state(state, "bn.*")) == ["['bn']['mean']"]


@pytest.mark.parametrize("op", ["filter", "partition", "load"])
def test_every_filter_user_refuses_a_bracket_glob(op, tmp_path):
    state = _odd_state()
    lift.save_state(tmp_path / "s", state)
    call = {
        "filter": lambda: filter_state(state, "['bn']*"),
        "partition": lambda: lift.partition_state(state, "['bn']*"),
        "load": lambda: lift.load_state(tmp_path / "s", filters="['bn']*"),
    }[op]
    with pytest.raises(lift.LiftValueError, match=r"'bn\.\*'"):
        call()


def test_printed_form_naming_no_key_of_the_state_is_refused():
    state = _odd_state()
    for call in (
        lambda: filter_state(state, "['bm']['mean']"),
        lambda: lift.partition_state(state, "['bm']['mean']"),
    ):
        with pytest.raises(lift.LiftValueError, match=r"'bm\.mean'"):
            call()


def test_refusal_of_a_key_name_holding_a_bracket_shows_its_printed_form():
    # `x[0]` once suggested 'x.0', which selects `['x'][0]`, not the key `['x[0]']`.
    _, state = export_state({"x[0]": StateEntry(jnp.zeros(1)), "x": StateEntry(1.0)})
    with pytest.raises(lift.LiftValueError) as info:
        filter_state(state, "x[0]")
    message = str(info.value)
    assert "A dict key named 'x[0]' prints as \"['x[0]']\"" in message
    assert "only that printed form or its StateKey selects it" in message
    assert "The dotted pattern 'x.0' selects the path ['x'][0], not that key" in message
    assert list(filter_state(state, "['x[0]']")) == ["['x[0]']"]


@pytest.mark.parametrize("pattern", ["['a*b']['q']", "['c.d']['q']", "['c.d']*"])
def test_refusal_without_an_exact_dotted_form_names_printed_form_and_key(pattern):
    # A segment holding `[`, `]`, `.` or `*` has no dotted pattern selecting only it.
    with pytest.raises(lift.LiftValueError) as info:
        filter_state(_odd_state(), pattern)
    message = str(info.value)
    assert repr(pattern) in message
    assert "selected only by its printed form (`str(key)`) or by its StateKey" in (
        message
    )
    assert "use the dotted" not in message


def test_refusal_of_a_bracket_wildcard_shows_the_dotted_glob():
    _, state = export_state({"layers": [StateEntry(jnp.zeros(1))] * 1})
    with pytest.raises(lift.LiftValueError, match=r"dotted form.*'layers\.\*'"):
        filter_state(state, "['layers'][*]")


def test_printed_form_matches_only_its_key():
    state = _odd_state()
    assert list(filter_state(state, "['c.d']['mean']")) == ["['c.d']['mean']"]
    assert list(filter_state(state, "['*']['mean']")) == ["['*']['mean']"]
    assert list(filter_state(state, "['']['mean']")) == ["['']['mean']"]
    assert list(filter_state(state, "['b']")) == ["['b']"]


def test_dotted_patterns_treat_every_other_character_literally():
    state = _odd_state()
    assert sorted(filter_state(state, "bn.*")) == ["['bn']['mean']"]
    assert sorted(filter_state(state, "b*")) == ["['b']", "['bn']['mean']"]
    # A dot inside a segment reads as a separator: both keys are `c.d.mean`-like.
    assert sorted(filter_state(state, "c.d*")) == ["['c']['d']", "['c.d']['mean']"]
    assert list(filter_state(state, "?")) == []  # not a wildcard
    assert len(filter_state(state, "*")) == len(state)


def test_glob_results_are_the_same_through_vmap_state_axes():
    # `state_axes` resolves filters with the same matcher: a bracket glob is refused.
    tree, state = export_state({"bn": StateEntry(jnp.zeros(3)), "n": StateEntry(0.0)})

    def body(t, x):
        lift.set(t["bn"], lift.get(t["bn"]) + x)

    f = lift.stateful(lambda t, xs: lift.vmap(body, state_axes={"['bn']*": 0})(t, xs))
    with pytest.raises(lift.LiftValueError, match=r"'bn\.\*'"):
        f(state, tree, jnp.ones((2, 3)))


def test_every_memo_is_bounded_by_one_rule():
    import lift._archive
    import lift._swap  # noqa: F401
    from lift import _memo

    assert set(_memo.MEMOS) >= {
        "key flattens",
        "dotted paths",
        "compiled patterns",
        "child key strings",
        "module fields",
        "list positions",
        "stored dtypes",
    }
    memo = _memo.Memo("test squares", lambda n: n * n, limit=3)
    try:
        assert [memo[i] for i in range(3)] == [0, 1, 4]
        assert len(memo) == 3
        assert memo[7] == 49
        assert len(memo) == 1  # full: emptied, then stored
        assert memo.put("k", "v") == "v"
        assert memo["k"] == "v"
        _memo.clear()
        assert all(len(m) == 0 for m in _memo.MEMOS.values())
        # Emptied memos are refilled: keys still flatten and paths still match.
        key = StateKey("['bn']['mean']")
        assert (
            jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(key), []) == key
        )
    finally:
        del _memo.MEMOS["test squares"]
