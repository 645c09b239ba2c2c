"""State files as an attacker writes them: lying manifests, crafted sizes, odd names.

Every file is either loaded exactly as `save_state` wrote it or refused with a
`StateFileError` naming the key; loading never allocates more than the file holds;
equal states give identical bytes; saving checks every leaf before writing anything.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import struct
import tempfile
import tracemalloc
import warnings
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lift
import lift._archive
from lift import StateEntry, StateKey, export_state
from lift._errors import LiftTypeError, LiftValueError
from lift._format import member_names
from lift.io import (
    MANIFEST,
    StateFileError,
    StateMismatchError,
    load_state,
    save_state,
    summary,
)

K = StateKey
LIB = Path(lift.__file__).parent


def bits(x: Any) -> tuple[str, tuple[int, ...], bytes]:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return (str(x.dtype), x.shape, np.asarray(jax.random.key_data(x)).tobytes())
    host = np.asarray(x)
    return (str(host.dtype), host.shape, host.tobytes())


def same(got: Any, want: Any) -> bool:
    g, g_def = jax.tree_util.tree_flatten(got)
    w, w_def = jax.tree_util.tree_flatten(want)
    return g_def == w_def and [bits(a) for a in g] == [bits(b) for b in w]


def base_state() -> dict[StateKey, Any]:
    return {
        K("['a']"): jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
        K("['b']"): {"k": jax.random.key(1), "x": jnp.ones(2, jnp.bfloat16)},
        K("['c']"): jnp.arange(8, dtype=jnp.uint8),
        K("['d']"): jnp.full((7, 7), 0.5, jnp.float32),
    }


def unpack(path: Path) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    with zipfile.ZipFile(path) as archive:
        members = [(i.filename, archive.read(i)) for i in archive.infolist()]
    manifest = json.loads(dict(members)[MANIFEST])
    return manifest, [(n, b) for n, b in members if n != MANIFEST]


def pack(path: Path, manifest: Any, members: list[tuple[str, bytes]]) -> None:
    with warnings.catch_warnings():  # zipfile warns about duplicate names
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members:
                archive.writestr(name, data)
            archive.writestr(MANIFEST, json.dumps(manifest))


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=False)
    return out.getvalue()


def leaf_of(manifest: dict, key: str, index: int = 0) -> dict:
    entry = next(e for e in manifest["entries"] if e["key"] == key)
    return entry["leaves"][index]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_state(tmp_path / "s", base_state())
    return tmp_path / "s"


def refused(path: Path, naming: str, like: Any = None) -> StateFileError:
    with pytest.raises(StateFileError) as info:
        load_state(path, like=like)
    assert naming in str(info.value), str(info.value)
    return info.value


# ------------------------------------------------- the manifest is never trusted


def test_a_manifest_shape_that_disagrees_with_the_member_is_refused(saved, tmp_path):
    """`uint8[2]` must not come back as `uint8[8]`, nor `float32[7,7]` as `[2]`."""
    state = base_state()
    manifest, members = unpack(saved)
    leaf_of(manifest, "['c']")["shape"] = [2]
    pack(tmp_path / "c", manifest, members)
    for like in (None, state, {**state, K("['c']"): jnp.zeros(2, jnp.uint8)}):
        refused(tmp_path / "c", "['c']", like)

    manifest, members = unpack(saved)
    leaf = leaf_of(manifest, "['d']")
    leaf["shape"] = leaf["stored_shape"] = [2]  # consistent, but not the member
    pack(tmp_path / "d", manifest, members)
    for like in (None, state, {**state, K("['d']"): jnp.zeros(2)}):
        err = refused(tmp_path / "d", "['d']", like)
        assert "header" in str(err)

    # A member replaced by another valid array, its checksum updated: the header
    # still disagrees with the manifest.
    manifest, members = unpack(saved)
    leaf = leaf_of(manifest, "['c']")
    data = npy_bytes(np.arange(2, dtype=np.uint8))
    members = [(n, data if n == leaf["member"] else b) for n, b in members]
    leaf["sha256"] = __import__("hashlib").sha256(data).hexdigest()
    pack(tmp_path / "e", manifest, members)
    refused(tmp_path / "e", "['c']")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("dtype", "object", "unknown dtype"),
        ("dtype", "float128", "unknown dtype"),
        ("dtype", "int8", "stored as"),  # a real dtype, not the stored one
        ("stored_dtype", "|O", "stored as"),
        ("stored_dtype", ">i4", "stored as"),
        ("shape", [2, -3], "not a shape"),
        ("shape", [True], "not a shape"),
        ("shape", [1] * 65, "not a shape"),
        ("sha256", "abc", "not a SHA-256"),
        ("member", 3, "not str"),
        ("key_impl", "threefry2x32", "stored as"),  # an int array claiming keys
    ],
)
def test_every_field_of_a_leaf_is_checked(saved, tmp_path, field, value, says):
    manifest, members = unpack(saved)
    leaf_of(manifest, "['a']")[field] = value
    pack(tmp_path / "f", manifest, members)
    for like in (None, base_state()):
        refused(tmp_path / "f", says, like)
        refused(tmp_path / "f", "['a']", like)


def test_unknown_key_implementations_are_refused(saved, tmp_path):
    manifest, members = unpack(saved)
    leaf_of(manifest, "['b']")["key_impl"] = "no_such_prng"
    pack(tmp_path / "k", manifest, members)
    err = refused(tmp_path / "k", "['b']['k']")
    assert "unknown PRNG key implementation 'no_such_prng'" in str(err)
    manifest, members = unpack(saved)
    leaf_of(manifest, "['b']")["key_impl"] = "rbg"  # real, but not the stored layout
    pack(tmp_path / "r", manifest, members)
    refused(tmp_path / "r", "['b']['k']", base_state())


def test_duplicate_keys_and_members_are_refused(saved, tmp_path):
    manifest, members = unpack(saved)
    manifest["entries"].append(dict(manifest["entries"][0]))
    pack(tmp_path / "k", manifest, members)
    assert "lists this key twice" in str(refused(tmp_path / "k", "['a']"))

    manifest, members = unpack(saved)
    twin = dict(manifest["entries"][0], key="['z']")
    manifest["entries"].append(twin)  # another key reading the same member
    pack(tmp_path / "m", manifest, members)
    assert "used twice" in str(refused(tmp_path / "m", "['z']"))

    manifest, members = unpack(saved)
    name, data = members[0]
    pack(tmp_path / "z", manifest, [*members, (name, data[::-1])])
    assert "same name" in str(refused(tmp_path / "z", "s"))


def test_a_field_named_twice_in_the_manifest_is_refused(saved, tmp_path):
    # JSON keeps the last of two equal names: an empty "entries" hidden before the
    # real one (or the reverse) must not decide what loads.
    manifest, members = unpack(saved)
    raw = json.dumps(manifest).replace(
        '"format": "lift.state"', '"format": "lift.state", "entries": []', 1
    )
    with zipfile.ZipFile(tmp_path / "j", "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
        archive.writestr(MANIFEST, raw)
    message = str(refused(tmp_path / "j", "names the field 'entries' twice"))
    assert "not a readable lift state file" in message
    assert "load an intact copy" in message

    raw = json.dumps(manifest).replace('"dtype": ', '"dtype": "int8", "dtype": ', 1)
    with zipfile.ZipFile(tmp_path / "d", "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
        archive.writestr(MANIFEST, raw)
    refused(tmp_path / "d", "names the field 'dtype' twice")


def test_keys_export_state_makes_that_are_not_subscript_paths_load(tmp_path):
    # `StateKey` takes any string, and `export_state` makes keys such as these (a
    # prefix alone, a custom node without key names): a file holding one is intact.
    class Node:
        def __init__(self, value: Any) -> None:
            self.value = value

    jax.tree_util.register_pytree_node(
        Node, lambda n: ((n.value,), None), lambda _, c: Node(*c)
    )
    state = {
        **export_state(StateEntry(jnp.ones(2)), prefix="not a key")[1],
        **export_state(Node(StateEntry(jnp.zeros(1))))[1],
    }
    assert sorted(state) == ["[<flat index 0>]", "not a key"]
    save_state(tmp_path / "s", state)
    assert same(load_state(tmp_path / "s"), state)
    assert same(load_state(tmp_path / "s", like=state), state)


def test_consumed_state_is_refused_naming_its_keys_before_writing(tmp_path):
    model, state = export_state(
        {"a": StateEntry(jnp.zeros(3)), "b": {"c": StateEntry(jnp.ones(2))}}
    )

    def f(x: Any) -> Any:
        lift.set(model["a"], lift.get(model["a"]) + x)
        return x

    path = tmp_path / "s"
    save_state(path, state)
    before = path.read_bytes()
    _, new = lift.jit(lift.stateful(f), donate_state=True)(state, 1.0)
    with pytest.raises(LiftValueError) as info:
        save_state(path, state)
    message = str(info.value)
    assert "\"['a']\" was consumed (deleted) by a donating lifted `jit`" in message
    assert "Save the state that donating step returned" in message
    assert os.listdir(tmp_path) == ["s"]
    assert path.read_bytes() == before
    save_state(path, new)
    assert same(load_state(path, like=new), new)


def test_a_structure_that_disagrees_with_the_leaves_is_refused(saved, tmp_path):
    for tree in (
        {"dict": [["x", "*"], ["x", "*"]]},  # a repeated dict key
        {"dict": [["k", "*"]]},  # too few leaves
        {"dict": [["y", "*"], ["z", "*"]]},  # other paths
        {"set": []},
        {"dict": [[1.5, "*"]]},
        [[[[[]]]]],
    ):
        manifest, members = unpack(saved)
        next(e for e in manifest["entries"] if e["key"] == "['b']")["tree"] = tree
        pack(tmp_path / "t", manifest, members)
        refused(tmp_path / "t", "['b']")


def test_deeply_nested_manifests_are_state_file_errors(saved, tmp_path):
    manifest, members = unpack(saved)
    manifest["entries"][0]["tree"] = "DEEP"
    text = json.dumps(manifest)
    for deep, says in [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # beyond json's recursion
        ('{"list": [' * 300 + '"*"' + "]}" * 300, "nested over 256 levels"),
    ]:
        with zipfile.ZipFile(tmp_path / "n", "w") as archive:
            for name, data in members:
                archive.writestr(name, data)
            archive.writestr(MANIFEST, text.replace('"DEEP"', deep))
        refused(tmp_path / "n", says)


# ------------------------------------------------------------ bounded allocation


def peak_while(fn: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        try:
            result: Any = fn()
        except Exception as err:  # returned for the caller to check
            result = err
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


GIB = 1 << 30


def test_a_small_file_declaring_4_gib_is_refused_without_allocating_it(tmp_path):
    save_state(tmp_path / "s", {K("w"): jnp.zeros(4, jnp.float32)})
    manifest, members = unpack(tmp_path / "s")
    leaf = leaf_of(manifest, "w")
    leaf["shape"] = leaf["stored_shape"] = [GIB]
    header = npy_bytes(np.zeros(0, np.float32)).replace(b"(0,)", b"(%d,)" % GIB)
    members = [(leaf["member"], header + bytes(16))]
    pack(tmp_path / "big", manifest, members)
    assert (tmp_path / "big").stat().st_size < 2048
    err, peak = peak_while(lambda: load_state(tmp_path / "big"))
    assert isinstance(err, StateFileError), err
    assert "'w'" in str(err)
    assert "shorter than its array" in str(err)
    assert peak < 32 << 20

    # The zip's central directory lies too: it says the member is 4 GiB long.
    data = bytearray((tmp_path / "big").read_bytes())
    central = data.index(b"PK\x01\x02")  # the directory record of the member
    struct.pack_into("<II", data, central + 20, 0xF0000000, 0xF0000000)
    (tmp_path / "liar").write_bytes(bytes(data))
    err, peak = peak_while(lambda: load_state(tmp_path / "liar"))
    assert isinstance(err, StateFileError), err
    assert "more than the file holds" in str(err)
    assert peak < 32 << 20
    err, peak = peak_while(lambda: summary(tmp_path / "liar"))
    assert isinstance(err, StateFileError), err


def test_compressed_members_are_refused(saved, tmp_path):
    """A deflated member could expand far beyond the file: lift stores only."""
    manifest, members = unpack(saved)
    with zipfile.ZipFile(tmp_path / "z", "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
        archive.writestr(MANIFEST, json.dumps(manifest))
    refused(tmp_path / "z", "compressed")


# -------------------------------------------------------- identical bytes (14.8)


def test_equal_states_in_any_order_give_identical_bytes(tmp_path):
    state = base_state()
    save_state(tmp_path / "a", state)
    save_state(tmp_path / "b", dict(reversed(list(state.items()))))
    mixed = {str(k): v for k, v in sorted(state.items(), key=lambda kv: kv[0][::-1])}
    save_state(tmp_path / "c", mixed)  # plain string keys, another order
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert (tmp_path / "a").read_bytes() == (tmp_path / "c").read_bytes()


def test_a_no_op_lifted_jit_step_does_not_change_the_file(tmp_path):
    tree, state = lift.export_state(
        {
            "z": lift.StateEntry(jnp.arange(3.0)),
            "a": {"n": lift.StateEntry(jnp.int32(2))},
            "k": lift.StateEntry(jax.random.key(0)),
        }
    )
    step = lift.jit(lift.stateful(lambda x: x + lift.get(tree["z"])))
    _, after = step(dict(reversed(list(state.items()))), jnp.ones(3))
    save_state(tmp_path / "before", state)
    save_state(tmp_path / "after", after)
    assert (tmp_path / "before").read_bytes() == (tmp_path / "after").read_bytes()


# ------------------------------------------------------------- names (14.11)


def test_keys_named_like_fallback_members_save_and_load(tmp_path):
    state = {
        K("leaf2"): jnp.ones(1),
        K("leaf2_3"): jnp.ones(2),
        K("leaf0"): jnp.ones(3),
        K("a/b"): jnp.ones(4),
        K("c/d"): (jnp.ones(5), jnp.ones(6)),
        K("x"): (jnp.ones(7),),
        K("x[0]"): jnp.ones(8),
    }
    save_state(tmp_path / "s", state)  # used to loop forever here
    assert os.listdir(tmp_path) == ["s"]
    got = load_state(tmp_path / "s")
    assert all(same(got[k], v) for k, v in state.items())
    with zipfile.ZipFile(tmp_path / "s") as archive:
        names = archive.namelist()
    assert len(set(names)) == len(names) == 9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text("leaf0123_./\\[]'x.npy", max_size=12), max_size=12))
def test_member_names_are_distinct_safe_and_keep_safe_paths(names):
    members = member_names(names)
    assert len(set(members)) == len(members) == len(names)
    for name, member in zip(names, members, strict=True):
        assert member.endswith(".npy")
        assert not set(member) & set("/\\\x00")
        assert member != MANIFEST
        plain = not set(name) & set("/\\") and not re.fullmatch(r"leaf[0-9]+", name)
        if plain and names.count(name) == 1:
            assert member == name + ".npy"  # numpy.load lists it by its path


def test_very_long_and_unencodable_keys_get_numbered_members(tmp_path):
    state = {K("k" * 70_000): jnp.ones(1), K("\udcff"): jnp.ones(2)}
    save_state(tmp_path / "s", state)
    got = load_state(tmp_path / "s")
    assert all(same(got[k], v) for k, v in state.items())


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        (np.array([object()], dtype=object), LiftTypeError, "not a JAX dtype"),
        (np.array(["a", "b"]), LiftTypeError, "not a JAX dtype"),
        ("text", LiftTypeError, "not an array"),
        (b"bytes", LiftTypeError, "not an array"),
        (np.datetime64("2026-01-01"), LiftTypeError, "not a JAX dtype"),
        (2**70, LiftValueError, "does not fit"),
    ],
)
def test_bad_leaves_are_refused_before_anything_is_written(
    tmp_path, monkeypatch, value, error, says
):
    path = tmp_path / "s"
    save_state(path, base_state())
    before = path.read_bytes()
    # The bad leaf comes last in key order: nothing may have been written before it.
    created = []
    real_open = os.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> int:
        created.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    with pytest.raises(error, match=says) as info:
        save_state(path, {**base_state(), K("['z']"): {"bad": value}})
    assert "['z']['bad']" in str(info.value)
    assert created == []
    assert os.listdir(tmp_path) == ["s"]
    assert path.read_bytes() == before


def test_a_value_nested_deeper_than_a_file_holds_is_refused_before_writing(tmp_path):
    deep: Any = jnp.ones(1)
    for _ in range(300):
        deep = [deep]
    with pytest.raises(LiftValueError, match="nested over 256 levels") as info:
        save_state(tmp_path / "s", {K("['deep']"): deep})
    assert "['deep']" in str(info.value)
    assert os.listdir(tmp_path) == []
    shallow: Any = jnp.ones(1)
    for _ in range(200):
        shallow = [shallow]
    save_state(tmp_path / "s", {K("['ok']"): shallow})
    assert same(load_state(tmp_path / "s")[K("['ok']")], shallow)


def test_a_failing_save_leaves_no_stray_file(tmp_path, monkeypatch):
    def broken(file: Any, plan: Any) -> None:
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lift._archive, "write_archive", broken)
    with pytest.raises(OSError, match="No space"):
        save_state(tmp_path / "s", base_state())
    assert os.listdir(tmp_path) == []


def test_saving_never_touches_the_process_umask(tmp_path, monkeypatch):
    def forbidden(mask: int) -> int:
        raise AssertionError("os.umask called: a process-wide side effect")

    old = os.umask(0o077)
    try:
        monkeypatch.setattr(os, "umask", forbidden)
        save_state(tmp_path / "s", base_state())
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert ((tmp_path / "s").stat().st_mode & 0o777) == 0o600


# ------------------------------------------------------- own bugs stay visible


def test_a_bug_in_lift_is_not_reported_as_a_damaged_file(saved, monkeypatch):
    def bug(*args: Any) -> None:
        raise AttributeError("a bug in lift")

    monkeypatch.setattr(lift._archive, "_check_member", bug)
    with pytest.raises(AttributeError, match="a bug in lift"):
        load_state(saved)


def test_the_io_modules_import_one_way():
    """The io modules depend one way: io, _summary, _archive, _format."""

    def imports(name: str) -> set[str]:
        tree = ast.parse((LIB / f"{name}.py").read_text())
        return {
            node.module or ""
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1
        }

    assert "io" not in imports("_summary") | imports("_archive") | imports("_format")
    assert "_summary" not in imports("_archive") | imports("_format") | imports("_pure")
    assert "_archive" not in imports("_format") | imports("_like") | imports("_pure")
    for name in ("io", "_format", "_archive", "_like", "_pure", "_summary"):
        assert len((LIB / f"{name}.py").read_text().splitlines()) <= 420, name


# ---------------------------------------------------------------- the fuzzer

DTYPE_NAMES = ["int32", "uint8", "bfloat16", "float32", "key<fry>", "object", "|u1"]
json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**40),
    st.text(max_size=6),
    st.sampled_from([*DTYPE_NAMES, "<i4", "<u2", "<u4", "<f4", "threefry2x32", "rbg"]),
    st.lists(st.one_of(st.integers(0, 9), st.sampled_from([2**31, 2**62])), max_size=4),
)
FIELDS = ["path", "member", "dtype", "shape", "stored_dtype", "stored_shape"]
FIELDS += ["sha256", "key_impl"]
arrays = st.builds(
    lambda shape, dtype: np.zeros(shape, dtype),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from(["int32", "uint8", "uint16", "float32", "uint32"]),
)


@st.composite
def damage(draw: Any, manifest: dict, members: list[tuple[str, bytes]]) -> str:
    """Damage the unpacked file in place; return what was done."""
    entries = manifest["entries"]
    if not entries or not members:
        return "nothing left"
    entry = draw(st.sampled_from(entries))
    if not isinstance(entry.get("leaves"), list) or not entry["leaves"]:
        return "no leaves"
    leaf = draw(st.sampled_from(entry["leaves"]))
    index = draw(st.integers(0, len(members) - 1))
    name, data = members[index]
    kind = draw(
        st.sampled_from(
            [
                "field",
                "drop field",
                "huge",
                "tree",
                "dup entry",
                "drop entry",
                "garbage member",
                "cut member",
                "other array",
                "dup member",
                "drop member",
            ]
        )
    )
    if kind == "field":
        leaf[draw(st.sampled_from(FIELDS))] = draw(json_values)
    elif kind == "drop field":
        leaf.pop(draw(st.sampled_from(FIELDS)), None)
    elif kind == "huge":
        try:
            extra = list(leaf["stored_shape"][len(leaf["shape"]) :])
            stored = np.dtype(leaf["stored_dtype"])
        except (KeyError, TypeError, ValueError):
            extra, stored = [], np.dtype("<u4")
        leaf["shape"] = [draw(st.sampled_from([2**31, 2**40, 2**62]))]
        leaf["stored_shape"] = leaf["shape"] + extra
        if draw(st.booleans()) and len(extra) < 3:  # the header says so too
            header = npy_bytes(np.zeros((0, *extra), stored))
            header = header.replace(b"(0,", b"(%d," % leaf["shape"][0])
            members[index] = (name, header + data[len(header) :])
    elif kind == "tree":
        entry["tree"] = draw(
            st.recursive(json_values, lambda c: st.lists(c, max_size=3))
        )
    elif kind == "dup entry":
        entries.append(json.loads(json.dumps(entry)))
    elif kind == "drop entry":
        entries.remove(entry)
    elif kind == "garbage member":
        members[index] = (name, draw(st.binary(max_size=300)))
    elif kind == "cut member":
        members[index] = (name, data[: draw(st.integers(0, max(0, len(data) - 1)))])
    elif kind == "other array":
        members[index] = (name, npy_bytes(draw(arrays)))
    elif kind == "dup member":
        members.append((name, draw(st.binary(max_size=100))))
    elif kind == "drop member":
        del members[index]
    return kind


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzzed_files_load_exactly_or_raise_state_file_error(data):
    state = base_state()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_state(folder / "s", state)
        manifest, members = unpack(folder / "s")
        for _ in range(data.draw(st.integers(1, 3))):
            data.draw(damage(manifest, members))
        pack(folder / "d", manifest, members)
        raw = bytearray((folder / "d").read_bytes())
        if data.draw(st.booleans()):  # and sometimes the archive itself
            at = data.draw(st.integers(0, len(raw) - 1))
            if data.draw(st.booleans()):
                raw = raw[:at]
            else:
                raw[at] ^= data.draw(st.integers(1, 255))
            (folder / "d").write_bytes(bytes(raw))
        for like in (None, state):
            got, peak = peak_while(lambda: load_state(folder / "d", like=like))  # noqa: B023
            assert peak < len(raw) + (32 << 20), peak
            if isinstance(got, StateFileError):
                continue
            if isinstance(got, StateMismatchError) and like is not None:
                continue  # e.g. an entry dropped: the file holds less than `like`
            if isinstance(got, LiftValueError) and "without its class" in str(got):
                continue  # the manifest calls a value a custom node
            assert isinstance(got, dict), repr(got)
            # Whatever loads is what was saved (an entry may have been dropped).
            assert set(got) <= set(state)
            for key, value in got.items():
                assert same(value, state[key]), key
            if like is not None:
                assert list(got) == list(state)


def test_save_state_and_to_pure_dict_refuse_a_value_jax_cannot_flatten(tmp_path):
    x = jnp.ones(2)
    state = {lift.StateKey("w"): {1: x, "a": x}}  # built by hand, not exported
    with pytest.raises(lift.LiftValueError, match=r"save_state.*'w'.*flattened"):
        lift.save_state(tmp_path / "s", state)
    assert not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(lift.LiftValueError, match=r"to_pure_dict.*'w'.*flattened"):
        lift.to_pure_dict(state)


def test_a_state_mismatch_error_pickles_and_copies_with_its_problems():
    import copy
    import pickle

    err = lift.StateMismatchError("differs", [("a", "shape")])
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
        assert type(again) is lift.StateMismatchError
        assert str(again) == "differs"
        assert again.problems == [("a", "shape")]
