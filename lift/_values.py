"""Checking the next value of a piece of state: its structure, shape and exact dtype.

``lift.set`` and ``update_state`` both go through :func:`check_value`, so they accept,
cast and refuse exactly the same values. State keeps its dtype (the one JAX gives the
current value: a numpy ``float64`` array is ``float32`` state unless x64 is on):

* an array of that dtype and shape is stored as it is;
* a numpy array whose dtype JAX would turn into the state's (``float64`` into
  ``float32``, ``int64`` into ``int32``) is cast when every element survives the cast
  exactly, and refused otherwise;
* a weakly typed value (a Python number, or an array computed only from them) is cast
  when its kind fits (bool < int < float < complex) and, when it is concrete, its value
  does too (an int in the integer's range, a finite float that stays finite);
* anything else, and anything that is not an array (strings, objects, object arrays,
  ``jax.ShapeDtypeStruct``, a tracer of a transform that has finished), is refused
  with an error naming the key.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.core import Tracer

from ._errors import LiftTypeError, LiftValueError, TraceError, describe, unflattenable
from ._tracing import _ArrayImpl as ArrayImpl
from ._tracing import dead_tracer

try:
    from jax._src.random.prng import PRNGKeyArray
except ImportError:  # pragma: no cover - a future JAX: keys take the checked path
    PRNGKeyArray = ArrayImpl

__all__ = ["check_value"]

_SCALARS = (bool, int, float, complex)
# Concrete array types whose `aval` says all: jax arrays and typed PRNG key arrays
# (named without making a key, which would start a backend at import).
_ARRAYS = frozenset({ArrayImpl, PRNGKeyArray})
_SCALAR_RANK = {bool: 0, int: 1, float: 2, complex: 3}


def check_value(key: Any, old: Any, new: Any, *, where: str) -> Any:
    """``new`` as the next value of ``key`` (whose value is ``old``), cast if needed.

    Raises:
        LiftValueError: the structure, shape or dtype differs and no lossless cast
            makes it fit.
        LiftTypeError: a leaf of ``new`` is not an array or a Python number.
        TraceError: a leaf of ``new`` is a tracer of a transform that has finished.
    """
    kind = type(new)
    # The common case costs one comparison: an array (or live tracer) of the current
    # value's type and abstract value (shape, dtype, weak type).
    if (
        kind is type(old)
        and (kind in _ARRAYS or isinstance(new, Tracer))
        and new.aval == old.aval
        and not dead_tracer(new)
    ):
        return new
    old_leaves, old_def = jax.tree_util.tree_flatten(old)
    try:
        new_leaves, new_def = jax.tree_util.tree_flatten(new)
    except (TypeError, ValueError) as err:  # JAX's "Comparator raised exception"
        raise unflattenable(where, key, err) from err
    if old_def != new_def:
        raise LiftValueError(
            f"{where}: the new value of {str(key)!r} has structure {new_def}, but the "
            f"state holds {old_def}. State keeps its structure: write a value shaped "
            "like the one `get` returns."
        )
    out = [
        _leaf(key, o, n, where, old, new)
        for o, n in zip(old_leaves, new_leaves, strict=True)
    ]
    if all(a is b for a, b in zip(out, new_leaves, strict=True)):
        return new
    return new_def.unflatten(out)


def _leaf(
    key: Any, old: Any, new: Any, where: str, old_tree: Any, new_tree: Any
) -> Any:
    """One leaf of :func:`check_value`: ``new`` checked against ``old``."""
    _check_kind(key, new, where)
    old_dtype = getattr(old, "dtype", None)
    if old_dtype is None:
        target = jax.dtypes.result_type(old)
    elif jnp.issubdtype(old_dtype, jax.dtypes.extended):  # PRNG keys: as they are
        target = old_dtype
    else:
        target = jax.dtypes.canonicalize_dtype(old_dtype)
    old_shape = getattr(old, "shape", None)
    if old_shape is None:
        old_shape = np.shape(old)
    new_shape = new.shape if hasattr(new, "shape") else ()

    def mismatch() -> LiftValueError:
        if jnp.issubdtype(target, jax.dtypes.extended):  # a PRNG key: no astype
            fix = (
                "write a key array of that implementation (`jax.random.split` of "
                "the key read, or `jax.random.wrap_key_data(data, impl=...)`)"
            )
        else:
            fix = f"cast with `.astype({target})` or reshape before writing"
        return LiftValueError(
            f"{where}: the new value of {str(key)!r} is {describe(new_tree)}, but the "
            f"state holds {describe(old_tree)}. State keeps its shape and dtype: "
            f"{fix}, or build the entry with the shape you need."
        )

    if tuple(new_shape) != tuple(old_shape):
        raise mismatch()
    if type(new) in _SCALARS or getattr(new, "weak_type", False):
        rank = _SCALAR_RANK.get(type(new))
        if rank is None:
            rank = _rank(new.dtype)
        target_rank = _rank(target)
        if rank is None or target_rank is None or rank > target_rank:
            raise mismatch()
        exact = type(new) not in _SCALARS and new.dtype == target
        if exact and getattr(old, "weak_type", type(old) in _SCALARS):
            return new  # weak into weak of the same dtype: as it is
        if not isinstance(new, Tracer) and not _fits(new, target):
            raise LiftValueError(
                f"{where}: the new value of {str(key)!r} is {_show(new)}, which the "
                f"state's dtype {target} cannot hold (it would wrap around or "
                "overflow). Write a value in range, or build the entry with a wider "
                "dtype."
            )
        return jnp.asarray(new, dtype=target)
    if new.dtype == target:
        return new
    if (
        isinstance(new, (np.ndarray, np.generic))
        and jax.dtypes.canonicalize_dtype(new.dtype) == target
    ):
        # What JAX itself would make of it (float64 -> float32 without x64): kept
        # only when nothing is lost, so the state's dtype never drifts.
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.asarray(new).astype(target)
            same = np.array_equal(
                cast.astype(new.dtype), new, equal_nan=new.dtype.kind in "fc"
            )
        if same:  # an array of the kind the state holds
            return jnp.asarray(cast) if isinstance(old, jax.Array) else cast
        raise LiftValueError(
            f"{where}: the new value of {str(key)!r} is a numpy {new.dtype} array "
            f"whose values the state's dtype {target} cannot hold exactly; state "
            f"keeps its dtype. Cast it yourself (`.astype(np.{target})`) if the "
            "rounding is intended, or build the entry with the dtype you need."
        )
    raise mismatch()


def _check_kind(key: Any, new: Any, where: str) -> None:
    """Refuse a leaf that is not an array, a live tracer or a Python number."""
    if isinstance(new, Tracer):
        if dead_tracer(new):
            raise TraceError(
                f"{where}: the new value of {str(key)!r} is a tracer of a JAX "
                "transform that has already finished: it escaped the transform that "
                "computed it and is meaningless now. Compute the value inside the "
                "same transform, and use lift's transforms (`lift.vmap`, "
                "`lift.scan`, ...) so state flows out of them."
            )
        return
    if type(new) in _SCALARS or isinstance(new, jax.Array):
        return
    if isinstance(new, (np.ndarray, np.generic)):
        if new.dtype == np.bool_ or jnp.issubdtype(new.dtype, np.number):
            return
        raise LiftTypeError(
            f"{where}: the new value of {str(key)!r} is a numpy array of dtype "
            f"{new.dtype}; state holds numeric arrays. Write an array of the "
            "state's dtype."
        )
    if isinstance(new, jax.ShapeDtypeStruct):
        raise LiftTypeError(
            f"{where}: the new value of {str(key)!r} is a `jax.ShapeDtypeStruct` "
            f"({new.dtype}{list(new.shape)}), a description without values (as "
            "`jax.eval_shape` returns). Write a concrete array, for example "
            "`jnp.zeros(s.shape, s.dtype)`."
        )
    raise LiftTypeError(
        f"{where}: the new value of {str(key)!r} is a {type(new).__name__} "
        f"({_show(new)}); state holds arrays. Write a jax or numpy array (or a "
        "Python number) of the state's shape and dtype."
    )


def _rank(dtype: Any) -> int | None:
    """The kind's rank (bool 0 < int 1 < float 2 < complex 3); None for keys."""
    if jnp.issubdtype(dtype, jax.dtypes.extended):
        return None
    if dtype == np.bool_:
        return 0
    for rank, kind in enumerate((jnp.integer, jnp.floating, jnp.complexfloating)):
        if jnp.issubdtype(dtype, kind):
            return rank + 1
    return None


def _fits(value: Any, target: Any) -> bool:
    """Whether a concrete weakly typed value survives the cast to ``target``.

    An integer keeps its value; a finite float (or complex) stays finite (rounding is
    what a weak float is for).
    """
    if jnp.issubdtype(target, jnp.integer):
        info = jnp.iinfo(target)
        if type(value) in _SCALARS:
            return info.min <= value <= info.max
        host = np.asarray(value)
        return host.size == 0 or bool(info.min <= host.min() and host.max() <= info.max)
    if not jnp.issubdtype(target, jnp.inexact):
        return True  # bool into bool
    if type(value) in _SCALARS:
        try:
            number = complex(value)
        except OverflowError:  # an int too large for any float
            return False
        top = float(jnp.finfo(target).max)
        return all(
            not math.isfinite(part) or abs(part) <= top
            for part in (number.real, number.imag)
        )
    host = np.asarray(value)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = host.astype(target)
    return bool(np.all(np.isfinite(cast) | ~np.isfinite(host)))


def _show(value: Any) -> str:
    """A short description of a value for a message: the number, or its type."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return describe(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
