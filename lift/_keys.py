"""State keys and state entries: the two objects the tree layer is made of."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import jax

from ._memo import Memo

__all__ = [
    "StateEntry",
    "StateKey",
    "check_pattern",
    "dotted",
    "is_printed_key",
    "matches",
    "not_a_key",
]

T = TypeVar("T")


class StateKey(str):
    """A hashable, totally ordered key naming one piece of state by its path.

    ``str(key)`` is the JAX key path (:func:`jax.tree_util.keystr`) of the
    :class:`StateEntry` it replaced, so the same model built twice, in any process,
    gives equal keys. A key is a ``str`` underneath: hashing and ordering cost what a
    ``str`` costs. It is a pytree node without children, so an exported tree passes
    through plain :func:`jax.jit`, :func:`jax.vmap` and :func:`jax.lax.scan` with the
    key as part of the tree structure.

    Examples:
        >>> from lift import StateKey
        >>> key = StateKey("['bn']['mean']")
        >>> str(key), key < StateKey("['bn']['var']")
        ("['bn']['mean']", True)
        >>> key
        StateKey("['bn']['mean']")
    """

    __slots__ = ()

    def __repr__(self) -> str:
        # Double quotes (paths are full of single ones), one line, valid Python.
        return f"StateKey({json.dumps(str(self), ensure_ascii=False)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (StateKey, (str(self),))

    @property
    def path(self) -> str:
        """The key path as a plain ``str``."""
        return str(self)


class _NodeData(dict):
    """A key's node data: ``{(): key}``, so that ``dict.get(data, ())`` is the key.

    It compares as the key does, and prints as it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(self[()])


def _flatten(key: StateKey) -> tuple[tuple[()], _NodeData]:
    return (), _NodeData({(): key})


# A key's flatten, made once per key.
_FLATTENED = Memo("key flattens", _flatten, limit=100_000)
# A key is a node with no children. JAX calls its flatten and unflatten on every
# `jax.jit` dispatch (for the arguments and the outputs); both are C-level here, a dict
# lookup each, rather than Python functions: no Python frame per key per call.
jax.tree_util.register_pytree_node(StateKey, _FLATTENED.__getitem__, dict.get)


class StateEntry(Generic[T]):
    """Marks ``value``, a pytree of arrays, as state inside any pytree.

    :func:`lift.export_state` swaps each entry for a :class:`StateKey` and collects its
    value into the state dict. An entry is a pytree node whose one child is its value,
    so a constructor that builds entries can itself run under :func:`jax.vmap` (an
    ensemble) and the values come out batched.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry
        >>> entry = StateEntry(jnp.zeros(3))
        >>> entry.value.shape
        (3,)
    """

    __slots__ = ("value",)
    value: T

    def __init__(self, value: T) -> None:
        if isinstance(value, (StateEntry, StateKey)):
            from ._errors import LiftTypeError

            raise LiftTypeError(
                f"`StateEntry` got a {type(value).__name__} as its value; entries do "
                "not nest. Pass the array (or pytree of arrays) itself: "
                "`StateEntry(jnp.zeros(3))`."
            )
        self.value = value

    def __repr__(self) -> str:
        from ._errors import describe

        return f"StateEntry({describe(self.value)})"


_VALUE = jax.tree_util.GetAttrKey("value")


def _unflatten_entry(_: Any, children: Iterable[Any]) -> StateEntry:
    (value,) = children
    return StateEntry(value)


jax.tree_util.register_pytree_with_keys(
    StateEntry,
    lambda entry: (((_VALUE, entry.value),), None),
    _unflatten_entry,
    lambda entry: ((entry.value,), None),
)


# One subscript of a printed key path: ``['name']``, ``["it's"]`` or ``[0]``.
_SUBSCRIPT_RE = r"\[(?:('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|([^\]]*))\]"
_SUBSCRIPT = re.compile(_SUBSCRIPT_RE)
# A whole printed key path: an optional prefix, then subscripts and ``.attribute``s.
_PRINTED = re.compile(r"[^\[\]]*(?:" + _SUBSCRIPT_RE + r"|\.[^.\[\]]*)*")


def _segment(match: re.Match[str]) -> str:
    quoted, bare = match.groups()
    if quoted is None:
        return "." + bare
    try:
        return "." + str(ast.literal_eval(quoted))
    except (ValueError, SyntaxError):  # not a Python string literal after all
        return "." + quoted[1:-1]


def dotted(path: str) -> str:
    """``.layers[0]['bn']`` → ``layers.0.bn``: the form patterns are matched on.

    Each segment of the path (a dict key, an index, an attribute) as it is, joined by
    dots. Lossy where a segment holds a dot (``['c.d']`` and ``['c']['d']`` are both
    ``c.d``): select such a key by its :class:`StateKey` or its printed form.
    """
    return _DOTTED[path]


def _dotted(path: str) -> str:
    out = _SUBSCRIPT.sub(_segment, path)
    return out[1:] if out.startswith(".") else out


_DOTTED = Memo("dotted paths", _dotted, limit=1_000_000)


def is_printed_key(pattern: str) -> bool:
    """Whether ``pattern`` is read as the printed form of one key (it holds ``[``)."""
    return "[" in pattern


def check_pattern(pattern: str) -> None:
    """Refuse a pattern with ``[`` that cannot be the printed form of any key."""
    if is_printed_key(pattern) and _PRINTED.fullmatch(pattern) is None:
        raise not_a_key(pattern, "is not the printed form of a key")


def not_a_key(pattern: str, why: str) -> Exception:
    """The error for a pattern holding ``[`` that names no key, showing the fix."""
    from ._errors import LiftValueError

    return LiftValueError(
        f"The state filter {pattern!r} {why}. A filter holding `[` must be exactly "
        "the printed form of one key (`str(key)`, for example \"['bn']['mean']\"), "
        f"and selects only that key.{_dotted_hint(pattern)}"
    )


def _dotted_hint(pattern: str) -> str:
    """How to select what ``pattern`` (a refused filter holding ``[``) meant."""
    only_printed = (
        " A key with `[`, `]`, `.` or `*` inside one of its segments is selected "
        "only by its printed form (`str(key)`) or by its StateKey, not by a dotted "
        "pattern"
    )
    below = pattern[:-1] if pattern.endswith("]*") else None
    if below is not None and _PRINTED.fullmatch(below) is not None:
        parts = _unambiguous(below)
        if parts is not None:  # `['bn']*`: the keys below `['bn']`
            return (
                f" To select the keys below {below!r}, use the dotted pattern "
                f"{'.'.join([*parts, '*'])!r} (`*` matches any run of characters)."
            )
        return only_printed + "."
    if _PRINTED.fullmatch(pattern) is None:
        return (
            " To select by pattern, use the dotted form: the key's segments joined "
            "by `.`, where `*` matches any run of characters (`'bn.*'` selects "
            "every key below `['bn']`)."
        )
    parts = _unambiguous(pattern)
    if parts is None:
        return only_printed + "."
    if not pattern.startswith(("[", ".")) and not any(q in pattern for q in "'\""):
        # `x[0]`: the name of one dict key, most likely; its dotted form is not.
        name = jax.tree_util.keystr((jax.tree_util.DictKey(pattern),))
        path = "".join(f"[{p}]" if p.isdigit() else f"[{p!r}]" for p in parts)
        return (
            f" A dict key named {pattern!r} prints as {name!r}: only that printed "
            "form or its StateKey selects it (no dotted pattern does, as its name "
            f"holds `[`). The dotted pattern {'.'.join(parts)!r} selects the path "
            f"{path}, not that key."
        )
    return (
        " To select by pattern, use the dotted form, where `*` matches any run of "
        f"characters: {'.'.join(parts)!r}."
    )


def _unambiguous(path: str) -> list[str] | None:
    """The segments of printed ``path``, None if one holds ``[``, ``]``, ``.``, ``*``.

    Only then does the dotted form select the key the path names.
    """
    if _PRINTED.fullmatch(path) is None:
        return None
    parts: list[str] = []
    start = path.find("[")
    prefix, rest = (path, "") if start < 0 else (path[:start], path[start:])
    parts += [p for p in prefix.split(".") if p]
    for match in re.finditer(_SUBSCRIPT_RE + r"|\.([^.\[\]]*)", rest):
        quoted, bare, attr = match.groups()
        if attr is not None:
            segment = attr
        elif quoted is None:
            segment = bare
            if segment == "*":  # `[*]`: a wildcard the user meant
                parts.append(segment)
                continue
        else:
            try:
                segment = str(ast.literal_eval(quoted))
            except (ValueError, SyntaxError):  # as `_segment` reads it
                segment = quoted[1:-1]
        if any(c in segment for c in "[].*"):
            return None
        parts.append(segment)
    return parts


def _compile_pattern(pattern: str) -> Callable[[str], Any]:
    # A leading dot is optional: the pattern and the dotted path both get one.
    if not pattern.startswith((".", "*")):
        pattern = "." + pattern
    body = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(body, re.DOTALL).fullmatch


_PATTERNS = Memo("compiled patterns", _compile_pattern, limit=4096)


def matches(path: str, pattern: str) -> bool:
    """Whether ``pattern`` selects the key path ``path``.

    The pattern language (used by every filter in lift):

    * a pattern without ``[`` is matched on the key's dotted path (``layers.0.bn``
      for ``['layers'][0]['bn']`` and for ``.layers[0].bn``): ``*`` matches any run
      of characters (none, or several segments: ``"*.bn.*"`` finds ``bn`` at any
      depth), every other character only itself; a leading ``.`` is optional;
    * a pattern with ``[`` is the printed form of one key (``str(key)``) and
      matches only that key, character for character.

    Examples:
        >>> from lift._keys import matches
        >>> matches(".layers[0].bn.mean", "*.bn.*"), matches("['bn']['var']", "bn.*")
        (True, True)
        >>> matches("['norm']['mean']", "['bn']['mean']")
        False
    """
    if is_printed_key(pattern):
        return pattern == path
    return _PATTERNS[pattern]("." + dotted(path)) is not None
