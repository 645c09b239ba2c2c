"""Files and tooling for state: save it, load it, convert it, summarise it.

A state (the dict :func:`~lift.export_state` returns) goes to one file with
:func:`save_state` and comes back with :func:`load_state`. The file is a zip archive
of ``.npy`` arrays plus a JSON manifest (the format is described in ``docs/saving.md``
and below); it never uses pickle, records a SHA-256 checksum per array, and is written
atomically, so a crash mid-save leaves the previous file intact.

>>> import os, tempfile
>>> import jax.numpy as jnp
>>> from lift import StateEntry, export_state
>>> from lift.io import load_state, save_state
>>> model = {"mean": StateEntry(jnp.zeros(3)), "count": StateEntry(jnp.int32(0))}
>>> tree, state = export_state(model)
>>> with tempfile.TemporaryDirectory() as folder:
...     path = os.path.join(folder, "state.lift")
...     save_state(path, state)
...     again = load_state(path, like=state)
>>> again[tree["mean"]], again[tree["count"]]
(Array([0., 0., 0.], dtype=float32), Array(0, dtype=int32))

**The file format** (version 1). A ZIP archive (entries stored, not compressed)
holding:

- ``manifest.json``: ``{"format": "lift.state", "version": 1, "entries": [...]}``.
  Each entry is one state key: ``{"key": <key path>, "tree": <structure>,
  "treedef": <str(PyTreeDef), informational>, "leaves": [...]}``. The structure is
  ``"*"`` for an array, ``null`` for ``None``, ``{"dict": [[k, s], ...]}``,
  ``{"list": [s, ...]}`` or ``{"tuple": [s, ...]}`` for the built-in containers, and
  ``{"node": "<module.Class>"}`` for any other pytree node (a namedtuple, dataclass or
  module; loading such a value needs ``like=``). Each leaf, in JAX's flatten order, is
  ``{"path": <leaf key path inside the value, "" for an array>, "member": <zip entry
  name>, "dtype": <JAX dtype name>, "shape": [...], "stored_dtype": <numpy dtype
  str>, "stored_shape": [...], "sha256": <hex digest of the whole member>}`` plus
  ``"key_impl"`` for a typed PRNG key array.
- one ``.npy`` member per array leaf, named ``<key path><leaf path>.npy`` (so
  ``numpy.load(path)`` lists the arrays by path), or ``leaf<n>.npy`` when that name
  would contain a slash, a backslash or NUL, or repeat another. Dtypes numpy cannot
  store natively (``bfloat16``, the ``float8`` and ``int4`` families) are stored as the
  unsigned integers of the same width, viewed back on load; PRNG key arrays are
  stored as :func:`jax.random.key_data` and rewrapped with their implementation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from numpy.lib import format as npy

from ._errors import LiftTypeError, LiftValueError
from ._export import State, as_predicate
from ._keys import StateKey
from ._summary import StateSummary, SummaryRow, summary

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "StateFileError",
    "StateMismatchError",
    "StateSummary",
    "SummaryRow",
    "from_pure_dict",
    "load_state",
    "save_state",
    "summary",
    "to_pure_dict",
]

#: The ``"format"`` field of every manifest.
FORMAT = "lift.state"
#: The version of the file format this module writes and reads.
VERSION = 1
#: The name of the manifest inside the archive.
MANIFEST = "manifest.json"

PathLike = str | os.PathLike[str]
Filters = Any  # one filter (as in `filter_state`) or a list/tuple of them

# Dtypes numpy stores natively in `.npy`; any other JAX dtype is stored as raw bits.
_NATIVE = frozenset(
    np.dtype(name)
    for name in (
        "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
        "float16 float32 float64 complex64 complex128"
    ).split()
)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so equal states give equal files
_CHUNK = 1 << 24


class StateFileError(LiftValueError):
    """A file is not a readable lift state file: truncated, damaged, or unknown.

    Examples:
        >>> import os, tempfile
        >>> from lift.io import StateFileError, load_state
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "notes.txt")
        ...     with open(path, "w") as f:
        ...         _ = f.write("not a state")
        ...     try:
        ...         load_state(path)
        ...     except StateFileError as err:
        ...         print("not a readable lift state file" in str(err))
        True
    """


class StateMismatchError(LiftValueError):
    """Loaded state does not match ``like``; ``problems`` lists every difference.

    Attributes:
        problems: ``(path, description)`` pairs, one per problem, in path order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateKey
        >>> from lift.io import StateMismatchError, from_pure_dict
        >>> like = {StateKey("a"): jnp.zeros(2), StateKey("b"): jnp.zeros(())}
        >>> try:
        ...     from_pure_dict({"a": jnp.zeros(3)}, like=like)
        ... except StateMismatchError as err:
        ...     for problem in err.problems:
        ...         print(problem)
        ('a', 'shape (3,) in the dict, `like` has (2,)')
        ('b', 'in `like` but not in the dict')
    """

    def __init__(self, message: str, problems: list[tuple[str, str]]) -> None:
        """Hold the message and the list of problems."""
        super().__init__(message)
        self.problems = problems


# ------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class _Leaf:
    path: str  # key path of the leaf inside the entry's value
    member: str  # zip member name
    dtype: str  # JAX dtype name of the array (``key<fry>`` for keys)
    shape: tuple[int, ...]
    stored_dtype: str  # numpy dtype str of the .npy data
    stored_shape: tuple[int, ...]
    sha256: str
    key_impl: str | None = None


@dataclass(frozen=True)
class _Entry:
    key: str
    tree: Any  # JSON structure, see the module docstring
    treedef: str
    leaves: tuple[_Leaf, ...]


def _dtype_name(dtype: Any) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def _is_key_dtype(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _encode(node: Any) -> Any:
    """The JSON structure of a state value (see the module docstring)."""
    if node is None:
        return None
    kind = type(node)
    if kind is dict:
        keys = list(node)
        if all(type(k) is str for k in keys) or all(type(k) is int for k in keys):
            return {"dict": [[k, _encode(node[k])] for k in sorted(keys)]}
    elif kind is list or kind is tuple:
        return {kind.__name__: [_encode(child) for child in node]}
    elif jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
        return "*"
    return {"node": f"{kind.__module__}.{kind.__qualname__}"}


class _NeedsLike(Exception):
    def __init__(self, node: str) -> None:
        self.node = node


def _decode(spec: Any, leaves: Iterator[Any]) -> Any:
    if spec is None:
        return None
    if spec == "*":
        return next(leaves)
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, body),) = spec.items()
        if kind == "dict":
            return {k: _decode(s, leaves) for k, s in body}
        if kind == "list":
            return [_decode(s, leaves) for s in body]
        if kind == "tuple":
            return tuple(_decode(s, leaves) for s in body)
        if kind == "node":
            raise _NeedsLike(str(body))
    raise ValueError(f"unknown structure {spec!r}")


def _leaf_paths(value: Any) -> tuple[list[str], list[Any], Any]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(value)
    paths = [jax.tree_util.keystr(p) for p, _ in with_path]
    return paths, [leaf for _, leaf in with_path], treedef


def _aval(leaf: Any) -> tuple[tuple[int, ...], str] | None:
    """``(shape, dtype name)`` of an array-like leaf, or None if it is not one."""
    if type(leaf) in (bool, int, float, complex):
        return (), _dtype_name(jax.dtypes.result_type(leaf))
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return None
    return tuple(shape), _dtype_name(dtype)


def _member_name(name: str, index: int, used: set[str]) -> str:
    member = name + ".npy"
    safe = not any(c in name for c in "/\\\x00") and member != MANIFEST
    try:
        member.encode("utf-8")
    except UnicodeEncodeError:
        safe = False
    if not safe or member in used:
        member = f"leaf{index}.npy"
        while member in used:
            member = f"leaf{index}_{len(used)}.npy"
    used.add(member)
    return member


# --------------------------------------------------------------------------- save


def _to_host(where: str, leaf: Any) -> tuple[np.ndarray, str, str | None]:
    """``(host array to store, JAX dtype name, key impl)`` of one leaf."""
    if isinstance(leaf, Tracer):
        raise LiftTypeError(
            f"`save_state`: the value at {where!r} is a tracer ({leaf.aval}); state "
            "can only be saved outside `jit`/`vmap`/`grad`. Return the state from the "
            "traced function and save it afterwards."
        )
    impl = None
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            raise LiftValueError(
                f"`save_state`: the array at {where!r} spans several processes, and "
                "only this process's part is here. Save multi-host state with Orbax "
                "(`to_pure_dict` turns a state into what it takes)."
            )
        if _is_key_dtype(leaf.dtype):
            impl = str(jax.random.key_impl(leaf))
            return np.asarray(jax.random.key_data(leaf)), _dtype_name(leaf.dtype), impl
        host = np.asarray(leaf)
    elif type(leaf) in (bool, int, float, complex):
        host = np.asarray(jnp.asarray(leaf))
    elif isinstance(leaf, (np.ndarray, np.generic)) or hasattr(leaf, "__array__"):
        host = np.asarray(leaf)
    else:
        raise LiftTypeError(
            f"`save_state`: the value at {where!r} is a {type(leaf).__name__}, not an "
            "array. State files hold arrays only; keep other objects in the model "
            "tree (they are static) or convert them to arrays."
        )
    if host.dtype.byteorder == ">":
        host = host.astype(host.dtype.newbyteorder("<"))
    dtype = host.dtype
    if dtype not in _NATIVE:
        try:
            native = jnp.dtype(dtype.name) == dtype and dtype.itemsize in (1, 2, 4, 8)
        except TypeError:
            native = False
        if not native:
            raise LiftTypeError(
                f"`save_state`: the array at {where!r} has dtype {dtype}, which is not "
                "a JAX dtype; it cannot be stored without pickle. Convert it to a "
                "numeric dtype first."
            )
        return host.view(f"uint{8 * dtype.itemsize}"), dtype.name, None
    return host, dtype.name, None


class _HashingWriter:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return self.raw.write(data)


def _write_archive(file: BinaryIO, state: Mapping[Any, Any]) -> None:
    used: set[str] = {MANIFEST}
    entries = []
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in state.items():
            paths, leaves, treedef = _leaf_paths(value)
            records = []
            for path, leaf in zip(paths, leaves, strict=True):
                host, dtype, impl = _to_host(str(key) + path, leaf)
                if not host.flags.c_contiguous:
                    host = host.copy(order="C")
                member = _member_name(str(key) + path, len(used) - 1, used)
                info = zipfile.ZipInfo(member, date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                big = host.nbytes > (1 << 30)
                with archive.open(info, "w", force_zip64=big) as raw:
                    writer = _HashingWriter(raw)  # type: ignore[arg-type]
                    npy.write_array(writer, host, allow_pickle=False)
                records.append(
                    {
                        "path": path,
                        "member": member,
                        "dtype": dtype,
                        "shape": list(np.shape(leaf)),
                        "stored_dtype": host.dtype.str,
                        "stored_shape": list(host.shape),
                        "sha256": writer.hash.hexdigest(),
                        **({"key_impl": impl} if impl is not None else {}),
                    }
                )
            entries.append(
                {
                    "key": str(key),
                    "tree": _encode(value),
                    "treedef": str(treedef),
                    "leaves": records,
                }
            )
        manifest = {"format": FORMAT, "version": VERSION, "entries": entries}
        info = zipfile.ZipInfo(MANIFEST, date_time=_ZIP_DATE)
        info.external_attr = 0o644 << 16
        archive.writestr(info, json.dumps(manifest, indent=1, ensure_ascii=False))


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # the portable way to read it: set and restore
    os.umask(old)
    return old


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, Mapping):
        raise LiftTypeError(
            f"`{where}` takes a state dict (what `export_state` returns), got a "
            f"{type(state).__name__}. Export it first: `tree, state = "
            "export_state(model)`."
        )
    bad = next((k for k in state if not isinstance(k, str)), None)
    if bad is not None:
        raise LiftTypeError(
            f"`{where}`: the state has a key of type {type(bad).__name__} ({bad!r}); "
            "state keys are `StateKey`s (or path strings)."
        )


def save_state(path: PathLike, state: Mapping[StateKey, Any]) -> None:
    """Write ``state`` to the file ``path``, atomically and without pickle.

    The file is written at exactly ``path`` (no extension is added): first to a
    temporary file in the same folder, which is flushed, synced and then renamed over
    ``path``. If anything fails, the temporary file is removed and a file already at
    ``path`` is left as it was.

    Args:
        path: where to write (a ``str`` or :class:`os.PathLike`); its folder must
            exist.
        state: a state dict; its values are arrays or pytrees of arrays of any JAX
            dtype, typed PRNG key arrays included.

    Raises:
        LiftTypeError: ``state`` is not a state dict, or holds something that is not
            an array (or a tracer: save outside of ``jit``).
        FileNotFoundError: the folder of ``path`` does not exist.
        OSError: the folder is not writable, or the disk is full.

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> from lift.io import save_state
        >>> _, state = export_state({"ema": StateEntry(jnp.ones(2, jnp.bfloat16)),
        ...                          "rng": StateEntry(jax.random.key(0))})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_state(os.path.join(folder, "state.lift"), state)
        ...     os.listdir(folder)
        ['state.lift']
    """
    _check_state(state, "save_state")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            errno.ENOENT,
            f"`save_state`: the folder {folder!r} does not exist; create it first "
            "(`os.makedirs(folder, exist_ok=True)`)",
            folder,
        )
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        tmp = tempfile.NamedTemporaryFile(
            dir=folder,
            prefix="." + os.path.basename(path) + ".",
            suffix=".tmp",
            delete=False,
        )
    except OSError as err:
        raise type(err)(
            err.errno,
            f"`save_state` cannot create a file in {folder!r} ({err.strerror}); "
            "choose a folder you can write to",
            folder,
        ) from err
    try:
        with tmp:
            _write_archive(tmp, state)  # type: ignore[arg-type]
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, mode)
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    # Make the rename itself durable; not every platform can open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- load


class _HashingReader:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hash.update(data)
        return data

    def readinto(self, buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            part = buffer[done : done + _CHUNK]
            n = self.raw.readinto(part)  # type: ignore[attr-defined]
            if not n:
                raise ValueError("the array data ends early")
            self.hash.update(part[:n])
            done += n


def _as_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise ValueError(f"bad {what} {value!r}")
    return tuple(value)


def _parse_manifest(raw: bytes) -> list[_Entry]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"the manifest is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"the manifest does not declare format {FORMAT!r}")
    version = manifest.get("version")
    if version != VERSION:
        raise _VersionError(version)
    entries = []
    for item in manifest["entries"]:
        leaves = tuple(
            _Leaf(
                path=str(leaf["path"]),
                member=str(leaf["member"]),
                dtype=str(leaf["dtype"]),
                shape=_as_tuple(leaf["shape"], "shape"),
                stored_dtype=str(leaf["stored_dtype"]),
                stored_shape=_as_tuple(leaf["stored_shape"], "shape"),
                sha256=str(leaf["sha256"]),
                key_impl=leaf.get("key_impl"),
            )
            for leaf in item["leaves"]
        )
        entries.append(_Entry(str(item["key"]), item["tree"], item["treedef"], leaves))
    return entries


class _VersionError(Exception):
    def __init__(self, version: Any) -> None:
        self.version = version


# What a damaged archive can raise while it is parsed; the load wraps them all.
_DAMAGE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    KeyError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    OverflowError,
    NotImplementedError,
    RuntimeError,  # zipfile: "File is encrypted", "compression method" ...
    OSError,
)


class _Archive:
    """An open state file: its manifest, and checked reads of its arrays."""

    def __init__(self, file: BinaryIO, path: str, where: str) -> None:
        self.path = path
        self.where = where
        with self.damage():
            self.zip = zipfile.ZipFile(file)
            self.entries = _parse_manifest(self.zip.read(MANIFEST))

    @contextlib.contextmanager
    def damage(self, member: str | None = None) -> Iterator[None]:
        try:
            yield
        except _VersionError as err:
            raise StateFileError(
                f"`{self.where}`: {self.path!r} has file format version "
                f"{err.version!r}, and this lift reads version {VERSION}. Load it "
                "with the lift version that wrote it (or a newer one)."
            ) from None
        except _DAMAGE as err:
            if isinstance(err, (FileNotFoundError, PermissionError)):
                raise
            inside = f" (in {member!r})" if member else ""
            raise StateFileError(
                f"`{self.where}`: {self.path!r} is not a readable lift state file"
                f"{inside}: {type(err).__name__}: {err}. It is truncated, damaged or "
                "was not written by `save_state`; load an intact copy."
            ) from err

    def read(self, leaf: _Leaf) -> np.ndarray:
        """The stored array of ``leaf``, its header and checksum verified."""
        with self.damage(leaf.member):
            info = self.zip.getinfo(leaf.member)
            stored = np.dtype(leaf.stored_dtype)
            nbytes = math.prod(leaf.stored_shape) * stored.itemsize
            if nbytes > info.file_size:
                raise ValueError("the member is shorter than its array")
            with self.zip.open(info) as raw:
                reader = _HashingReader(raw)  # type: ignore[arg-type]
                version = npy.read_magic(reader)  # type: ignore[arg-type]
                if version == (1, 0):
                    header = npy.read_array_header_1_0(reader)  # type: ignore[arg-type]
                elif version == (2, 0):
                    header = npy.read_array_header_2_0(reader)  # type: ignore[arg-type]
                else:
                    raise ValueError(f"unexpected .npy version {version}")
                shape, fortran, dtype = header
                if (shape, fortran, dtype) != (leaf.stored_shape, False, stored):
                    raise ValueError(
                        f"the array header ({dtype}{list(shape)}) does not match the "
                        f"manifest ({stored}{list(leaf.stored_shape)})"
                    )
                array = np.empty(shape, dtype)
                if nbytes:
                    reader.readinto(array.reshape(-1).view(np.uint8).data)
                if reader.read(1):
                    raise ValueError("the member has bytes after its array")
            if reader.hash.hexdigest() != leaf.sha256:
                raise ValueError(
                    f"the SHA-256 checksum of the array at {leaf.member!r} does not "
                    "match the manifest"
                )
        return array


def _problem_text(where: str, problems: list[tuple[str, str]], hint: str) -> str:
    lines = "\n".join(f"  - {path!r}: {what}" for path, what in problems)
    return (
        f"`{where}`: the data does not match `like` ({len(problems)} problem"
        f"{'s' if len(problems) != 1 else ''}):\n{lines}\n{hint}"
    )


_HINT = (
    "Pass as `like` the state the file was saved from (e.g. `export_state` of the "
    "same model), or restore only the matching part with `filters=`."
)


def _compare(
    key: str,
    paths: Sequence[str],
    avals: Sequence[tuple[tuple[int, ...], str]],
    like_value: Any,
    problems: list[tuple[str, str]],
) -> None:
    """Append every difference between stored leaves and ``like_value``."""
    like_paths, like_leaves, like_def = _leaf_paths(like_value)
    if list(paths) != like_paths:
        problems.append(
            (
                key,
                f"structure differs: stored leaves at {list(paths)}, `like` has "
                f"{like_paths} ({like_def})",
            )
        )
        return
    for path, (shape, dtype), like_leaf in zip(paths, avals, like_leaves, strict=True):
        expected = _aval(like_leaf)
        if expected is None:
            problems.append(
                (key + path, f"`like` holds a {type(like_leaf).__name__}, not an array")
            )
            continue
        if shape != expected[0]:
            problems.append(
                (key + path, f"shape {shape} stored, `like` has {expected[0]}")
            )
        if dtype != expected[1]:
            problems.append(
                (key + path, f"dtype {dtype} stored, `like` has {expected[1]}")
            )


def _like_state(like: Any, where: str) -> dict[StateKey, Any]:
    if not isinstance(like, Mapping):
        raise LiftTypeError(
            f"`{where}(like=...)` takes a state dict, got a {type(like).__name__}. "
            "Pass the state `export_state` returns for the model."
        )
    return {StateKey(k): v for k, v in like.items()}


def _filter_list(filters: Filters) -> list[Callable[[StateKey, Any], bool]]:
    items = list(filters) if isinstance(filters, (list, tuple)) else [filters]
    return [as_predicate(f) for f in items]


def _x64_missing(dtype: str) -> bool:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        return False
    return dt.itemsize == 8 * (2 if dt.kind == "c" else 1) and (
        jax.dtypes.canonicalize_dtype(dt) != dt
    )


def _sharding_of(like_leaf: Any, path: str, where: str) -> Any:
    """The sharding to place a leaf with: ``like_leaf``'s, made concrete if abstract."""
    sharding = getattr(like_leaf, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is not None and isinstance(mesh, jax.sharding.AbstractMesh):
        # `jax.eval_shape` gives shardings over an abstract mesh; the mesh set with
        # `jax.set_mesh` supplies the devices.
        current = jax.sharding.get_mesh()
        if getattr(current, "abstract_mesh", None) != mesh:
            raise LiftValueError(
                f"`{where}`: `like` gives {path!r} a sharding over an abstract mesh "
                f"({mesh}), which names no devices. Call it under `with "
                "jax.set_mesh(mesh):` for the matching mesh, or pass concrete "
                "shardings (`jax.ShapeDtypeStruct(shape, dtype, "
                "sharding=NamedSharding(mesh, spec))`)."
            )
        sharding = jax.sharding.NamedSharding(current, sharding.spec)
    return sharding


def _to_device(host: np.ndarray, leaf: _Leaf, like_leaf: Any, path: str) -> jax.Array:
    if leaf.key_impl is not None:
        value = jax.random.wrap_key_data(jnp.asarray(host), impl=leaf.key_impl)
    else:
        if host.dtype.str != leaf.stored_dtype or host.dtype.name != leaf.dtype:
            host = host.view(jnp.dtype(leaf.dtype))
        value = None
    sharding = _sharding_of(like_leaf, path, "load_state")
    if sharding is not None:
        return jax.device_put(host if value is None else value, sharding)
    return jax.device_put(host) if value is None else value


def load_state(
    path: PathLike,
    *,
    like: Mapping[StateKey, Any] | None = None,
    filters: Filters = None,
) -> State:
    """Read a state written by :func:`save_state`.

    Every array is checked against its SHA-256 checksum, so a damaged file raises
    instead of returning wrong values.

    Without ``like``, an array value loads as a :class:`jax.Array`, and a value that
    was a dict, list or tuple (or ``None``) loads as the same containers. A value with
    any other node (a namedtuple, dataclass or module) needs ``like``, which supplies
    the pytree structure. With ``like``, every difference (missing and unexpected
    keys, structures, shapes, dtypes) is reported at once, and each array is placed
    with the sharding of its counterpart in ``like`` when it has one.

    Args:
        path: the file (a ``str`` or :class:`os.PathLike`).
        like: a state with the expected keys, structures, shapes and dtypes: arrays,
            :class:`jax.ShapeDtypeStruct` (as :func:`jax.eval_shape` gives), or
            anything with ``.shape`` and ``.dtype``.
        filters: restore only the part that matches: one filter or a list of them,
            as in :func:`lift.filter_state` (glob patterns, ``StateKey``s, types,
            predicates ``(key, value) -> bool``). With ``like``, only the matching
            part of ``like`` is checked.

    Returns:
        A state dict of :class:`jax.Array` values, in ``like``'s key order if given,
        otherwise in the file's.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        StateFileError: (a ``LiftValueError``) the file is truncated, damaged, not a
            state file, or of another format version.
        StateMismatchError: (a ``LiftValueError``) the data does not match ``like``;
            ``.problems`` lists every difference.
        LiftValueError: the file holds 64-bit arrays and 64-bit JAX is off, or a value
            needs ``like`` to be rebuilt.

    Examples:
        >>> import os, tempfile
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> from lift.io import load_state, save_state
        >>> _, state = export_state({"bn": {"mean": StateEntry(jnp.zeros(2)),
        ...                                 "var": StateEntry(jnp.ones(2))},
        ...                          "step": StateEntry(jnp.int32(7))})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "state.lift")
        ...     save_state(path, state)
        ...     full = load_state(path, like=state)
        ...     part = load_state(path, filters="bn.*")
        >>> int(full["['step']"]), sorted(part)
        (7, [StateKey("['bn']['mean']"), StateKey("['bn']['var']")])
    """
    where = "load_state"
    path = os.fspath(path)
    like_state = None if like is None else _like_state(like, where)
    preds = None if filters is None else _filter_list(filters)
    try:
        file = open(path, "rb")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            err.errno,
            f"`load_state`: no file at {path!r}; `save_state(path, state)` writes "
            "exactly the path it is given (it adds no extension)",
            path,
        ) from None
    with file:
        archive = _Archive(file, path, where)
        entries = {StateKey(e.key): e for e in archive.entries}
        hosts: dict[str, np.ndarray] = {}

        def host(leaf: _Leaf) -> np.ndarray:
            if leaf.member not in hosts:
                hosts[leaf.member] = archive.read(leaf)
            return hosts[leaf.member]

        # Keys to restore, and the part of `like` to check them against.
        by_key = preds is None or all(isinstance(f, str) for f in _raw(filters))
        if preds is None:
            chosen = list(entries)
        elif by_key:
            chosen = [k for k in entries if any(p(k, None) for p in preds)]
        else:
            # Type and value predicates see each value (rebuilt like `like` where it
            # can be), so every array is read.
            _x64_check(where, entries, list(entries))
            chosen = []
            for key, entry in entries.items():
                value = _build(entry, host, None, like_state, placed=False)
                if value is not _UNBUILT and any(p(key, value) for p in preds):
                    chosen.append(key)
        like_part = None
        if like_state is not None:
            if preds is None:
                like_part = like_state
            else:
                like_part = {
                    k: v for k, v in like_state.items() if any(p(k, v) for p in preds)
                }
        _check(where, entries, chosen, like_part)
        order = chosen if like_part is None else list(like_part)
        return {
            key: _build(entries[key], host, key, like_part, placed=True)
            for key in order
        }


def _raw(filters: Filters) -> list[Any]:
    return list(filters) if isinstance(filters, (list, tuple)) else [filters]


_UNBUILT = object()


def _build(
    entry: _Entry,
    host: Callable[[_Leaf], np.ndarray],
    key: StateKey | None,
    like: Mapping[StateKey, Any] | None,
    *,
    placed: bool,
) -> Any:
    """The value of ``entry`` as JAX arrays, with ``like``'s structure if it has one."""
    like_value = None if like is None else like.get(StateKey(entry.key), None)
    has_like = like is not None and StateKey(entry.key) in like
    like_leaves: list[Any] = [None] * len(entry.leaves)
    like_def = None
    if has_like:
        paths, leaves_, like_def = _leaf_paths(like_value)
        if paths != [leaf.path for leaf in entry.leaves]:
            like_def = None  # mismatched: `_check` reports it when it matters
        elif placed:
            like_leaves = leaves_
    arrays = [
        _to_device(host(leaf), leaf, like_leaf, entry.key + leaf.path)
        for leaf, like_leaf in zip(entry.leaves, like_leaves, strict=True)
    ]
    if like_def is not None:
        return jax.tree_util.tree_unflatten(like_def, arrays)
    try:
        leaves = iter(arrays)
        value = _decode(entry.tree, leaves)
        if next(leaves, _UNBUILT) is not _UNBUILT:
            raise ValueError("more leaves than the structure has")
    except _NeedsLike as err:
        if not placed:
            return _UNBUILT
        raise LiftValueError(
            f"`load_state`: the value of {entry.key!r} is a {err.node} (structure "
            f"{entry.treedef}), which cannot be rebuilt without its class. Pass "
            "`like=` (e.g. the state `export_state` returns for the model) to give the "
            "structure, or read the raw arrays with `numpy.load(path)`."
        ) from None
    except (ValueError, TypeError, StopIteration) as err:
        raise StateFileError(
            f"`load_state`: the structure of {entry.key!r} in the manifest is damaged "
            f"({err}); load an intact copy."
        ) from err
    return value


def _check(
    where: str,
    entries: Mapping[StateKey, _Entry],
    chosen: Sequence[StateKey],
    like: Mapping[StateKey, Any] | None,
) -> None:
    problems: list[tuple[str, str]] = []
    if like is not None:
        chosen_set = set(chosen)
        for key in like:
            if key not in entries:
                problems.append((str(key), "in `like` but not in the file"))
            elif key not in chosen_set:
                problems.append((str(key), "in `like` but not selected by `filters`"))
        for key in chosen:
            if key not in like:
                problems.append((str(key), "in the file but not in `like`"))
                continue
            entry = entries[key]
            _compare(
                entry.key,
                [leaf.path for leaf in entry.leaves],
                [(leaf.shape, leaf.dtype) for leaf in entry.leaves],
                like[key],
                problems,
            )
    if problems:
        problems.sort()
        raise StateMismatchError(_problem_text(where, problems, _HINT), problems)
    _x64_check(where, entries, chosen)


def _x64_check(
    where: str, entries: Mapping[StateKey, _Entry], chosen: Sequence[StateKey]
) -> None:
    wide = sorted(
        {
            entries[k].key + leaf.path
            for k in chosen
            for leaf in entries[k].leaves
            if _x64_missing(leaf.dtype)
        }
    )
    if wide:
        raise LiftValueError(
            f"`{where}`: the file holds 64-bit arrays at {wide}, and 64-bit JAX is "
            "off, so they would be truncated. Enable it first: "
            "`jax.config.update('jax_enable_x64', True)` or `with "
            "jax.enable_x64(True):`."
        )


# --------------------------------------------------------------------- pure dicts


def to_pure_dict(state: Mapping[StateKey, Any]) -> dict[str, Any]:
    """A flat ``{path: array}`` dict of ``state``, for Orbax, safetensors, ``np.savez``.

    Each array leaf gets the key path of its state key followed by its own path
    inside the value (an array value keeps just the key's path), the names the
    state file uses for its arrays. Typed PRNG key arrays become their
    :func:`jax.random.key_data`; :func:`from_pure_dict` wraps them again.

    Args:
        state: a state dict.

    Returns:
        A new ``dict`` from path strings to arrays (not copied).

    Raises:
        LiftValueError: two leaves would get the same path.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> from lift.io import to_pure_dict
        >>> _, state = export_state({"bn": StateEntry({"mean": jnp.zeros(2)}),
        ...                          "n": StateEntry(jnp.int32(3))})
        >>> to_pure_dict(state)  # doctest: +NORMALIZE_WHITESPACE
        {"['bn']['mean']": Array([0., 0.], dtype=float32),
         "['n']": Array(3, dtype=int32)}
    """
    _check_state(state, "to_pure_dict")
    out: dict[str, Any] = {}
    for key, value in state.items():
        paths, leaves, _ = _leaf_paths(value)
        for path, leaf in zip(paths, leaves, strict=True):
            name = str(key) + path
            if name in out:
                raise LiftValueError(
                    f"`to_pure_dict`: two leaves would both be named {name!r} (a key "
                    "path equals another key's path plus a leaf path). Export with "
                    "distinct `prefix=` values or rename one of the entries."
                )
            if isinstance(leaf, jax.Array) and _is_key_dtype(leaf.dtype):
                leaf = jax.random.key_data(leaf)
            out[name] = leaf
    return out


def from_pure_dict(d: Mapping[str, Any], *, like: Mapping[StateKey, Any]) -> State:
    """The state that :func:`to_pure_dict` flattened to ``d``, rebuilt like ``like``.

    ``like`` gives the keys, structures, shapes and dtypes (and shardings, which the
    arrays are placed with); every difference is reported at once, as in
    :func:`load_state`. Values may be JAX or numpy arrays (what Orbax, safetensors or
    ``np.load`` give back); the result holds :class:`jax.Array` values.

    Args:
        d: a flat dict from path strings to arrays.
        like: a state with the expected keys, structures, shapes and dtypes.

    Returns:
        A state dict in ``like``'s key order.

    Raises:
        StateMismatchError: (a ``LiftValueError``) ``d`` does not match ``like``;
            ``.problems`` lists every difference.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> from lift.io import from_pure_dict, to_pure_dict
        >>> _, state = export_state({"rng": StateEntry(jax.random.key(1)),
        ...                          "n": StateEntry(jnp.int32(3))})
        >>> pure = {k: jax.device_get(v) for k, v in to_pure_dict(state).items()}
        >>> again = from_pure_dict(pure, like=state)
        >>> again["['rng']"].dtype, int(again["['n']"])
        (key<fry>, 3)
    """
    where = "from_pure_dict"
    like_state = _like_state(like, where)
    if not isinstance(d, Mapping):
        raise LiftTypeError(
            f"`from_pure_dict` takes a dict from path strings to arrays, got a "
            f"{type(d).__name__}."
        )
    problems: list[tuple[str, str]] = []
    used: set[str] = set()
    plans = []
    for key, like_value in like_state.items():
        paths, like_leaves, like_def = _leaf_paths(like_value)
        names = [str(key) + p for p in paths]
        plans.append((key, names, like_leaves, like_def))
        for name, like_leaf in zip(names, like_leaves, strict=True):
            if name in used:
                raise LiftValueError(
                    f"`from_pure_dict`: two leaves of `like` are both named {name!r}."
                )
            used.add(name)
            if name not in d:
                problems.append((name, "in `like` but not in the dict"))
                continue
            _compare_pure(name, d[name], like_leaf, problems)
    for name in d:
        if name not in used:
            problems.append((str(name), "in the dict but not in `like`"))
    if problems:
        problems.sort()
        hint = (
            "Pass the `like` state whose `to_pure_dict` was saved, or filter it with "
            "`filter_state` to the part the dict holds."
        )
        raise StateMismatchError(_problem_text(where, problems, hint), problems)
    out: State = {}
    for key, names, like_leaves, like_def in plans:
        arrays = [
            _place_pure(n, d[n], leaf)
            for n, leaf in zip(names, like_leaves, strict=True)
        ]
        out[key] = jax.tree_util.tree_unflatten(like_def, arrays)
    return out


def _compare_pure(
    name: str, value: Any, like_leaf: Any, problems: list[tuple[str, str]]
) -> None:
    expected = _aval(like_leaf)
    got = _aval(value)
    if expected is None or got is None:
        bad = "`like`" if expected is None else "the dict"
        thing = like_leaf if expected is None else value
        problems.append((name, f"{bad} holds a {type(thing).__name__}, not an array"))
        return
    if _is_key_dtype(getattr(like_leaf, "dtype", None)) and not _is_key_dtype(
        getattr(value, "dtype", None)
    ):
        # Key data: the key's shape plus one trailing axis of uint32.
        width = like_leaf.dtype.itemsize // 4  # uint32 words per key
        expected = (*expected[0], width), "uint32"
    if got[0] != expected[0]:
        problems.append((name, f"shape {got[0]} in the dict, `like` has {expected[0]}"))
    if got[1] != expected[1]:
        problems.append((name, f"dtype {got[1]} in the dict, `like` has {expected[1]}"))


def _impl_of(like_leaf: Any) -> str:
    if isinstance(like_leaf, jax.Array):
        return str(jax.random.key_impl(like_leaf))
    # A ShapeDtypeStruct of keys: JAX has no public accessor for its dtype's impl.
    return str(like_leaf.dtype._impl.name)


def _place_pure(name: str, value: Any, like_leaf: Any) -> jax.Array:
    if _is_key_dtype(getattr(like_leaf, "dtype", None)) and not _is_key_dtype(
        getattr(value, "dtype", None)
    ):
        value = jax.random.wrap_key_data(value, impl=_impl_of(like_leaf))
    sharding = _sharding_of(like_leaf, name, "from_pure_dict")
    if sharding is not None:
        return jax.device_put(value, sharding)
    return value if isinstance(value, jax.Array) else jax.device_put(value)


def _file_rows(path: PathLike) -> list[SummaryRow]:
    """The rows of :func:`summary` for a state file, from its manifest alone."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        archive = _Archive(file, path, "summary")
    rows = []
    # Sorted by key, as `summary` sorts a state.
    for entry in sorted(archive.entries, key=lambda e: e.key):
        for leaf in entry.leaves:
            nbytes = math.prod(leaf.stored_shape) * np.dtype(leaf.stored_dtype).itemsize
            rows.append(
                SummaryRow(entry.key + leaf.path, leaf.shape, leaf.dtype, nbytes, "")
            )
    return rows
