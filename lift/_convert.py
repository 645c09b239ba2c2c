"""The glue every converter needs besides its library.

``lift.equinox``, ``lift.inox``, ``lift.nnx``, ``lift.haiku`` and ``lift.linen`` share
argument checks, taking a converted model's values out of a lift state, and calling
the library with the current frame's values.

A converter knows which lift keys its model uses and how to call the library with their
values; :func:`call_in_frame` does the rest through :func:`lift.lower`: it reads the
values from the innermost frame, calls the library once, and writes back the values
that changed, each checked as by :func:`lift.set`. Values the library returns unchanged
(the same objects) are not written, so a model in inference mode runs in an immutable
frame.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._errors import FrameError, LiftKeyError, LiftTypeError, LiftValueError, closest
from ._frame import current_frame, lower, unpack
from ._keys import StateKey

__all__ = ["call_in_frame", "check_prefix", "check_state", "take", "unpack"]


def check_prefix(prefix: Any, where: str) -> str:
    """``prefix`` checked to be a ``str`` (``None`` is ``""``)."""
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise LiftTypeError(
            f"{where}(prefix=...) must be a str, got {type(prefix).__name__}: "
            f"{prefix!r}. Pass the string to put in front of every key, e.g. "
            "`prefix='encoder'`."
        )
    return prefix


def check_state(state: Any, where: str) -> None:
    """Refuse a lift state that is not a mapping."""
    if not isinstance(state, Mapping):
        raise LiftTypeError(
            f"{where} takes the lift state dict as its second argument; got "
            f"{type(state).__name__}."
        )


def _join(*sentences: str) -> str:
    return " ".join(s for s in sentences if s)


def take(
    state: Mapping[Any, Any],
    keys: Sequence[StateKey],
    where: str,
    *,
    made_by: str,
    owner: str,
    strict: bool,
) -> list[Any]:
    """The values of ``keys`` in ``state``, in order.

    Args:
        state: a lift state.
        keys: the keys a converted model uses, each once.
        where: the calling function, for the messages.
        made_by: the function that makes such a state (``from_haiku``).
        owner: what holds the keys, for the messages (``the tree``, ```like```).
        strict: a key of ``state`` that is not in ``keys`` is an error.

    Raises:
        LiftKeyError: a key is not in ``state`` (naming the closest one there is).
        LiftValueError: ``state`` has other keys too (with ``strict``).
    """
    values = []
    for key in keys:
        if key not in state:
            raise LiftKeyError(
                _join(
                    f"{where}: no state under {str(key)!r}.",
                    closest(str(key), state),
                    f"Pass the lift state made by `{made_by}` for {owner}.",
                )
            )
        values.append(state[key])
    if strict and len(state) != len(keys):
        used = set(keys)
        extra = [repr(str(k)) for k in state if k not in used]
        raise LiftValueError(
            f"{where}: the state has keys that {owner} does not use "
            f"({', '.join(extra[:3])}). Pass only its state (`lift.filter_state`), "
            "or `strict=False`."
        )
    return values


def _pure(
    state: Mapping[Any, Any],
    keys: Sequence[StateKey],
    call: Callable[[list[Any]], tuple[Any, Sequence[Any]]],
    label: str,
    made_by: str,
) -> tuple[Any, dict[StateKey, Any]]:
    where = f"{label} (in the frame of `lift.stateful`)"
    old = take(state, keys, where, made_by=made_by, owner="this model", strict=False)
    out, new = call(old)
    changed = {
        key: value
        for key, before, value in zip(keys, old, new, strict=True)
        if value is not before
    }
    return out, changed


_run = lower(_pure)


def call_in_frame(
    keys: Sequence[StateKey],
    call: Callable[[list[Any]], tuple[Any, Sequence[Any]]],
    label: str,
    *,
    made_by: str,
) -> Any:
    """``call(values) -> (out, new_values)`` with the innermost frame's values of keys.

    ``new_values`` are in the order of ``keys``; each one that is not the very object
    given is written back (checked like :func:`lift.set`). Returns ``out``. ``label``
    names the caller in messages; ``made_by`` is the function that makes the state.

    Raises:
        FrameError: there is no frame, or a value changed in an immutable one.
        LiftKeyError: the frame has no value for a key.
    """
    if current_frame() is None:
        raise FrameError(
            f"{label} was called outside a frame, so there is no state to use. Call "
            "it inside a function run by `lift.stateful(f)(state, *args)`."
        )
    return _run(keys, call, label, made_by)
