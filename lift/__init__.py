"""lift: stateful JAX made easy and fast.

``import lift`` never imports Equinox, Inox, Flax or Haiku: the converters in
``lift.equinox`` and friends load only when used.
"""

from ._errors import LiftError as LiftError
from ._errors import TraceError as TraceError
from ._export import export_state as export_state
from ._export import filter_state as filter_state
from ._export import import_state as import_state
from ._export import merge_states as merge_states
from ._export import partition_state as partition_state
from ._export import update_state as update_state
from ._keys import StateEntry as StateEntry
from ._keys import StateKey as StateKey

__version__ = "0.1.0"

__all__ = [
    "LiftError",
    "StateEntry",
    "StateKey",
    "TraceError",
    "export_state",
    "filter_state",
    "import_state",
    "merge_states",
    "partition_state",
    "update_state",
]
