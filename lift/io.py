"""Files and tooling for state: save it, load it, convert it, summarise it.

A state (the dict :func:`~lift.export_state` returns) goes to one file with
:func:`save_state` and comes back with :func:`load_state`. The file is a ZIP archive
of ``.npy`` arrays plus a JSON manifest (``docs/saving.md`` describes the format);
it never uses pickle, records a SHA-256 checksum per array, is written atomically
(a crash mid-save leaves the previous file intact) and in key order (equal states give
identical bytes). Loading checks every array against the manifest and the manifest
against itself, and never allocates more than the file holds.

This module is the public API; the format lives in ``lift._format`` (records and
manifest checks) and ``lift._archive`` (reading and writing the ZIP), the flat-dict
conversion in ``lift._pure``, and ``summary`` in ``lift._summary``.

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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._archive import Archive, plan_state, write_file
from ._errors import LiftValueError
from ._export import State, as_predicate
from ._format import (
    FORMAT,
    MANIFEST,
    VERSION,
    Entry,
    Leaf,
    NeedsLike,
    StateFileError,
    decode_tree,
    leaf_paths,
)
from ._keys import StateKey
from ._like import HINT, StateMismatchError, check_state, compare, like_state, mismatch
from ._like import sharding_of as _sharding_of
from ._pure import from_pure_dict, to_pure_dict
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

PathLike = str | os.PathLike[str]
Filters = Any  # one filter (as in `filter_state`) or a list/tuple of them


def save_state(path: PathLike, state: Mapping[StateKey, Any]) -> None:
    """Write ``state`` to the file ``path``, atomically and without pickle.

    The file is written at exactly ``path`` (no extension is added): first to a
    temporary file in the same folder, which is flushed, synced and then renamed over
    ``path``. If anything fails, the temporary file is removed and a file already at
    ``path`` is left as it was. Every leaf is checked before anything is written.
    Entries are written in key order, so equal states give identical bytes. A new
    file gets the permissions ``open()`` would give it; an existing one keeps its own.

    Args:
        path: where to write (a ``str`` or :class:`os.PathLike`); its folder must
            exist.
        state: a state dict; its values are arrays or pytrees of arrays of any JAX
            dtype, typed PRNG key arrays included.

    Raises:
        LiftTypeError: ``state`` is not a state dict, or holds something that is not
            an array of a JAX dtype (a string, an object array, a tracer: save
            outside of ``jit``), naming its path.
        LiftValueError: a Python int does not fit JAX's integer dtype, or an array
            spans several processes.
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
    check_state(state, "save_state")
    plan = plan_state(state)  # every leaf checked before anything is written
    write_file(os.fspath(path), plan)


def load_state(
    path: PathLike,
    *,
    like: Mapping[StateKey, Any] | None = None,
    filters: Filters = None,
) -> State:
    """Read a state written by :func:`save_state`.

    Nothing in the file is trusted: the manifest is checked against itself, every
    array's ``.npy`` header, size and SHA-256 checksum against the manifest, and no
    array is allocated before its size is known to fit in the file. So a damaged or
    crafted file raises instead of returning other arrays than the ones saved.

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
        otherwise in the file's (key order).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        StateFileError: (a ``LiftValueError``) the file is truncated, damaged, not a
            state file, of another format version, or its manifest disagrees with
            itself or with a stored array; the message names the key.
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
    like_dict = None if like is None else like_state(like, where)
    if filters is not None:  # malformed patterns fail before the file is opened
        for f in _raw(filters):
            as_predicate(f)
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
        archive = Archive(file, path, where)
        entries = {StateKey(e.key): e for e in archive.entries}
        # A printed key form must name a key the file holds.
        preds = (
            None
            if filters is None
            else [as_predicate(f, entries) for f in _raw(filters)]
        )
        hosts: dict[str, np.ndarray] = {}

        def host(entry: Entry, leaf: Leaf) -> np.ndarray:
            if leaf.member not in hosts:
                hosts[leaf.member] = archive.read(entry, leaf)
            return hosts[leaf.member]

        def build(key: StateKey, like_part: Any, placed: bool) -> Any:
            with archive.damage():
                return _build(entries[key], host, like_part, placed=placed)

        # Keys to restore, and the part of `like` to check them against.
        if preds is None:
            chosen = list(entries)
        elif all(isinstance(f, str) for f in _raw(filters)):
            chosen = [k for k in entries if any(p(k, None) for p in preds)]
        else:
            # Type and value predicates see each value (rebuilt like `like` where it
            # can be), so every array is read.
            _x64_check(where, entries, list(entries))
            chosen = []
            for key in entries:
                value = build(key, like_dict, False)
                if value is not _UNBUILT and any(p(key, value) for p in preds):
                    chosen.append(key)
        like_part = None
        if like_dict is not None:
            like_part = like_dict
            if preds is not None:
                like_part = {
                    k: v for k, v in like_dict.items() if any(p(k, v) for p in preds)
                }
        # Every chosen array is read and checked before `like` is compared with
        # the manifest: a file that lies about an array is damaged, not mismatched.
        with archive.damage():
            for key in chosen:
                for leaf in entries[key].leaves:
                    host(entries[key], leaf)
        _check(where, entries, chosen, like_part)
        order = chosen if like_part is None else list(like_part)
        return {key: build(key, like_part, True) for key in order}


def _raw(filters: Filters) -> list[Any]:
    return list(filters) if isinstance(filters, (list, tuple)) else [filters]


_UNBUILT = object()


def _build(
    entry: Entry,
    host: Callable[[Entry, Leaf], np.ndarray],
    like: Mapping[StateKey, Any] | None,
    *,
    placed: bool,
) -> Any:
    """The value of ``entry`` as JAX arrays, with ``like``'s structure if it has one."""
    key = StateKey(entry.key)
    like_leaves: list[Any] = [None] * len(entry.leaves)
    like_def = None
    if like is not None and key in like:
        paths, leaves, like_def = leaf_paths(like[key])
        if paths != [leaf.path for leaf in entry.leaves]:
            like_def = None  # mismatched: `_check` reports it when it matters
        elif placed:
            like_leaves = leaves
    arrays = [
        _to_device(host(entry, leaf), leaf, like_leaf, entry.key + leaf.path)
        for leaf, like_leaf in zip(entry.leaves, like_leaves, strict=True)
    ]
    if like_def is not None:
        return jax.tree_util.tree_unflatten(like_def, arrays)
    try:
        value = decode_tree(entry.tree, iter(arrays))
    except NeedsLike as err:
        if not placed:
            return _UNBUILT
        raise LiftValueError(
            f"`load_state`: the value of {entry.key!r} is a {err.node} (structure "
            f"{entry.treedef}), which cannot be rebuilt without its class. Pass "
            "`like=` (e.g. the state `export_state` returns for the model) to give the "
            "structure, or read the raw arrays with `numpy.load(path)`."
        ) from None
    return value


def _check(
    where: str,
    entries: Mapping[StateKey, Entry],
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
            compare(
                entry.key,
                [leaf.path for leaf in entry.leaves],
                [(leaf.shape, leaf.dtype) for leaf in entry.leaves],
                like[key],
                problems,
            )
    if problems:
        raise mismatch(where, problems, HINT)
    _x64_check(where, entries, chosen)


def _x64_check(
    where: str, entries: Mapping[StateKey, Entry], chosen: Sequence[StateKey]
) -> None:
    wide = sorted(
        {
            entries[k].key + leaf.path
            for k in chosen
            for leaf in entries[k].leaves
            if leaf.key_impl is None and _x64_missing(leaf.dtype)
        }
    )
    if wide:
        raise LiftValueError(
            f"`{where}`: the file holds 64-bit arrays at {wide}, and 64-bit JAX is "
            "off, so they would be truncated. Enable it first: "
            "`jax.config.update('jax_enable_x64', True)` or `with "
            "jax.enable_x64(True):`."
        )


def _x64_missing(dtype: str) -> bool:
    dt = jnp.dtype(dtype)  # a dtype the manifest check accepted
    return dt.itemsize == 8 * (2 if dt.kind == "c" else 1) and (
        jax.dtypes.canonicalize_dtype(dt) != dt
    )


def _to_device(host: np.ndarray, leaf: Leaf, like_leaf: Any, path: str) -> jax.Array:
    if leaf.key_impl is not None:
        value = jax.random.wrap_key_data(jnp.asarray(host), impl=leaf.key_impl)
    else:
        if host.dtype.name != leaf.dtype:
            host = host.view(jnp.dtype(leaf.dtype))
        value = None
    sharding = _sharding_of(like_leaf, path, "load_state")
    if sharding is not None:
        return jax.device_put(host if value is None else value, sharding)
    return jax.device_put(host) if value is None else value
