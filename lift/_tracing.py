"""The few facts about JAX's tracing that lift needs, in one place.

They rest on JAX internals (``jax._src``); keeping them here means a JAX upgrade
touches one small module.
"""

from __future__ import annotations

from typing import Any

import jax
from jax._src import core as _core
from jax.extend.core import get_opaque_trace_state

__all__ = ["batched_here", "dead_tracer", "get_opaque_trace_state", "is_array"]

try:
    from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # pragma: no cover - a future JAX
    _BatchTracer = None

_ARRAY_TYPES: set[type] = {type(jax.numpy.zeros(()))}


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


def dead_tracer(x: Any) -> bool:
    """Whether ``x`` is a tracer whose transform has already finished (a leak)."""
    if not isinstance(x, _core.Tracer):
        return False
    trace = getattr(x, "_trace", None)
    is_valid = getattr(trace, "is_valid", None)
    return is_valid is not None and not is_valid()
