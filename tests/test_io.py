"""lift.io: state files (format, atomicity, damage, validation), pure dicts, summary."""

from __future__ import annotations

import hashlib
import html
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lift._archive
from lift import LiftError, StateEntry, StateKey, export_state
from lift._errors import LiftTypeError, LiftValueError
from lift.io import (
    MANIFEST,
    StateFileError,
    StateMismatchError,
    from_pure_dict,
    load_state,
    save_state,
    summary,
    to_pure_dict,
)
from lift.testing import states

# ----------------------------------------------------------------------- helpers


class Stats(NamedTuple):
    mean: Any
    var: Any


def bits(x: Any) -> tuple[str, tuple[int, ...], bytes]:
    """Everything that makes two arrays identical, NaN payloads and -0.0 included."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(x))
        return (str(x.dtype), tuple(x.shape), data.tobytes())
    host = np.asarray(x)
    return (str(host.dtype), host.shape, host.tobytes())


def assert_same_state(got: dict, want: dict) -> None:
    assert list(map(str, got)) == list(map(str, want)) or sorted(got) == sorted(want)
    assert set(got) == set(want)
    for key in want:
        g_leaves, g_def = jax.tree_util.tree_flatten(got[key])
        w_leaves, w_def = jax.tree_util.tree_flatten(want[key])
        assert g_def == w_def, key
        for g, w in zip(g_leaves, w_leaves, strict=True):
            assert isinstance(g, jax.Array), (key, type(g))
            assert bits(g) == bits(w), key


def random_bits(rng: np.random.Generator, shape: tuple, dtype: Any) -> np.ndarray:
    """Arbitrary bit patterns of ``dtype`` (NaNs, infinities, -0.0, subnormals)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8)
    return raw.reshape(-1).view(dtype).reshape(shape)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def make_state() -> dict[StateKey, Any]:
    tree = {
        "bn": {"mean": StateEntry(jnp.arange(3.0)), "var": StateEntry(jnp.ones(3))},
        "stats": StateEntry(Stats(jnp.zeros(2, jnp.bfloat16), jnp.ones(2))),
        "step": StateEntry(jnp.int32(4)),
        "rng": StateEntry(jax.random.key(3)),
    }
    return export_state(tree)[1]


K = StateKey
# The leaf paths of `make_state()`, in key order.
MADE_PATHS = [
    "['bn']['mean']",
    "['bn']['var']",
    "['rng']",
    "['stats'].mean",
    "['stats'].var",
    "['step']",
]

# ------------------------------------------------------------------ round trips

DTYPES_32 = [
    "bool",
    "int8",
    "int16",
    "int32",
    "uint8",
    "uint16",
    "uint32",
    "float16",
    "bfloat16",
    "float32",
    "complex64",
    "float8_e4m3fn",
    "float8_e5m2",
    "int4",
    "uint4",
]
DTYPES_64 = ["int64", "uint64", "float64", "complex128"]
SHAPES = [(), (0,), (3,), (2, 3), (0, 4), (1, 1, 2)]


@pytest.mark.parametrize("dtype", DTYPES_32)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_dtype_and_shape_round_trips_bit_exactly(folder, dtype, shape):
    rng = np.random.default_rng(0)
    if dtype in ("int4", "uint4"):  # only 16 values; other bit patterns are invalid
        host = rng.integers(0, 8, size=shape).astype(jnp.dtype(dtype))
    else:
        host = random_bits(rng, shape, jnp.dtype(dtype))
    state = {K("['x']"): jnp.asarray(host)}
    assert state[K("['x']")].dtype == jnp.dtype(dtype)
    save_state(folder / "s", state)
    for like in (None, state):
        got = load_state(folder / "s", like=like)
        assert_same_state(got, state)


@pytest.mark.parametrize("dtype", DTYPES_64)
@pytest.mark.parametrize("shape", SHAPES)
def test_64_bit_dtypes_round_trip_under_x64(folder, dtype, shape):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        state = {K("['x']"): jnp.asarray(random_bits(rng, shape, dtype))}
        assert state[K("['x']")].dtype == np.dtype(dtype)
        save_state(folder / "s", state)
        got = load_state(folder / "s")
        assert_same_state(got, state)
        assert_same_state(load_state(folder / "s", like=state), state)


def test_64_bit_file_without_x64_is_an_error_not_a_truncation(folder):
    with jax.enable_x64(True):
        save_state(folder / "s", {K("['w']"): jnp.arange(3, dtype=jnp.float64)})
    with pytest.raises(LiftValueError, match="64-bit") as info:
        load_state(folder / "s")
    assert "['w']" in str(info.value)
    assert "enable_x64" in str(info.value)


def test_numpy_and_python_leaves_load_as_jax_arrays(folder):
    state = {K("a"): np.arange(4, dtype=np.int16), K("b"): 2.5, K("c"): True}
    save_state(folder / "s", state)
    got = load_state(folder / "s")
    assert all(isinstance(v, jax.Array) for v in got.values())
    assert got[K("a")].dtype == np.int16
    assert (np.asarray(got[K("a")]) == np.arange(4)).all()
    assert got[K("b")].dtype == jnp.float32
    assert float(got[K("b")]) == 2.5
    assert got[K("c")].dtype == jnp.bool_
    assert bool(got[K("c")])


def test_big_endian_numpy_arrays_load_with_their_values(folder):
    host = np.arange(5, dtype=">i4")
    save_state(folder / "s", {K("a"): host})
    got = load_state(folder / "s")[K("a")]
    assert got.dtype == np.int32
    assert (np.asarray(got) == np.arange(5)).all()


def test_non_contiguous_arrays_round_trip(folder):
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {K("t"): host.T, K("s"): host[:, ::2]}
    save_state(folder / "s", state)
    got = load_state(folder / "s")
    assert (np.asarray(got[K("t")]) == host.T).all()
    assert (np.asarray(got[K("s")]) == host[:, ::2]).all()


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
@pytest.mark.parametrize("shape", [(), (3,), (0,), (2, 2)])
def test_typed_prng_keys_round_trip_with_their_impl(folder, impl, shape):
    keys = jax.random.key(7, impl=impl)
    if shape:
        keys = jax.random.split(keys, int(np.prod(shape))).reshape(shape)
    state = {K("rng"): keys}
    save_state(folder / "s", state)
    for like in (None, state):
        got = load_state(folder / "s", like=like)[K("rng")]
        assert jax.random.key_impl(got) == impl
        assert got.shape == shape
        assert bits(got) == bits(keys)
    if not shape:  # the loaded key draws the same numbers
        assert jax.random.normal(got) == jax.random.normal(keys)


def test_raw_uint32_keys_stay_raw(folder):
    old_style = jax.random.PRNGKey(0)
    save_state(folder / "s", {K("k"): old_style})
    got = load_state(folder / "s")[K("k")]
    assert got.dtype == jnp.uint32
    assert bits(got) == bits(old_style)


# ------------------------------------------------------------- pytree values


def test_builtin_container_values_rebuild_without_like(folder):
    state = {
        K("d"): {"a": jnp.ones(2), "b": (jnp.zeros(()), [jnp.int8(3)])},
        K("i"): {1: jnp.ones(1), 0: jnp.zeros(1)},
        K("n"): None,
        K("t"): (),
        K("x"): jnp.arange(2),
    }
    save_state(folder / "s", state)
    got = load_state(folder / "s")
    assert_same_state(got, state)
    assert isinstance(got[K("d")]["b"], tuple)
    assert isinstance(got[K("d")]["b"][1], list)
    assert got[K("n")] is None
    assert got[K("t")] == ()
    assert list(got[K("i")]) == [0, 1]


def test_namedtuple_value_needs_like_and_round_trips_with_it(folder):
    state = make_state()
    save_state(folder / "s", state)
    with pytest.raises(LiftValueError, match="like=") as info:
        load_state(folder / "s")
    assert "['stats']" in str(info.value)
    assert "Stats" in str(info.value)
    got = load_state(folder / "s", like=state)
    assert isinstance(got[K("['stats']")], Stats)
    assert_same_state(got, state)
    # The part without custom nodes loads without `like`.
    part = load_state(folder / "s", filters=["bn.*", "step"])
    assert sorted(part) == [K("['bn']['mean']"), K("['bn']['var']"), K("['step']")]


def test_like_may_hold_shape_dtype_structs(folder):
    state = make_state()
    save_state(folder / "s", state)
    abstract = jax.eval_shape(lambda: state)
    got = load_state(folder / "s", like=abstract)
    assert_same_state(got, state)


def test_result_follows_like_key_order_or_else_the_files_key_order(folder):
    state = {K("b"): jnp.ones(1), K("a"): jnp.zeros(1)}
    save_state(folder / "s", state)
    assert list(load_state(folder / "s")) == [K("a"), K("b")]
    like = {K("b"): jnp.ones(1), K("a"): jnp.ones(1)}
    assert list(load_state(folder / "s", like=like)) == [K("b"), K("a")]
    like = {K("a"): jnp.ones(1), K("b"): jnp.ones(1)}
    assert list(load_state(folder / "s", like=like)) == [K("a"), K("b")]


def test_like_keys_may_be_plain_strings(folder):
    state = make_state()
    save_state(folder / "s", state)
    got = load_state(folder / "s", like={str(k): v for k, v in state.items()})
    assert all(type(k) is StateKey for k in got)
    assert_same_state(got, state)


# -------------------------------------------------------------------- the file


def test_file_is_written_at_exactly_the_path_and_nothing_else(folder):
    state = make_state()
    save_state(str(folder / "ckpt"), state)
    save_state(folder / "other.bin", state)
    assert listing(folder) == ["ckpt", "other.bin"]
    assert (folder / "ckpt").read_bytes() == (folder / "other.bin").read_bytes()


def test_file_format_is_a_zip_of_npy_with_a_json_manifest(folder):
    state = make_state()
    save_state(folder / "s", state)
    with zipfile.ZipFile(folder / "s") as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read(MANIFEST))
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
    assert manifest["format"] == "lift.state"
    assert manifest["version"] == 1
    keys = [e["key"] for e in manifest["entries"]]
    assert keys == sorted(str(k) for k in state)  # key order, not insertion order
    stats = next(e for e in manifest["entries"] if e["key"] == "['stats']")
    assert stats["tree"] == {"node": f"{__name__}.Stats"}
    assert [leaf["path"] for leaf in stats["leaves"]] == [".mean", ".var"]
    mean = stats["leaves"][0]
    assert mean["dtype"] == "bfloat16"
    assert mean["stored_dtype"] == "<u2"
    assert mean["member"] == "['stats'].mean.npy"
    assert mean["member"] in names
    rng = next(e for e in manifest["entries"] if e["key"] == "['rng']")["leaves"][0]
    assert rng["key_impl"] == "threefry2x32"
    assert rng["stored_shape"] == [2]
    assert rng["dtype"] == "key<fry>"
    assert rng["shape"] == []
    # Every leaf's member is there, with its checksum.
    with zipfile.ZipFile(folder / "s") as archive:
        for entry in manifest["entries"]:
            for leaf in entry["leaves"]:
                data = archive.read(leaf["member"])
                assert hashlib.sha256(data).hexdigest() == leaf["sha256"]


def test_numpy_load_reads_the_arrays_by_path_without_pickle(folder):
    state = make_state()
    save_state(folder / "s", state)
    with np.load(folder / "s", allow_pickle=False) as npz:
        assert (npz["['bn']['mean']"] == np.arange(3.0)).all()
        assert npz["['stats'].mean"].dtype == np.uint16  # bfloat16 bits
        assert "['step']" in npz.files


def test_unsafe_or_colliding_member_names_fall_back_to_numbered_names(folder):
    state = {
        K("a/b"): jnp.ones(1),
        K("c\\d"): jnp.zeros(1),
        K("manifest"): jnp.ones(2),
        K("x"): (jnp.ones(1),),
        K("x[0]"): jnp.zeros(1),
    }
    save_state(folder / "s", state)
    with zipfile.ZipFile(folder / "s") as archive:
        names = archive.namelist()
    assert all("/" not in n and "\\" not in n for n in names)
    assert len(set(names)) == len(names) == 6
    assert_same_state(load_state(folder / "s", like=state), state)


def test_saving_is_deterministic(folder):
    save_state(folder / "a", make_state())
    save_state(folder / "b", make_state())
    assert (folder / "a").read_bytes() == (folder / "b").read_bytes()


def test_overwriting_keeps_the_file_mode(folder):
    path = folder / "s"
    save_state(path, make_state())
    os.chmod(path, 0o640)
    save_state(path, {K("a"): jnp.ones(1)})
    assert (path.stat().st_mode & 0o777) == 0o640
    assert list(load_state(path)) == [K("a")]


def test_new_file_mode_follows_the_umask(folder):
    old = os.umask(0o027)
    try:
        save_state(folder / "s", {K("a"): jnp.ones(1)})
    finally:
        os.umask(old)
    assert ((folder / "s").stat().st_mode & 0o777) == 0o640


def test_empty_state_round_trips(folder):
    save_state(folder / "s", {})
    assert load_state(folder / "s") == {}
    assert load_state(folder / "s", like={}) == {}


# --------------------------------------------------------------- path errors


def test_missing_file_is_file_not_found_naming_the_path(folder):
    with pytest.raises(FileNotFoundError, match="no file at") as info:
        load_state(folder / "nope")
    assert "nope" in str(info.value)


def test_missing_folder_on_save_is_file_not_found(folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_state(folder / "missing" / "s", make_state())
    assert listing(folder) == []


def test_unwritable_folder_is_a_clear_error_and_leaves_no_file(folder, monkeypatch):
    locked = folder / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        os.chmod(locked, 0o500)
        try:
            with pytest.raises(PermissionError, match="cannot create a file in"):
                save_state(locked / "s", make_state())
        finally:
            os.chmod(locked, 0o700)
    else:  # root writes anywhere: make the temporary file's creation fail instead
        real_open = os.open

        def refuse(file, *args, **kwargs):
            if os.path.dirname(file) == str(locked):
                raise PermissionError(13, "Permission denied", file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
        with pytest.raises(PermissionError, match="cannot create a file in") as info:
            save_state(locked / "s", make_state())
        assert str(locked) in str(info.value)
    assert listing(locked) == []


def test_failed_rename_keeps_the_old_file_and_no_temporary(folder, monkeypatch):
    path = folder / "s"
    save_state(path, make_state())
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        save_state(path, {K("new"): jnp.ones(5)})
    monkeypatch.undo()
    assert listing(folder) == ["s"]
    assert path.read_bytes() == before


class Exploding:
    """An array-like whose conversion fails, as a device error mid-save would."""

    shape = (3,)
    dtype = np.dtype("float32")

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("device lost")


def test_exception_mid_write_keeps_the_old_file_and_no_temporary(folder):
    path = folder / "s"
    save_state(path, make_state())
    before = path.read_bytes()
    # Arrays before the failing one have been written when it fails.
    bad = {K("a"): jnp.ones(1000), K("b"): jnp.ones(5), K("c"): Exploding()}
    with pytest.raises(RuntimeError, match="device lost"):
        save_state(path, bad)
    assert listing(folder) == ["s"]
    assert path.read_bytes() == before


def test_keyboard_interrupt_mid_write_leaves_no_temporary(folder, monkeypatch):
    real = lift._archive.write_archive

    def interrupted(file, plan):
        real(file, plan)
        raise KeyboardInterrupt

    monkeypatch.setattr(lift._archive, "write_archive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_state(folder / "s", make_state())
    assert listing(folder) == []


def test_saving_over_a_folder_fails_without_a_stray_file(folder):
    (folder / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="Is a directory"):
        save_state(folder / "d", make_state())
    assert listing(folder) == ["d"]


# ----------------------------------------------------------------- bad input


def test_non_array_leaf_is_a_type_error_naming_the_path(folder):
    with pytest.raises(LiftTypeError, match=r"\['cfg'\]\.mean"):
        save_state(folder / "s", {K("['cfg']"): Stats("relu", jnp.ones(1))})
    with pytest.raises(LiftTypeError, match="not an array"):
        save_state(folder / "s", {K("x"): "text"})
    with pytest.raises(LiftTypeError, match="not a JAX dtype"):
        save_state(folder / "s", {K("x"): np.array(["a"])})
    assert listing(folder) == []


def test_saving_inside_jit_is_a_type_error(folder):
    @jax.jit
    def step(x):
        save_state(folder / "s", {K("x"): x})
        return x

    with pytest.raises(LiftTypeError, match="tracer"):
        step(jnp.ones(2))
    assert listing(folder) == []


def test_state_must_be_a_dict_of_string_keys(folder):
    with pytest.raises(LiftTypeError, match="state dict"):
        save_state(folder / "s", [jnp.ones(1)])
    with pytest.raises(LiftTypeError, match="key of type int"):
        save_state(folder / "s", {0: jnp.ones(1)})
    with pytest.raises(LiftTypeError, match="state dict"):
        load_state(folder / "s", like=[1])


# ------------------------------------------------------------ like validation


def test_wrong_like_reports_every_problem_at_once(folder):
    state = make_state()
    save_state(folder / "s", state)
    like = dict(state)
    del like[K("['step']")]  # unexpected in the file
    like[K("['extra']")] = jnp.ones(1)  # missing from the file
    like[K("['bn']['mean']")] = jnp.zeros(4)  # shape
    like[K("['bn']['var']")] = jnp.ones(3, jnp.int32)  # dtype
    like[K("['stats']")] = {"mean": jnp.zeros(2)}  # structure
    like[K("['rng']")] = jax.random.key(0, impl="rbg")  # key dtype
    with pytest.raises(StateMismatchError) as info:
        load_state(folder / "s", like=like)
    err = info.value
    assert isinstance(err, LiftValueError)
    assert isinstance(err, LiftError)
    paths = [p for p, _ in err.problems]
    assert paths == sorted(
        [
            "['bn']['mean']",
            "['bn']['var']",
            "['extra']",
            "['rng']",
            "['stats']",
            "['step']",
        ]
    )
    text = str(err)
    assert "6 problems" in text
    assert "shape (3,) stored, `like` has (4,)" in text
    assert "dtype float32 stored, `like` has int32" in text
    assert "in `like` but not in the file" in text
    assert "in the file but not in `like`" in text
    assert "structure differs" in text
    assert "key<fry> stored, `like` has key<rbg>" in text


def test_like_with_non_array_leaf_is_reported(folder):
    save_state(folder / "s", {K("a"): jnp.ones(2)})
    with pytest.raises(StateMismatchError, match="holds a str"):
        load_state(folder / "s", like={K("a"): "x"})


# -------------------------------------------------------------------- filters


def test_filters_restore_part_of_the_file(folder):
    state = make_state()
    save_state(folder / "s", state)
    assert sorted(load_state(folder / "s", filters="bn.*")) == [
        K("['bn']['mean']"),
        K("['bn']['var']"),
    ]
    assert list(load_state(folder / "s", filters=K("['step']"))) == [K("['step']")]
    both = load_state(folder / "s", filters=("bn.mean", K("['rng']")))
    assert sorted(both) == [K("['bn']['mean']"), K("['rng']")]
    assert load_state(folder / "s", filters=[]) == {}


def test_printed_key_filter_selects_exactly_that_key_of_the_file(folder):
    save_state(folder / "s", make_state())
    assert list(load_state(folder / "s", filters="['bn']['mean']")) == [
        K("['bn']['mean']")
    ]
    # The printed form of a key the file does not hold is not read as a glob.
    with pytest.raises(LiftValueError, match=r"\['bn'\].*dotted form.*'bn'"):
        load_state(folder / "s", filters="['bn']")
    with pytest.raises(LiftValueError, match="printed form"):
        load_state(folder / "s", filters="['bn']*")


def test_value_filters_see_the_values(folder):
    state = make_state()
    save_state(folder / "s", state)
    got = load_state(folder / "s", like=state, filters=Stats)
    assert list(got) == [K("['stats']")]
    assert isinstance(got[K("['stats']")], Stats)

    def is_int(key, value):
        return isinstance(value, jax.Array) and value.dtype == jnp.int32

    assert list(load_state(folder / "s", filters=is_int)) == [K("['step']")]


def test_filters_with_like_check_only_the_filtered_part(folder):
    state = make_state()
    save_state(folder / "s", state)
    like = dict(state)
    like[K("['new']")] = jnp.ones(1)  # not in the file, but filtered out
    like[K("['step']")] = jnp.ones(3)  # wrong, but filtered out
    got = load_state(folder / "s", like=like, filters="bn.*")
    assert_same_state(got, {k: v for k, v in state.items() if k.startswith("['bn']")})
    # Unfiltered, both are problems.
    with pytest.raises(StateMismatchError) as info:
        load_state(folder / "s", like=like)
    assert [p for p, _ in info.value.problems] == ["['new']", "['step']", "['step']"]


def test_filtered_like_key_missing_in_the_file_is_reported(folder):
    save_state(folder / "s", {K("['bn']['mean']"): jnp.ones(1)})
    like = {K("['bn']['mean']"): jnp.ones(1), K("['bn']['var']"): jnp.ones(1)}
    with pytest.raises(StateMismatchError, match="var"):
        load_state(folder / "s", like=like, filters="bn.*")


# ------------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 8, (
        "the tests need 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "(the root conftest.py sets it)"
    )
    return jax.make_mesh((8,), ("x",))


def test_loaded_arrays_take_the_shardings_of_like(folder, mesh):
    row = NamedSharding(mesh, P("x"))
    replicated = NamedSharding(mesh, P())
    keys = jax.device_put(jax.random.split(jax.random.key(0), 8), row)
    state = {
        K("w"): jax.device_put(jnp.arange(16.0).reshape(8, 2), row),
        K("b"): jax.device_put(jnp.ones(3), replicated),
        K("k"): keys,
        K("plain"): jnp.ones(2),
    }
    save_state(folder / "s", state)
    got = load_state(folder / "s", like=state)
    assert_same_state(got, state)
    for key in state:
        assert got[key].sharding == state[key].sharding, key
    # Abstract `like` with shardings works too, and without `like`: one device.
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
        for k, v in state.items()
    }
    again = load_state(folder / "s", like=abstract)
    assert again[K("w")].sharding == row
    assert again[K("k")].sharding == row
    assert len(load_state(folder / "s")[K("w")].sharding.device_set) == 1


# --------------------------------------------------------------- damaged files


def small_state() -> dict[StateKey, Any]:
    return {
        K("['a']"): jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
        K("['b']"): {"x": jnp.ones(2, jnp.bfloat16), "k": jax.random.key(1)},
    }


def test_truncated_files_are_state_file_errors(folder):
    state = small_state()
    save_state(folder / "s", state)
    data = (folder / "s").read_bytes()
    for cut in sorted(
        {0, 1, 4, 30, 100, len(data) // 2, len(data) - 22, len(data) - 1}
    ):
        (folder / "t").write_bytes(data[:cut])
        with pytest.raises(StateFileError):
            load_state(folder / "t")


def test_every_flipped_byte_raises_or_gives_identical_arrays(folder):
    state = small_state()
    save_state(folder / "s", state)
    data = (folder / "s").read_bytes()
    raised = 0
    for offset in range(len(data)):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        (folder / "d").write_bytes(bytes(damaged))
        try:
            got = load_state(folder / "d")
        except StateFileError:
            raised += 1
            continue
        assert_same_state(got, state)
    # Only bytes that no reader looks at (timestamps, attributes, ...) may pass.
    assert raised > len(data) * 0.8


def test_bad_checksum_is_detected(folder):
    save_state(folder / "s", {K("a"): jnp.arange(4, dtype=jnp.int32)})
    # Rewrite the archive with altered data but a valid zip CRC: only the manifest's
    # SHA-256 can tell.
    with zipfile.ZipFile(folder / "s") as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    data = bytearray(members["a.npy"])
    data[-1] ^= 1
    members["a.npy"] = bytes(data)
    with zipfile.ZipFile(folder / "d", "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(StateFileError, match="checksum"):
        load_state(folder / "d")


def rewrite_manifest(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    manifest = json.loads(members.pop(MANIFEST))
    edit(manifest)
    with zipfile.ZipFile(dst, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
        if manifest is not None:
            archive.writestr(MANIFEST, json.dumps(manifest))


def test_wrong_version_missing_manifest_and_foreign_files(folder):
    save_state(folder / "s", small_state())

    def future(m):
        m["version"] = 2

    rewrite_manifest(folder / "s", folder / "v", future)
    with pytest.raises(StateFileError, match="version 2"):
        load_state(folder / "v")

    with zipfile.ZipFile(folder / "s") as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    with zipfile.ZipFile(folder / "m", "w") as archive:
        for name, content in members.items():
            if name != MANIFEST:
                archive.writestr(name, content)
    with pytest.raises(StateFileError, match="manifest"):
        load_state(folder / "m")

    np.savez(folder / "plain.npz", a=np.ones(2))
    with pytest.raises(StateFileError):
        load_state(folder / "plain.npz")
    (folder / "text").write_text("hello")
    with pytest.raises(StateFileError):
        load_state(folder / "text")


def test_manifest_that_disagrees_with_the_member_is_an_error(folder):
    save_state(folder / "s", {K("a"): jnp.arange(4, dtype=jnp.int32)})

    def grow(m):
        m["entries"][0]["leaves"][0]["stored_shape"] = [10**12]
        m["entries"][0]["leaves"][0]["shape"] = [10**12]

    rewrite_manifest(folder / "s", folder / "d", grow)
    with pytest.raises(StateFileError, match="shorter"):
        load_state(folder / "d")

    def lie(m):
        m["entries"][0]["leaves"][0]["stored_dtype"] = "<f4"
        m["entries"][0]["leaves"][0]["dtype"] = "float32"

    rewrite_manifest(folder / "s", folder / "e", lie)
    with pytest.raises(StateFileError, match="header"):
        load_state(folder / "e")

    def mangle(m):
        m["entries"][0]["tree"] = {"set": []}

    rewrite_manifest(folder / "s", folder / "f", mangle)
    with pytest.raises(StateFileError):
        load_state(folder / "f")


# ---------------------------------------------------------- hypothesis: laws


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_round_trip_of_generated_states(state):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "s")
        save_state(path, state)
        got = load_state(path, like=state)
        assert os.listdir(folder) == ["s"]
    assert list(got) == list(state)
    for key in state:
        g_leaves, g_def = jax.tree_util.tree_flatten(got[key])
        w_leaves, w_def = jax.tree_util.tree_flatten(state[key])
        assert g_def == w_def
        assert [bits(g) for g in g_leaves] == [bits(jnp.asarray(w)) for w in w_leaves]


ALL_DTYPES = DTYPES_32 + DTYPES_64


@st.composite
def raw_states(draw):
    """States of arbitrary bit patterns in every dtype, typed keys included."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names = draw(st.lists(st.text("ab.[]'0_", max_size=6), unique=True, max_size=5))
    state = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        kind = draw(st.sampled_from([*ALL_DTYPES, "key"]))
        if kind == "key":
            impl = draw(st.sampled_from(["threefry2x32", "rbg"]))
            base = jax.random.key(int(rng.integers(0, 1000)), impl=impl)
            value = jax.random.split(base, int(np.prod(shape))).reshape(shape)
        elif kind in ("int4", "uint4"):
            value = jnp.asarray(rng.integers(0, 8, size=shape).astype(jnp.dtype(kind)))
        else:
            value = jnp.asarray(random_bits(rng, shape, jnp.dtype(kind)))
        if draw(st.booleans()):
            value = (value, {"z": value})
        state[K(name)] = value
    return state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_of_raw_bit_patterns_in_every_dtype(data):
    with jax.enable_x64(True):
        state = data.draw(raw_states())
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "s")
            save_state(path, state)
            assert_same_state(load_state(path), state)
            assert_same_state(load_state(path, like=state), state)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(0, 10**6), mask=st.integers(1, 255), cut=st.booleans())
def test_damage_anywhere_never_yields_different_arrays(offset, mask, cut):
    state = small_state()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "s")
        save_state(path, state)
        with open(path, "rb") as f:
            data = bytearray(f.read())
        offset %= len(data)
        if cut:
            data = data[:offset]
        else:
            data[offset] ^= mask
        with open(path, "wb") as f:
            f.write(data)
        try:
            got = load_state(path)
        except StateFileError:
            return
    assert not cut
    assert_same_state(got, state)


# ---------------------------------------------------------------- pure dicts


def test_pure_dict_round_trip_with_keys_and_namedtuples(folder):
    state = make_state()
    pure = to_pure_dict(state)
    assert sorted(pure) == MADE_PATHS
    assert pure["['rng']"].dtype == jnp.uint32  # key data
    assert_same_state(from_pure_dict(pure, like=state), state)
    # Through np.savez / np.load (bfloat16 aside: numpy has no such dtype).
    storable = {k: np.asarray(v) for k, v in pure.items() if "stats" not in k}
    np.savez(folder / "p.npz", **storable)
    like = {k: v for k, v in state.items() if k != K("['stats']")}
    with np.load(folder / "p.npz") as npz:
        got = from_pure_dict(dict(npz), like=like)
    assert_same_state(got, like)


def test_pure_dict_matches_numpy_load_of_a_state_file(folder):
    state = {K("['a']"): jnp.arange(3), K("['b']"): (jnp.ones(2), jnp.zeros(1))}
    save_state(folder / "s", state)
    with np.load(folder / "s") as npz:
        names = [name for name in npz.files if name != MANIFEST]
        assert sorted(names) == sorted(to_pure_dict(state))
        arrays = {name: npz[name] for name in names}
    got = from_pure_dict(arrays, like=state)
    assert_same_state(got, state)


def test_from_pure_dict_reports_every_problem(folder):
    state = make_state()
    pure = dict(to_pure_dict(state))
    del pure["['step']"]
    pure["['junk']"] = jnp.ones(1)
    pure["['bn']['mean']"] = jnp.ones(5)
    pure["['bn']['var']"] = jnp.ones(3, jnp.int32)
    pure["['rng']"] = jnp.ones(2, jnp.int32)
    with pytest.raises(StateMismatchError) as info:
        from_pure_dict(pure, like=state)
    assert [p for p, _ in info.value.problems] == sorted(
        [
            "['bn']['mean']",
            "['bn']['var']",
            "['junk']",
            "['rng']",
            "['step']",
        ]
    )
    assert "uint32" in str(info.value)  # what a key's data must be


def test_from_pure_dict_places_on_like_shardings(mesh):
    row = NamedSharding(mesh, P("x"))
    state = {
        K("w"): jax.device_put(jnp.arange(8.0), row),
        K("k"): jax.device_put(jax.random.split(jax.random.key(0), 8), row),
    }
    pure = {k: np.asarray(v) for k, v in to_pure_dict(state).items()}
    got = from_pure_dict(pure, like=state)
    assert_same_state(got, state)
    assert got[K("w")].sharding == row
    assert got[K("k")].sharding == row
    abstract = jax.eval_shape(lambda: state)  # shardings over an abstract mesh
    with pytest.raises(LiftValueError, match="set_mesh"):
        from_pure_dict(pure, like=abstract)
    with jax.set_mesh(mesh):
        again = from_pure_dict(pure, like=abstract)
    assert_same_state(again, state)
    assert again[K("w")].sharding == row


def test_to_pure_dict_refuses_colliding_names():
    with pytest.raises(LiftValueError, match="both be named"):
        to_pure_dict({K("x"): (jnp.ones(1),), K("x[0]"): jnp.ones(1)})


# ------------------------------------------------------------------- summary


def test_summary_lists_every_leaf_with_totals():
    state = make_state()
    text = summary(state)
    assert isinstance(text, str)
    lines = text.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "bytes"]
    paths = [line.split()[0] for line in lines[1:-1]]
    assert paths == MADE_PATHS
    expected = 12 + 12 + 8 + 4 + 8 + 4
    assert text.total_bytes == expected
    assert lines[-1] == f"6 arrays, {expected} bytes ({expected} B)"
    assert "key<fry>" in lines[3]
    assert "bfloat16" in lines[4]
    assert "sharding" not in text
    page = text._repr_html_()
    assert page.startswith("<table>")
    assert html.escape("['stats'].mean") in page


def test_summary_shows_sharding_only_when_sharded(mesh):
    state = {
        K("w"): jax.device_put(jnp.zeros((8, 1024)), NamedSharding(mesh, P("x"))),
        K("r"): jax.device_put(jnp.zeros(3), NamedSharding(mesh, P())),
        K("s"): jnp.zeros(2),
    }
    text = summary(state)
    lines = text.splitlines()
    assert lines[0].split()[-1] == "sharding"
    # Rows are sorted by key: r, s, w.
    assert "replicated over 8 devices" in lines[1]
    assert lines[2].endswith("1 device")
    assert "P('x',) over 8 devices" in lines[3]
    assert lines[-1].endswith("(32.0 KiB)")


def test_summary_of_abstract_state_and_of_a_file(folder):
    state = make_state()
    abstract = jax.eval_shape(lambda: state)
    assert [r[:4] for r in summary(abstract).rows] == [
        r[:4] for r in summary(state).rows
    ]
    save_state(folder / "s", state)
    from_file = summary(folder / "s")
    assert [r[:4] for r in from_file.rows] == [r[:4] for r in summary(state).rows]


def test_summary_refuses_non_states():
    with pytest.raises(LiftTypeError, match="summary"):
        summary([1, 2])


def test_pure_dict_round_trip_through_safetensors(folder):
    safetensors_flax = pytest.importorskip("safetensors.flax")
    state = make_state()
    safetensors_flax.save_file(to_pure_dict(state), folder / "s.safetensors")
    restored = safetensors_flax.load_file(folder / "s.safetensors")
    assert_same_state(from_pure_dict(restored, like=state), state)
