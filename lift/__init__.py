"""lift: stateful JAX made easy and fast.

``import lift`` never imports Equinox, Inox, Flax or Haiku: the converters in
``lift.equinox`` and friends load on first use, also as attributes (``lift.equinox``
after a bare ``import lift``).
"""

import importlib as _importlib
from typing import Any as _Any

from ._errors import FrameError as FrameError
from ._errors import LiftError as LiftError
from ._errors import LiftKeyError as LiftKeyError
from ._errors import LiftTypeError as LiftTypeError
from ._errors import LiftValueError as LiftValueError
from ._errors import StateFileError as StateFileError
from ._errors import StateMismatchError as StateMismatchError
from ._errors import TraceError as TraceError
from ._export import export_state as export_state
from ._export import filter_state as filter_state
from ._export import import_state as import_state
from ._export import merge_states as merge_states
from ._export import partition_state as partition_state
from ._export import update_state as update_state
from ._frame import get as get
from ._frame import lower as lower
from ._frame import set as set
from ._frame import stateful as stateful
from ._keys import StateEntry as StateEntry
from ._keys import StateKey as StateKey
from ._lifting import Lifted as Lifted
from ._lifting import lift_transform as lift_transform
from ._shard import pmap as pmap
from ._shard import shard_map as shard_map
from ._transforms import checkpoint as checkpoint
from ._transforms import cond as cond
from ._transforms import eval_shape as eval_shape
from ._transforms import fori_loop as fori_loop
from ._transforms import grad as grad
from ._transforms import jit as jit
from ._transforms import remat as remat
from ._transforms import scan as scan
from ._transforms import switch as switch
from ._transforms import value_and_grad as value_and_grad
from ._transforms import vmap as vmap
from ._transforms import while_loop as while_loop
from .io import from_pure_dict as from_pure_dict
from .io import load_state as load_state
from .io import save_state as save_state
from .io import summary as summary
from .io import to_pure_dict as to_pure_dict

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped: errors, trees, frames, transforms, io
    "FrameError",
    "Lifted",
    "LiftError",
    "LiftKeyError",
    "LiftTypeError",
    "LiftValueError",
    "StateEntry",
    "StateFileError",
    "StateKey",
    "StateMismatchError",
    "TraceError",
    "checkpoint",
    "cond",
    "eval_shape",
    "export_state",
    "filter_state",
    "fori_loop",
    "get",
    "grad",
    "import_state",
    "jit",
    "lift_transform",
    "lower",
    "merge_states",
    "partition_state",
    "pmap",
    "remat",
    "scan",
    "set",
    "shard_map",
    "stateful",
    "switch",
    "update_state",
    "save_state",
    "load_state",
    "to_pure_dict",
    "from_pure_dict",
    "summary",
    "value_and_grad",
    "vmap",
    "while_loop",
]

# Submodules loaded on first attribute access (PEP 562), so that `import lift` stays
# free of the frameworks they import.
_LAZY = ("equinox", "haiku", "inox", "io", "linen", "nnx", "testing")


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
