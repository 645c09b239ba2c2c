"""The few facts about JAX's tracing that lift needs, in one place.

They rest on JAX internals (``jax._src``); keeping them here means a JAX upgrade
touches one small module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax._src import core as _core
from jax._src.interpreters import ad as _ad
from jax.extend.core import get_opaque_trace_state

__all__ = [
    "RETIRED",
    "TRACE",
    "batched_here",
    "dead_tracer",
    "foreign_kind",
    "get_opaque_trace_state",
    "in_trace",
    "is_array",
    "retire",
    "shared_in_vmap",
    "with_cache_miss",
]

# `TRACE.value` is the trace JAX is running now (the eager one at top level), what
# `jax._src.core.trace_ctx.trace` returns without its Python property: a frame keeps
# the one it was made in and compares by identity, one C attribute read per get.
TRACE = _core.trace_state_strong_ref
in_trace = _core.set_current_trace

try:
    from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # pragma: no cover - a future JAX
    _BatchTracer = None

try:  # the concrete array class, named without starting a backend
    from jax._src.array import ArrayImpl as _ArrayImpl
except ImportError:  # pragma: no cover - a future JAX
    _ArrayImpl = jax.Array

_ARRAY_TYPES: set[type] = {_ArrayImpl}


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array leaf (dynamic under lifted transforms) or static."""
    kind = type(x)
    if kind in _ARRAY_TYPES:
        return True
    import numpy as np

    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        _ARRAY_TYPES.add(kind)
        return True
    return False


def batched_here(x: Any) -> bool:
    """Whether ``x`` is batched by the innermost ``vmap`` being traced right now."""
    if _BatchTracer is None or not isinstance(x, _BatchTracer):
        return False
    return x._trace is _core.trace_ctx.trace and x.batch_dim is not None


def shared_in_vmap(x: Any, trace: Any) -> bool:
    """Whether ``trace`` is a ``vmap``'s and ``x`` is not batched by it.

    JAX batches an array reference made in a ``vmap``'s trace even from an unbatched
    value, so state that is shared by the batch cannot be threaded through one.
    """
    if _BatchTracer is None or type(trace).__name__ != "BatchTrace":
        return False
    return not (
        isinstance(x, _BatchTracer) and x._trace is trace and x.batch_dim is not None
    )


def dead_tracer(x: Any) -> bool:
    """Whether ``x`` is a tracer that does not belong to the transforms running now.

    A tracer is alive while its trace is the current one or encloses it; any other
    tracer has leaked out of a transform that has finished (or never enclosed us).
    """
    if not isinstance(x, _core.Tracer):
        return False
    trace = getattr(x, "_trace", None)
    current = _core.trace_ctx.trace
    while current is not None:
        if current is trace:
            return False
        parent = getattr(current, "parent_trace", _UNKNOWN)
        if parent is _UNKNOWN:
            # The root (eager) trace has no parent: we saw the whole chain. Any other
            # trace without one leaves us unsure; fall back to JAX's own validity flag.
            if isinstance(current, _core.EvalTrace):
                return True
            is_valid = getattr(trace, "is_valid", None)
            return is_valid is not None and not is_valid()
        current = parent
    return True


_UNKNOWN = object()


def retire(ref: Any) -> None:
    """Free an eager array reference's buffer once its value has been read back.

    A raw ``jax.jit`` that read or wrote state caches the reference it closed over; if
    it is called again in a later frame, it must fail loudly on the freed buffer
    rather than read or write a frame that has moved on.
    """
    if isinstance(ref, _core.Tracer):
        return
    buf = getattr(getattr(ref, "_refs", None), "_buf", None)
    delete = getattr(buf, "delete", None)
    if delete is not None:
        delete()
        RETIRED[0] = True


# Whether any reference was retired in this process: only then can JAX's "Array has
# been deleted" come from one.
RETIRED = [False]


_AD_TRACES = tuple(
    t
    for t in (getattr(_ad, "JVPTrace", None), getattr(_ad, "LinearizeTrace", None))
    if t is not None
)


def foreign_kind(trace: Any) -> str | None:
    """How the running trace relates to ``trace`` (a frame's) when they differ.

    ``None`` when array references made in ``trace`` can thread state through the
    running trace (a loop, ``jit`` or ``vmap`` nested in it). ``"detached"`` when the
    running trace is not nested in ``trace`` at all (``jax.shard_map``'s, which hides
    its parent), or is the body of a ``jax.shard_map``/``pmap`` or the function of a
    ``jax.custom_jvp``/``custom_vjp``, which JAX traces apart: a reference would leak
    out of it, or JAX cannot discharge it there.
    ``"checkpoint"`` when a ``jax.checkpoint`` lies between them under differentiation,
    which JAX 0.10.2 cannot transpose with a reference in it. ``"while_cond"`` inside
    the condition of a raw ``lax.while_loop``, where JAX 0.10.2 reads a reference's
    value from loop entry.
    """
    current = TRACE.value
    remat = cond = False
    while current is not None and current is not trace:
        if remat and isinstance(current, _AD_TRACES):
            return "checkpoint"
        frame = getattr(current, "frame", None)
        info = getattr(frame, "debug_info", None)
        traced_for = str(getattr(info, "traced_for", ""))
        if traced_for.startswith(("custom_jvp", "custom_vjp", "shard_map", "pmap")):
            return "detached"
        if traced_for.startswith("checkpoint"):
            remat = True
        cond = cond or traced_for == "while_cond"
        current = getattr(current, "parent_trace", None)
    if current is None:
        return "detached"
    if remat and isinstance(current, _AD_TRACES):
        return "checkpoint"
    return "while_cond" if cond else None


def with_cache_miss(
    jitted: Any,
    cache_miss: Callable[..., tuple[Any, Any, bool]],
    *,
    like: Callable[..., Any],
) -> Callable[..., Any] | None:
    """``jitted`` (a ``jax.jit`` function) with its slow path replaced, or ``None``.

    ``jax.jit``'s C++ dispatch calls its Python slow path only when no compiled
    signature matches, with the call's own arguments, and caches what it returns,
    ``(outputs, fastpath data or None, rebuild)``; with ``None`` nothing is cached.
    The copy made here calls ``cache_miss(jax_miss, *args, **kwargs)`` instead, where
    ``jax_miss`` is JAX's own slow path: Python runs only on a miss, and a hit costs
    exactly what a ``jax.jit`` call costs. It is named and documented like ``like``,
    and keeps ``jitted``'s ``lower``, ``trace`` and ``eval_shape``. ``None`` if this
    JAX has no such hook.
    """
    try:
        from jax._src.lib import _jax  # pyright: ignore[reportPrivateImportUsage]

        state = jitted.__getstate__()
        fast = _jax.pjit(
            getattr(like, "__name__", state["function_name"]),
            state["fun"],
            functools.partial(cache_miss, state["cache_miss"]),
            state["static_argnums"],
            state["static_argnames"],
            state["global_cache_key"],
            state["pytree_registry"],
            state["shard_arg_fallback"],
            state["cache"],
        )
        functools.update_wrapper(fast, like, updated=())
        fast._fun = jitted._fun
        fast._jit_info = jitted._jit_info
        return fast
    except (ImportError, AttributeError, KeyError, TypeError):  # pragma: no cover
        return None
