"""Checks shared by the loaders: the state argument, ``like``, and its shardings.

:func:`lift.io.load_state` and :func:`lift.io.from_pure_dict` both rebuild a state
"like" a template and report every difference at once in a
:class:`StateMismatchError`; the comparison and the placement live here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from ._errors import LiftTypeError, LiftValueError, StateMismatchError
from ._format import leaf_paths
from ._keys import StateKey

__all__ = [
    "HINT",
    "StateMismatchError",
    "aval",
    "check_state",
    "compare",
    "like_state",
    "mismatch",
    "sharding_of",
]


HINT = (
    "Pass as `like` the state the file was saved from (e.g. `export_state` of the "
    "same model), or restore only the matching part with `filters=`."
)


def mismatch(
    where: str, problems: list[tuple[str, str]], hint: str
) -> StateMismatchError:
    """The error listing ``problems``, sorted by path."""
    problems.sort()
    lines = "\n".join(f"  - {path!r}: {what}" for path, what in problems)
    text = (
        f"`{where}`: the data does not match `like` ({len(problems)} problem"
        f"{'s' if len(problems) != 1 else ''}):\n{lines}\n{hint}"
    )
    return StateMismatchError(text, problems)


def check_state(state: Any, where: str) -> None:
    """Refuse anything but a dict with string keys, naming the offending key."""
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


def like_state(like: Any, where: str) -> dict[StateKey, Any]:
    """``like`` with ``StateKey`` keys, refusing what is not a state dict."""
    if not isinstance(like, Mapping):
        raise LiftTypeError(
            f"`{where}(like=...)` takes a state dict, got a {type(like).__name__}. "
            "Pass the state `export_state` returns for the model."
        )
    return {StateKey(k): v for k, v in like.items()}


def aval(leaf: Any) -> tuple[tuple[int, ...], str] | None:
    """``(shape, dtype name)`` of an array-like leaf, or None if it is not one."""
    if type(leaf) in (bool, int, float, complex):
        shape, dtype = (), jax.dtypes.result_type(leaf)
    else:
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return None
    return tuple(shape), getattr(dtype, "name", None) or str(dtype)


def compare(
    key: str,
    paths: Sequence[str],
    avals: Sequence[tuple[tuple[int, ...], str]],
    like_value: Any,
    problems: list[tuple[str, str]],
) -> None:
    """Append every difference between stored leaves and ``like_value``."""
    like_paths, like_leaves, like_def = leaf_paths(like_value)
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
        expected = aval(like_leaf)
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


def sharding_of(like_leaf: Any, path: str, where: str) -> Any:
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
