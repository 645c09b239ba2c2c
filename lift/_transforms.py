"""Lifted transforms: JAX's transforms, threading the current frame's state.

Each is an instance of :class:`~lift._lifting.Lifted`: a ``run`` that applies the
JAX transform to the pure function(s) and says how the state enters and leaves it.
They live in one module per family; this module gathers them.
"""

from __future__ import annotations

from ._autodiff import checkpoint, eval_shape, grad, remat, value_and_grad
from ._control import cond, fori_loop, scan, switch, while_loop
from ._jit import jit
from ._mapping import mapped_axes, vmap

__all__ = [
    "checkpoint",
    "cond",
    "eval_shape",
    "fori_loop",
    "grad",
    "jit",
    "mapped_axes",
    "remat",
    "scan",
    "switch",
    "value_and_grad",
    "vmap",
    "while_loop",
]
