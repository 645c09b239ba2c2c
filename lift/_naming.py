"""How the export walk names the children of a custom node, and opens one.

JAX names a child by its key path (``keystr``). For most nodes the walk asks
``flatten_one_level_with_keys`` once per structure and remembers the answer
(:data:`NAMES`); an Equinox module's fields are read from the class once
(:data:`FIELDS`). A node whose flatten fails becomes a lift error naming its path.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import numpy as np

from ._errors import LiftValueError
from ._memo import Memo

__all__ = [
    "FIELDS",
    "NAMES",
    "child_names",
    "is_namedtuple",
    "module_fields",
    "unflattenable",
]

_registry = jax.tree_util.default_registry

# Per (type, node data, number of children): the key strings of the children.
NAMES = Memo("child key strings", limit=10_000)
# Per custom node type: for an Equinox module class, the (attribute, key string) of
# each dynamic field, the attributes, and them as a set; None for any other type.
FIELDS = Memo("module fields", limit=10_000)


def unflattenable(
    node: Any, kind: type, path: str | None, how: str, err: Exception
) -> LiftValueError:
    where = "in the tree" if path is None else f"at {path!r}" if path else "at the root"
    fix = (
        "use keys of one type (all str, for example)"
        if isinstance(node, dict)
        else f"fix the {kind.__qualname__}'s pytree registration"
    )
    why = (
        "lift names state by JAX's key paths, so `export_state` needs it"
        if how
        else "JAX flattens it in every transform"
    )
    return LiftValueError(
        f"The {kind.__qualname__} {where} cannot be flattened{how} by JAX: "
        f"{type(err).__name__}: {err}. {why}: {fix}."
    )


def is_namedtuple(node: Any, kind: type, aux: Any) -> bool:
    """Whether JAX's own namedtuple rule flattens ``node`` (not a registration)."""
    return aux is kind and isinstance(node, tuple) and hasattr(kind, "_fields")


def child_names(
    node: Any, kind: type, aux: Any, n: int, path: str | None
) -> tuple[str, ...]:
    """The key strings of a custom node's children, remembered per structure."""
    if is_namedtuple(node, kind, aux):
        # JAX's own namedtuple rule. (0.10.2's `flatten_one_level_with_keys` repeats
        # the first field's key for every child, so name them here.)
        return tuple(f".{name}" for name in kind._fields)
    try:
        memo_key = (kind, _exact(aux), n)
        names = NAMES.get(memo_key)
    except Exception:  # node data that cannot be hashed, compared or printed
        memo_key, names = None, None
    if names is None:
        try:
            keyed = _registry.flatten_one_level_with_keys(node)
        except Exception as err:  # the node's own flatten with keys
            raise unflattenable(node, kind, path, " with keys", err) from err
        names = tuple(str(k) for k, _ in keyed[0]) if keyed is not None else ()
        if len(names) != n:
            raise LiftValueError(
                f"`export_state`: a {kind.__qualname__} node flattens to {n} "
                f"children, but to {len(names)} with keys, so its entries cannot be "
                "named by their key paths. Make its `flatten_with_keys` return the "
                "same children as its `flatten`."
            )
        if memo_key is not None:
            NAMES.put(memo_key, names)
    return names


# Types whose equal values print differently beyond their type (0.0 and -0.0), and
# containers, whose items need the same care.
_BY_REPR = frozenset(
    {float, complex, tuple, list, np.float16, np.float32, np.float64, np.longdouble}
    | {np.complex64, np.complex128, np.clongdouble}
)


def _exact(aux: Any) -> Any:
    """``aux`` as a memo key that tells apart equal values printed differently.

    Node data often holds the keys a node's children are named by, and ``1``,
    ``1.0``, ``True`` and ``np.int32(1)`` (or ``0.0`` and ``-0.0``) are equal, hash
    alike, and name a child ``[1]``, ``[1.0]``, ``[True]``...: a value is keyed with
    its type, a float with its ``repr`` too.
    """
    kind = type(aux)
    if kind is tuple or kind is list:
        kinds = tuple(map(type, aux))
        if _BY_REPR.isdisjoint(kinds):  # the common case: str (or int) keys
            return (tuple(aux), kinds)
        return tuple(map(_exact, aux))
    if kind in _BY_REPR:
        return (kind, repr(aux))
    return (aux, kind)


def module_fields(node: Any, kind: type) -> Any:
    """``((attribute, key string), attributes, attribute set)`` of a module's fields.

    ``None`` when ``kind`` is not an Equinox module, or when its fields are not what
    JAX flattens (checked on this first instance of the class).
    """
    fields = None
    module = sys.modules.get("equinox")
    if module is not None and isinstance(node, module.Module):
        attrs = tuple(
            f.name
            for f in dataclasses.fields(node)
            if not f.metadata.get("static", False)
        )
        values = object.__getattribute__(node, "__dict__")
        try:
            keyed = _registry.flatten_one_level_with_keys(node)
        except Exception:  # the walk's generic path names the error and the path
            keyed = None
        if (
            keyed is not None
            and len(keyed[0]) == len(attrs)
            and all(a in values for a in attrs)
            and all(
                getattr(k, "name", None) == a and child is values[a]
                for (k, child), a in zip(keyed[0], attrs, strict=True)
            )
        ):
            fields = (tuple((a, f".{a}") for a in attrs), attrs, frozenset(attrs))
    return FIELDS.put(kind, fields)
