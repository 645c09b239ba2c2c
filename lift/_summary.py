"""``summary``: a table of a state's arrays, their sizes and where they live."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from ._archive import read_manifest
from ._errors import LiftTypeError

__all__ = ["StateSummary", "SummaryRow", "summary"]


class SummaryRow(NamedTuple):
    """One array of a state: its full path, shape, dtype, size and placement.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateKey
        >>> from lift.io import summary
        >>> row = summary({StateKey("w"): jnp.zeros((2, 3))}).rows[0]
        >>> row.path, row.shape, row.dtype, row.nbytes
        ('w', (2, 3), 'float32', 24)
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    sharding: str


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class StateSummary(str):
    """The text of :func:`summary`, with its rows and totals attached.

    It is a ``str`` (print it); notebooks render it as an HTML table.

    Attributes:
        rows: one :class:`SummaryRow` per array.
        total_bytes: the sum of the rows' sizes.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateKey
        >>> from lift.io import summary
        >>> table = summary({StateKey("w"): jnp.zeros((256, 1024))})
        >>> table.total_bytes, table.splitlines()[-1]
        (1048576, '1 array, 1,048,576 bytes (1.0 MiB)')
    """

    rows: tuple[SummaryRow, ...]
    total_bytes: int

    def __new__(cls, rows: tuple[SummaryRow, ...]) -> StateSummary:
        """Lay out ``rows`` as a text table."""
        total = sum(r.nbytes for r in rows)
        sharded = any(r.sharding not in ("", "1 device") for r in rows)
        header = ["path", "shape", "dtype", "bytes"] + (["sharding"] if sharded else [])
        cells = [
            [r.path, str(r.shape), r.dtype, f"{r.nbytes:,}"]
            + ([r.sharding] if sharded else [])
            for r in rows
        ]
        widths = [
            max(len(row[i]) for row in [header, *cells]) for i in range(len(header))
        ]

        def line(row: list[str]) -> str:
            parts = [
                cell.rjust(w) if i == 3 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(parts).rstrip()

        noun = "array" if len(rows) == 1 else "arrays"
        total_line = f"{len(rows)} {noun}, {total:,} bytes ({_human(total)})"
        text = "\n".join([line(header), *(line(c) for c in cells), total_line])
        self = super().__new__(cls, text)
        self.rows = rows
        self.total_bytes = total
        return self

    def __repr__(self) -> str:
        """The table itself, so that a REPL shows it as it prints."""
        return str(self)

    def _repr_html_(self) -> str:
        sharded = any(r.sharding not in ("", "1 device") for r in self.rows)
        head = ["path", "shape", "dtype", "bytes"] + (["sharding"] if sharded else [])
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(c))}</td>"
                for c in [r.path, r.shape, r.dtype, f"{r.nbytes:,}"]
                + ([r.sharding] if sharded else [])
            )
            + "</tr>"
            for r in self.rows
        )
        total = f"{len(self.rows)} arrays, {_human(self.total_bytes)}"
        return (
            "<table><thead><tr>"
            + "".join(f"<th>{h}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody>"
            + f"<tfoot><tr><td colspan='{len(head)}'>{total}</td></tr></tfoot></table>"
        )


def _sharding_text(leaf: Any) -> str:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return ""
    mesh = getattr(sharding, "mesh", None)
    if isinstance(mesh, jax.sharding.AbstractMesh):  # from `jax.eval_shape`
        count = mesh.size
    else:
        count = len(sharding.device_set)
    if count == 1:
        return "1 device"
    if sharding.is_fully_replicated:
        return f"replicated over {count} devices"
    spec = getattr(sharding, "spec", None)
    what = repr(spec) if spec is not None else type(sharding).__name__
    return f"{what} over {count} devices"


def _row(path: str, leaf: Any) -> SummaryRow:
    if type(leaf) in (bool, int, float, complex):
        dtype = jax.dtypes.result_type(leaf)
        return SummaryRow(path, (), str(dtype), np.dtype(dtype).itemsize, "")
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        dtype = np.asarray(leaf).dtype
    nbytes = math.prod(shape) * dtype.itemsize
    return SummaryRow(path, shape, str(dtype), nbytes, _sharding_text(leaf))


def summary(state: Mapping[Any, Any] | str | os.PathLike[str]) -> StateSummary:
    """A table of every array in ``state``: path, shape, dtype, bytes, totals.

    Rows are sorted by key, as JAX orders a dict. A value that is a pytree gets one
    row per leaf, its path extended by the leaf's path. A ``sharding`` column
    appears when any array spans several devices. Values may also be
    :class:`jax.ShapeDtypeStruct` (what :func:`jax.eval_shape` gives), to size a
    state before building it. Given a path instead of a state, it summarises a file
    written by :func:`lift.io.save_state` from its manifest, without reading the
    arrays.

    Args:
        state: a state dict, or the path of a state file.

    Returns:
        A :class:`StateSummary`: a ``str`` (print it) with ``.rows`` and
        ``.total_bytes``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> from lift.io import summary
        >>> _, state = export_state({"bn": StateEntry({"mean": jnp.zeros(3),
        ...                                            "var": jnp.ones(3)}),
        ...                          "step": StateEntry(jnp.int32(0))})
        >>> print(summary(state))
        path             shape  dtype    bytes
        ['bn']['mean']   (3,)   float32     12
        ['bn']['var']    (3,)   float32     12
        ['step']         ()     int32        4
        3 arrays, 28 bytes (28 B)
    """
    if isinstance(state, (str, os.PathLike)):
        return StateSummary(tuple(_file_rows(os.fspath(state))))
    if not isinstance(state, Mapping):
        raise LiftTypeError(
            f"`summary` takes a state dict or the path of a state file, got a "
            f"{type(state).__name__}."
        )
    rows = []
    # Sorted by key, as JAX orders a dict: equal states (in any order) read the same.
    for key, value in sorted(state.items(), key=lambda item: str(item[0])):
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            rows.append(_row(str(key) + jax.tree_util.keystr(path), leaf))
    return StateSummary(tuple(rows))


def _file_rows(path: str) -> list[SummaryRow]:
    """The rows of a state file, from its checked manifest alone."""
    entries = read_manifest(path, "summary")
    # Sorted by key, as `summary` sorts a state.
    return [
        SummaryRow(entry.key + leaf.path, leaf.shape, leaf.dtype, leaf.nbytes, "")
        for entry in sorted(entries, key=lambda e: e.key)
        for leaf in entry.leaves
    ]
