"""The ZIP archive of a state file: checked writing, atomic replacement, bounded reads.

Writing checks every leaf before the first byte goes to disk, writes entries and
members in key order (so equal states give identical bytes) and replaces the target
atomically. Reading trusts nothing: the manifest is checked by
:func:`lift._format.parse_manifest`, every member must be stored uncompressed and lie
inside the file, its ``.npy`` header must match the manifest, its size must be exactly
header plus data, and its SHA-256 must match; an array is allocated only once its
size is known to fit in the bytes the file really holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from numpy.lib import format as npy

from ._errors import LiftTypeError, LiftValueError
from ._format import (
    FORMAT,
    MANIFEST,
    VERSION,
    Damaged,
    Entry,
    Leaf,
    StateFileError,
    VersionError,
    consumed,
    encode_tree,
    is_key_dtype,
    leaf_paths,
    member_names,
    parse_manifest,
    stored_dtype,
)
from ._memo import Memo

__all__ = ["Archive", "plan_state", "read_manifest", "write_archive", "write_file"]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so equal states give equal files
_CHUNK = 1 << 24
_SCALARS = (bool, int, float, complex)
# What the zip, JSON and .npy readers raise on bytes that are not what they expect.
_READ_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    struct.error,
    UnicodeDecodeError,
    NotImplementedError,  # zipfile: a feature (version, patch data) it lacks
)
_HEADER_ERRORS = (ValueError, TypeError, SyntaxError)  # numpy's .npy header parser

# ------------------------------------------------------------------------- write


@dataclass(frozen=True)
class _Planned:
    key: str
    tree: Any  # the JSON structure of the value
    treedef: Any
    paths: list[str]
    leaves: list[Any]


def plan_state(state: Mapping[Any, Any]) -> list[_Planned]:
    """The entries of ``state`` in key order, every leaf checked before any write."""
    plan = []
    for key in sorted(state, key=str):
        paths, leaves, treedef = leaf_paths(state[key], key)
        leaves = [_checked(str(key) + p, x) for p, x in zip(paths, leaves, strict=True)]
        tree = encode_tree(state[key], str(key))
        plan.append(_Planned(str(key), tree, treedef, paths, leaves))
    return plan


def _checked(where: str, leaf: Any) -> Any:
    """``leaf`` if it can be stored (a Python number becomes an array), else raise."""
    if isinstance(leaf, Tracer):
        raise LiftTypeError(
            f"`save_state`: the value at {where!r} is a tracer ({leaf.aval}); state "
            "can only be saved outside `jit`/`vmap`/`grad`. Return the state from the "
            "traced function and save it afterwards."
        )
    if type(leaf) in _SCALARS:
        try:
            return np.asarray(jnp.asarray(leaf))
        except OverflowError:
            raise LiftValueError(
                f"`save_state`: the Python int at {where!r} ({leaf}) does not fit "
                "JAX's default integer dtype. Store it as an array of a wide enough "
                "dtype (`np.int64(...)` with 64-bit JAX on) or as a float."
            ) from None
    if isinstance(leaf, jax.Array):
        if leaf.is_deleted():
            raise consumed(where)
        if not leaf.is_fully_addressable:
            raise LiftValueError(
                f"`save_state`: the array at {where!r} spans several processes, and "
                "only this process's part is here. Save multi-host state with Orbax "
                "(`to_pure_dict` turns a state into what it takes)."
            )
    elif not isinstance(leaf, (np.ndarray, np.generic)) and not hasattr(
        leaf, "__array__"
    ):
        raise LiftTypeError(
            f"`save_state`: the value at {where!r} is a {type(leaf).__name__}, not an "
            "array. State files hold arrays only; keep other objects in the model "
            "tree (they are static) or convert them to arrays."
        )
    dtype = getattr(leaf, "dtype", None)
    if isinstance(dtype, np.dtype) and not is_key_dtype(dtype):
        _storage(where, dtype)  # an array-like without a dtype is checked on write
    return leaf


# Per dtype, how it is stored (`dtype.name` alone costs microseconds).
_STORED = Memo("stored dtypes", lambda dtype: stored_dtype(dtype.name), limit=256)


def _storage(where: str, dtype: np.dtype) -> np.dtype:
    stored = _STORED[dtype]
    if stored is None:
        raise LiftTypeError(
            f"`save_state`: the array at {where!r} has dtype {dtype}, which is not "
            "a JAX dtype; it cannot be stored without pickle. Convert it to a "
            "numeric dtype first."
        )
    return stored


def _to_host(where: str, leaf: Any) -> tuple[np.ndarray, str, str | None]:
    """``(host array to store, JAX dtype name, key impl)`` of one checked leaf."""
    if isinstance(leaf, jax.Array) and is_key_dtype(leaf.dtype):
        impl = str(jax.random.key_impl(leaf))
        return np.asarray(jax.random.key_data(leaf)), leaf.dtype.name, impl
    host = np.asarray(leaf)
    stored = _storage(where, host.dtype)
    if host.dtype.byteorder == ">":
        host = host.astype(host.dtype.newbyteorder("<"))
    if not host.flags.c_contiguous:
        host = host.copy(order="C")
    if host.dtype == stored:
        return host, stored.name, None
    # Dtypes numpy has no `.npy` code for are stored as their bits.
    return host.view(stored), host.dtype.name, None


class _HashingWriter:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return self.raw.write(data)


def _info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.external_attr = 0o644 << 16
    return info


def write_archive(file: BinaryIO, plan: list[_Planned]) -> None:
    """Write the planned entries to ``file`` as a state archive."""
    names = [e.key + path for e in plan for path in e.paths]
    members = iter(member_names(names))
    entries = []
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for entry in plan:
            records = []
            for path, leaf in zip(entry.paths, entry.leaves, strict=True):
                host, dtype, impl = _to_host(entry.key + path, leaf)
                member = next(members)
                big = host.nbytes > (1 << 30)
                with archive.open(_info(member), "w", force_zip64=big) as raw:
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
                    "key": entry.key,
                    "tree": entry.tree,
                    "treedef": str(entry.treedef),
                    "leaves": records,
                }
            )
        manifest = {"format": FORMAT, "version": VERSION, "entries": entries}
        archive.writestr(_info(MANIFEST), json.dumps(manifest, indent=1))


def _create(folder: str, base: str, mode: int) -> tuple[int, str]:
    """A new file ``.<base>.<random>.tmp`` in ``folder``, opened for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base[:100]}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags | getattr(os, "O_BINARY", 0), mode), tmp
        except FileExistsError:
            continue
        except OSError as err:
            raise type(err)(
                err.errno,
                f"`save_state` cannot create a file in {folder!r} ({err.strerror}); "
                "choose a folder you can write to",
                folder,
            ) from err
    raise FileExistsError(errno.EEXIST, "no free temporary name", folder)


def write_file(path: str, plan: list[_Planned]) -> None:
    """Write ``plan`` at ``path`` atomically: a temporary file, synced, renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            errno.ENOENT,
            f"`save_state`: the folder {folder!r} does not exist; create it first "
            "(`os.makedirs(folder, exist_ok=True)`)",
            folder,
        )
    try:
        old = os.stat(path).st_mode
        keep = stat.S_IMODE(old) if stat.S_ISREG(old) else None
    except OSError:
        keep = None
    # A new file gets 0o666 less the umask (and a default ACL) from the kernel, as
    # `open()` gives it; no lift code reads or sets the process-wide umask.
    fd, tmp = _create(folder, os.path.basename(path), 0o666 if keep is None else keep)
    try:
        with os.fdopen(fd, "wb") as file:
            if keep is not None:
                os.chmod(tmp, keep)  # the bits the umask took away
            write_archive(file, plan)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not every platform can open a folder.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -------------------------------------------------------------------------- read


class _HashingReader:
    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hash.update(data)
        self.count += len(data)
        return data

    def readinto(self, buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            part = buffer[done : done + _CHUNK]
            n = self.raw.readinto(part)
            if not n:
                raise Damaged("the array data ends early")
            self.hash.update(part[:n])
            done += n


class Archive:
    """An open state file: its checked manifest, and checked reads of its arrays."""

    def __init__(self, file: BinaryIO, path: str, where: str) -> None:
        """Open the archive and check its directory and manifest."""
        self.path = path
        self.where = where
        with self.damage():
            size = os.fstat(file.fileno()).st_size
            self.zip = zipfile.ZipFile(file)
            infos = self.zip.infolist()
            if len({i.filename for i in infos}) != len(infos):
                raise Damaged("two members have the same name")
            for info in infos:
                _check_member(info, size)
            self.entries = parse_manifest(self.zip.read(self._member(MANIFEST, None)))
            for entry in self.entries:
                for leaf in entry.leaves:
                    info = self._member(leaf.member, entry.key + leaf.path)
                    if leaf.nbytes > info.file_size:
                        raise Damaged(
                            f"the manifest declares {leaf.nbytes} bytes of data and "
                            f"member {leaf.member!r} holds {info.file_size}: it is "
                            "shorter than its array",
                            entry.key + leaf.path,
                        )

    def _member(self, name: str, where: str | None) -> zipfile.ZipInfo:
        try:
            return self.zip.getinfo(name)
        except KeyError:
            raise Damaged(f"member {name!r} is missing", where) from None

    @contextlib.contextmanager
    def damage(self) -> Iterator[None]:
        """Turn what a damaged file raises into a :class:`StateFileError`."""
        try:
            yield
        except VersionError as err:
            raise StateFileError(
                f"`{self.where}`: {self.path!r} has file format version "
                f"{err.version!r}, and this lift reads version {VERSION}. Load it "
                "with the lift version that wrote it (or a newer one)."
            ) from None
        except (Damaged, *_READ_ERRORS) as err:
            at = getattr(err, "key", None)
            inside = "" if at is None else f" at {at!r}"
            raise StateFileError(
                f"`{self.where}`: {self.path!r} is not a readable lift state file"
                f"{inside}: {err}. It is truncated, damaged or was not written by "
                "`save_state`; load an intact copy."
            ) from err

    def read(self, entry: Entry, leaf: Leaf) -> np.ndarray:
        """The stored array of ``leaf``, its header, size and checksum verified."""
        where = entry.key + leaf.path
        info = self.zip.getinfo(leaf.member)  # checked when the archive was opened
        with self.damage(), self.zip.open(info) as raw:
            reader = _HashingReader(raw)
            try:
                version = npy.read_magic(reader)  # type: ignore[arg-type]
                read_header = {
                    (1, 0): npy.read_array_header_1_0,
                    (2, 0): npy.read_array_header_2_0,
                }.get(version)
                if read_header is None:
                    raise Damaged(f"unexpected .npy version {version}", where)
                header = read_header(reader)  # type: ignore[arg-type]
            except _HEADER_ERRORS as err:
                raise Damaged(f"the .npy header is damaged ({err})", where) from None
            stored = np.dtype(leaf.stored_dtype)
            if header != (leaf.stored_shape, False, stored):
                shape, _, dtype = header
                raise Damaged(
                    f"the array header ({dtype}{list(shape)}) does not match the "
                    f"manifest ({stored}{list(leaf.stored_shape)})",
                    where,
                )
            if reader.count + leaf.nbytes != info.file_size:
                raise Damaged(
                    f"member {leaf.member!r} holds {info.file_size} bytes, its header "
                    f"and array {reader.count + leaf.nbytes}",
                    where,
                )
            # Bounded: the data fits in the member, and the member in the file.
            array = np.empty(leaf.stored_shape, stored)
            if leaf.nbytes:
                reader.readinto(array.reshape(-1).view(np.uint8).data)
            if raw.read(1):
                raise Damaged("the member has bytes after its array", where)
            if reader.hash.hexdigest() != leaf.sha256:
                raise Damaged(
                    f"the SHA-256 checksum of member {leaf.member!r} does not match "
                    "the manifest",
                    where,
                )
        return array


def _check_member(info: zipfile.ZipInfo, size: int) -> None:
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise Damaged(f"member {info.filename!r} is compressed or encrypted")
    if (
        info.compress_size != info.file_size
        or info.header_offset < 0
        or info.header_offset + info.compress_size > size
    ):
        raise Damaged(
            f"member {info.filename!r} declares {info.file_size} bytes, more than "
            "the file holds"
        )


def read_manifest(path: str, where: str) -> list[Entry]:
    """The checked manifest entries of the state file at ``path``."""
    with open(path, "rb") as file:
        return Archive(file, path, where).entries
