"""Tree layer: ``export_state`` / ``import_state`` vs ``tree_flatten_with_path``.

Two kinds of trees with 1k, 10k and 100k state leaves (two per layer):

* ``dict``: ``{f"l{i}": {"w": array, "bn": {"mean": entry, "var": entry}}}``;
* ``eqx``: a list of Equinox modules, each with a weight and two ``StateEntry`` fields
  (the shape of ``eqx.nn.BatchNorm``'s state).

``export_state`` walks the tree in Python and rebuilds only the containers holding an
entry; it remembers the key names of custom nodes per node data. The first export of
a new structure ("cold": a fresh tree of a new structure and emptied memos every
round) and repeated exports of one tree ("warm", whose objects are hot in the CPU's
caches) are reported separately. (What lift learns per node *class*, such as an
Equinox module's fields, stays: it is learned once per process.) The baseline is one
:func:`jax.tree_util.tree_flatten_with_path` of the tree with its entries (for
``import_state``, the tree it returns), timed in the same interleaved rounds. An
anchor row shows what an export built on JAX's flatten would pay before naming a
single entry: ``tree_flatten`` plus ``unflatten`` of the tree. Every leaf holds the
same small array object: none of the timed functions touches array data.

Also: a jitted call on a dict of 1,000 ``StateKey`` keys vs the same dict keyed by
``str`` (a state dict costs what a plain dict costs in ``jax.jit``).

Run alone with ``python -m benchmarks.export``.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp

import lift

from ._timing import compare, print_rows, quick, row

__all__ = ["SIZES", "dict_tree", "eqx_tree", "main"]

SIZES = (1_000, 10_000, 100_000)
EXPORT_TARGET = 1.0
JIT_KEYS_TARGET = 1.05

_LEAF = jnp.zeros(4)


def dict_tree(leaves: int, tag: int = 0, entry: Any = lift.StateEntry) -> dict:
    """A dict tree with ``leaves`` state entries; ``tag`` changes its structure."""
    return {
        f"l{i}_{tag}": {"w": _LEAF, "bn": {"mean": entry(_LEAF), "var": entry(_LEAF)}}
        for i in range(leaves // 2)
    }


_EQX_MODULE: Any = None


def _eqx_module() -> Any:
    global _EQX_MODULE
    if _EQX_MODULE is None:
        import equinox as eqx

        class BatchNormLike(eqx.Module):
            """A weight and two pieces of state, like ``eqx.nn.BatchNorm``."""

            weight: Any
            mean: Any
            var: Any
            tag: int = eqx.field(static=True, default=0)

        _EQX_MODULE = BatchNormLike
    return _EQX_MODULE


def eqx_tree(leaves: int, tag: int = 0, entry: Any = lift.StateEntry) -> list:
    """A list of Equinox modules with ``leaves`` state entries in all."""
    module = _eqx_module()
    return [module(_LEAF, entry(_LEAF), entry(_LEAF), tag) for _ in range(leaves // 2)]


def forget_structures() -> None:
    """Empty lift's memo of custom nodes' key names: the next export is cold.

    (The trees here hold no custom node other than Equinox modules, which are named
    per class; the memo is emptied so that a future tree kind stays measured cold.)
    """
    importlib.import_module("lift._naming").NAMES.clear()


def _flatten(tree: Any) -> Any:
    return jax.tree_util.tree_flatten_with_path(tree)


def _is_entry(x: Any) -> bool:
    return type(x) is lift.StateEntry


def _flatten_unflatten(tree: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_entry)
    return treedef.unflatten(leaves)


def _plan(leaves: int, q: bool) -> tuple[int, int, int]:
    """(cold rounds, warm rounds, calls per warm round) for a tree size."""
    if q:
        return {1_000: (5, 5, 5), 10_000: (3, 3, 1)}.get(leaves, (2, 2, 1))
    return {1_000: (41, 41, 20), 10_000: (21, 21, 3)}.get(leaves, (7, 7, 1))


def measure_tree(kind: str, leaves: int, q: bool) -> list[dict[str, Any]]:
    """Cold export, warm export and import of one tree kind and size."""
    build = {"dict": dict_tree, "eqx": eqx_tree}[kind]
    cold_rounds, warm_rounds, number = _plan(leaves, q)
    label = f"{leaves // 1000}k {kind}"
    rows = []

    def fresh(r: int) -> dict[str, Any]:
        tree = build(leaves, tag=r + 1)
        forget_structures()
        return {
            "export": lambda: lift.export_state(tree),
            "flatten": lambda: _flatten(tree),
            "floor": lambda: _flatten_unflatten(tree),
        }

    tree = build(leaves)
    first = fresh(-1)  # tag 0 is the warm tree's structure: keep it uncached here
    timing = compare(first, rounds=cold_rounds, warmup=0, setup=fresh, block=False)
    rows.append(
        row(
            f"export_state cold, {label}",
            timing.median("export"),
            timing.median("flatten"),
            EXPORT_TARGET,
            ratio=timing.ratio("export", "flatten"),
            note="first export of a new tree structure",
        )
    )
    rows.append(
        row(
            f"  floor: flatten + unflatten, {label}",
            timing.median("floor"),
            timing.median("flatten"),
            None,
            ratio=timing.ratio("floor", "flatten"),
            note="an export built on JAX's flatten, before naming the entries",
        )
    )

    forget_structures()
    timing = compare(
        {"export": lambda: lift.export_state(tree), "flatten": lambda: _flatten(tree)},
        rounds=warm_rounds,
        number=number,
        warmup=1,
        block=False,
    )
    rows.append(
        row(
            f"export_state warm, {label}",
            timing.median("export"),
            timing.median("flatten"),
            EXPORT_TARGET,
            ratio=timing.ratio("export", "flatten"),
            note="export of a structure seen before",
        )
    )

    model, state = lift.export_state(tree)
    timing = compare(
        {
            "import": lambda: lift.import_state(model, state),
            "flatten": lambda: _flatten(tree),
        },
        rounds=warm_rounds,
        number=number,
        warmup=1,
        block=False,
    )
    rows.append(
        row(
            f"import_state, {label}",
            timing.median("import"),
            timing.median("flatten"),
            EXPORT_TARGET,
            ratio=timing.ratio("import", "flatten"),
        )
    )
    return rows


def jit_keys(q: bool) -> dict[str, Any]:
    """A jitted call on 1,000 ``StateKey`` keys vs the same dict keyed by ``str``."""
    values = [jnp.zeros(()) + i for i in range(1000)]
    by_key = {lift.StateKey(f"['l{i}']"): v for i, v in enumerate(values)}
    by_str = {f"['l{i}']": v for i, v in enumerate(values)}

    def bump(d: dict) -> dict:
        return jax.tree.map(lambda x: x + 1, d)

    f_key, f_str = jax.jit(bump), jax.jit(bump)
    rounds, number = (5, 5) if q else (61, 30)
    timing = compare(
        {"key": lambda: f_key(by_key), "str": lambda: f_str(by_str)},
        rounds=rounds,
        number=number,
        warmup=3,
    )
    return row(
        "jit call, 1k StateKey vs str keys",
        timing.median("key"),
        timing.median("str"),
        JIT_KEYS_TARGET,
        ratio=timing.ratio("key", "str"),
    )


def main(quick_run: bool | None = None) -> list[dict[str, Any]]:
    """Run the tree-layer measures and return their rows."""
    q = quick() if quick_run is None else quick_run
    rows = []
    sizes = SIZES[:1] if q else SIZES
    for kind in ("dict", "eqx"):
        if kind == "eqx":
            try:
                import equinox  # noqa: F401
            except ImportError:
                continue
        for leaves in sizes:
            rows += measure_tree(kind, leaves, q)
    rows.append(jit_keys(q))
    return rows


if __name__ == "__main__":
    print_rows(main())
