"""The state file format: its records, dtype rules, member names and manifest checks.

This module knows what a valid file *says* (:func:`parse_manifest` accepts a manifest
only if every entry is consistent with itself and with the others); reading and
writing the ZIP archive is :mod:`lift._archive`. Nothing here trusts the file: every
field is type-checked, every dtype and key implementation must be one lift writes,
and each leaf's stored dtype and shape must be the ones its dtype and shape imply,
so that the array that loads is exactly the one the manifest describes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import LiftValueError, StateFileError, unflattenable

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "Damaged",
    "Entry",
    "Leaf",
    "NeedsLike",
    "StateFileError",
    "VersionError",
    "consumed",
    "decode_tree",
    "encode_tree",
    "is_key_dtype",
    "key_layout",
    "leaf_paths",
    "member_names",
    "parse_manifest",
    "stored_dtype",
]

#: The ``"format"`` field of every manifest.
FORMAT = "lift.state"
#: The version of the file format this module writes and reads.
VERSION = 1
#: The name of the manifest inside the archive.
MANIFEST = "manifest.json"

# Dtypes numpy stores natively in `.npy`, and the ml_dtypes JAX supports, which are
# stored as the unsigned integers of their width. No other dtype is written or read.
_NATIVE = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
    "float16 float32 float64 complex64 complex128".split()
)
_AS_BITS = frozenset(
    name
    for name in (
        "bfloat16 float4_e2m1fn float6_e2m3fn float6_e3m2fn float8_e3m4 float8_e4m3 "
        "float8_e4m3b11fnuz float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz "
        "float8_e8m0fnu int1 int2 int4 uint1 uint2 uint4"
    ).split()
    if hasattr(jnp, name)
)
_MAX_NDIM = 64  # numpy's limit: a larger declared rank cannot be a real array
_MAX_DEPTH = 256  # nesting of a value's structure in the manifest
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FALLBACK = re.compile(r"leaf[0-9]+\.npy")
_MAX_MEMBER_BYTES = 4096  # zip names hold 65,535 bytes; long paths get numbered names


class Damaged(Exception):
    """A file contradicts the format; the archive turns it into a StateFileError."""

    def __init__(self, detail: str, key: str | None = None) -> None:
        super().__init__(detail)
        self.key = key


class VersionError(Exception):
    """The manifest is of another format version."""

    def __init__(self, version: Any) -> None:
        super().__init__(version)
        self.version = version


@dataclass(frozen=True)
class Leaf:
    """One array of an entry, as the manifest records it."""

    path: str  # key path of the leaf inside the entry's value
    member: str  # zip member name
    dtype: str  # JAX dtype name of the array (``key<fry>`` for keys)
    shape: tuple[int, ...]
    stored_dtype: str  # numpy dtype str of the .npy data
    stored_shape: tuple[int, ...]
    sha256: str
    key_impl: str | None = None

    @property
    def nbytes(self) -> int:
        """The size of the stored array data (the member without its header)."""
        return math.prod(self.stored_shape) * np.dtype(self.stored_dtype).itemsize


@dataclass(frozen=True)
class Entry:
    """One state key of the manifest: its value's structure and leaves."""

    key: str
    tree: Any  # JSON structure, see docs/saving.md
    treedef: str
    leaves: tuple[Leaf, ...]


def consumed(where: str) -> LiftValueError:
    """The error for saving an array a donating lifted ``jit`` deleted."""
    return LiftValueError(
        f"`save_state`: the array at {where!r} was consumed (deleted) by a donating "
        "lifted `jit`. Save the state that donating step returned, not the one you "
        "passed to it (or copy it first: `jax.tree.map(jnp.copy, state)`)."
    )


def is_key_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` is a typed PRNG key dtype."""
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def stored_dtype(name: str) -> np.dtype | None:
    """The numpy dtype an array of JAX dtype ``name`` is stored as, None if none is."""
    if name in _NATIVE:
        return np.dtype(name).newbyteorder("<")
    if name in _AS_BITS:
        return np.dtype(f"uint{8 * jnp.dtype(name).itemsize}")
    return None


@functools.cache
def _known_key_layout(impl: str) -> tuple[str, tuple[int, ...]]:
    keys = jax.eval_shape(lambda: jax.random.key(0, impl=impl))
    data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
    return str(keys.dtype), tuple(data.shape)


def key_layout(impl: str) -> tuple[str, tuple[int, ...]] | None:
    """``(dtype name, key data shape)`` of a PRNG implementation, None if unknown."""
    try:
        return _known_key_layout(impl)
    except ValueError:  # JAX's "unrecognized PRNG implementation"
        return None


def leaf_paths(
    value: Any, key: Any = None, where: str = "`save_state`"
) -> tuple[list[str], list[Any], Any]:
    """The key paths (as strings) and leaves of ``value``, and its treedef.

    A value JAX cannot flatten is a :class:`LiftValueError` naming ``key``.
    """
    try:
        with_path, treedef = jax.tree_util.tree_flatten_with_path(value)
    except (TypeError, ValueError) as err:  # JAX's "Comparator raised exception"
        raise unflattenable(where, key, err) from err
    paths = [jax.tree_util.keystr(p) for p, _ in with_path]
    return paths, [leaf for _, leaf in with_path], treedef


# --------------------------------------------------------------- value structure


def encode_tree(node: Any, key: str, depth: int = 0) -> Any:
    """The JSON structure of the value of ``key`` (see docs/saving.md)."""
    if depth > _MAX_DEPTH:
        raise LiftValueError(
            f"`save_state`: the value of {key!r} is nested over {_MAX_DEPTH} levels "
            "deep, more than a state file holds. Keep state values shallow (a deep "
            "structure belongs in the model tree, with an entry per array)."
        )
    if node is None:
        return None
    kind = type(node)
    if kind is dict:
        keys = list(node)
        if all(type(k) is str for k in keys) or all(type(k) is int for k in keys):
            return {
                "dict": [
                    [k, encode_tree(node[k], key, depth + 1)] for k in sorted(keys)
                ]
            }
    elif kind is list or kind is tuple:
        return {kind.__name__: [encode_tree(c, key, depth + 1) for c in node]}
    elif jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
        return "*"
    return {"node": f"{kind.__module__}.{kind.__qualname__}"}


class NeedsLike(Exception):
    """A value holds a pytree node the manifest cannot rebuild (its class)."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


def decode_tree(spec: Any, leaves: Iterator[Any]) -> Any:
    """The value of a structure checked by :func:`parse_manifest`, from its leaves."""
    if spec is None:
        return None
    if spec == "*":
        return next(leaves)
    ((kind, body),) = spec.items()
    if kind == "dict":
        return {k: decode_tree(s, leaves) for k, s in body}
    if kind == "node":
        raise NeedsLike(body)
    children = [decode_tree(s, leaves) for s in body]
    return children if kind == "list" else tuple(children)


def _count_leaves(spec: Any, key: str, depth: int = 0) -> int | None:
    """The number of leaves of a structure, None if it has a custom node."""
    if depth > _MAX_DEPTH:
        raise Damaged(f"its structure is nested over {_MAX_DEPTH} levels deep", key)
    if spec is None:
        return 0
    if spec == "*":
        return 1
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, body),) = spec.items()
        if kind == "node" and isinstance(body, str):
            return None
        if kind in ("list", "tuple") and isinstance(body, list):
            children = body
        elif kind == "dict" and isinstance(body, list) and _dict_items(body):
            children = [s for _, s in body]
        else:
            children = None
        if children is not None:
            counts = [_count_leaves(s, key, depth + 1) for s in children]
            return None if None in counts else sum(c for c in counts if c is not None)
    raise Damaged(f"its structure has an unknown part {_short(spec)}", key)


def _dict_items(body: list[Any]) -> bool:
    if not all(isinstance(item, list) and len(item) == 2 for item in body):
        return False
    keys = [k for k, _ in body]
    kinds = {type(k) for k in keys}
    return kinds <= {str} or kinds <= {int}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ member names


def member_names(names: list[str]) -> list[str]:
    """Zip member names for leaves whose full paths are ``names``, all distinct.

    A leaf keeps its path (plus ``.npy``) as its name when that name is safe and
    not taken; otherwise it is ``leaf<i>.npy`` for its index ``i``. Kept names never
    have that form, so the two kinds cannot collide, and no name is ever retried.
    """
    used: set[str] = set()
    out = []
    for index, name in enumerate(names):
        member = name + ".npy"
        if not _safe(member) or _FALLBACK.fullmatch(member) or member in used:
            member = f"leaf{index}.npy"
        used.add(member)
        out.append(member)
    return out


def _safe(member: str) -> bool:
    if any(c in member for c in "/\\\x00"):
        return False
    try:
        return len(member.encode("utf-8")) <= _MAX_MEMBER_BYTES
    except UnicodeEncodeError:  # a lone surrogate
        return False


# ---------------------------------------------------------------------- manifest


def parse_manifest(raw: bytes) -> list[Entry]:
    """The entries of a manifest, each field checked; :class:`Damaged` otherwise."""
    try:
        manifest = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_names)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise Damaged(f"the manifest is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Damaged(f"the manifest does not declare format {FORMAT!r}")
    version = manifest.get("version")
    if type(version) is not int or version != VERSION:
        raise VersionError(version)
    items = manifest.get("entries")
    if not isinstance(items, list):
        raise Damaged("the manifest has no list of entries")
    entries: list[Entry] = []
    keys: set[str] = set()
    members: set[str] = set()
    for item in items:
        entry = _entry(item)
        if entry.key in keys:
            raise Damaged("the manifest lists this key twice", entry.key)
        keys.add(entry.key)
        for leaf in entry.leaves:
            if leaf.member in members or leaf.member == MANIFEST:
                raise Damaged(f"member {leaf.member!r} is used twice", entry.key)
            members.add(leaf.member)
        entries.append(entry)
    return entries


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's fields as a dict, refusing a name given twice."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise Damaged(f"the manifest names the field {name!r} twice")
        out[name] = value
    return out


def _field(record: Any, name: str, kind: type, key: str | None) -> Any:
    if not isinstance(record, dict) or name not in record:
        raise Damaged(f"a manifest record has no {name!r}", key)
    value = record[name]
    if type(value) is not kind:
        raise Damaged(f"{name!r} is a {type(value).__name__}, not {kind.__name__}", key)
    return value


def _entry(item: Any) -> Entry:
    key = _field(item, "key", str, None)
    if "tree" not in item:
        raise Damaged("the entry has no 'tree'", key)
    tree = item["tree"]
    treedef = _field(item, "treedef", str, key)
    records = _field(item, "leaves", list, key)
    leaves = tuple(_leaf(record, key) for record in records)
    count = _count_leaves(tree, key)
    if count is not None:  # no custom node: the structure gives the leaves' paths
        paths = leaf_paths(decode_tree(tree, iter(range(count))))[0]
        if paths != [leaf.path for leaf in leaves]:
            raise Damaged(
                f"its structure has leaves at {_short(paths)}, the manifest lists "
                f"{_short([leaf.path for leaf in leaves])}",
                key,
            )
    return Entry(key, tree, treedef, leaves)


def _shape(record: Any, name: str, key: str) -> tuple[int, ...]:
    value = _field(record, name, list, key)
    if len(value) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in value):
        raise Damaged(f"{name!r} is not a shape: {_short(value)}", key)
    return tuple(value)


def _leaf(record: Any, key: str) -> Leaf:
    leaf = Leaf(
        path=_field(record, "path", str, key),
        member=_field(record, "member", str, key),
        dtype=_field(record, "dtype", str, key),
        shape=_shape(record, "shape", key),
        stored_dtype=_field(record, "stored_dtype", str, key),
        stored_shape=_shape(record, "stored_shape", key),
        sha256=_field(record, "sha256", str, key),
        key_impl=_field(record, "key_impl", str, key) if "key_impl" in record else None,
    )
    where = key + leaf.path
    if not _SHA256.fullmatch(leaf.sha256):
        raise Damaged(f"its checksum {_short(leaf.sha256)} is not a SHA-256", where)
    if leaf.key_impl is not None:
        layout = key_layout(leaf.key_impl)
        if layout is None:
            raise Damaged(f"unknown PRNG key implementation {leaf.key_impl!r}", where)
        dtype, extra = layout
        stored, stored_shape = np.dtype("<u4"), leaf.shape + extra
    else:
        dtype, stored, stored_shape = leaf.dtype, stored_dtype(leaf.dtype), leaf.shape
        if stored is None:
            raise Damaged(f"unknown dtype {_short(leaf.dtype)}", where)
    if (leaf.dtype, leaf.stored_dtype, leaf.stored_shape) != (
        dtype,
        stored.str,
        stored_shape,
    ):
        raise Damaged(
            f"the manifest says {leaf.dtype}{list(leaf.shape)} stored as "
            f"{leaf.stored_dtype}{list(leaf.stored_shape)}, but that array is stored "
            f"as {stored.str}{list(stored_shape)}",
            where,
        )
    if len(leaf.stored_shape) > _MAX_NDIM:
        raise Damaged(f"the stored array has over {_MAX_NDIM} dimensions", where)
    return leaf
