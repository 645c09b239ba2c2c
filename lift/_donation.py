"""Donation bookkeeping for ``lift.jit``: which arguments, and consumed buffers.

A donated buffer is deleted by the call that consumed it. Passing it again to a
compiled function gives JAX's error, or, for an array that spans several devices,
crashes the process; so every lifted ``jit`` of a program that donates checks its
arguments in Python before dispatch and raises a lift error naming the key or argument.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable
from typing import Any

import jax
from jax.core import Tracer

from ._errors import LiftTypeError, LiftValueError
from ._frame import state_first
from ._keys import StateKey
from ._tracing import is_array

__all__ = [
    "DONATING",
    "donated_args",
    "donation_starts",
    "has_signature",
    "raise_if_donated",
    "refuse_consumed",
    "refuse_missing_positions",
    "unshare",
    "watch",
]


def _deleted_keys(tree: tuple) -> list[str]:
    """Where ``tree`` holds deleted buffers, named for the user.

    ``tree`` is ``(args, kwargs)`` or ``(state, args, kwargs)``: a state entry is named
    by its key, an argument by its position or name.
    """
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not _is_deleted(leaf):
            continue
        # Name a state entry by its key alone, not by where the dict was passed.
        keys = [k.key for k in path if type(getattr(k, "key", None)) is StateKey]
        rest = jax.tree_util.keystr(path[2:])
        if keys:
            found.append(repr(str(keys[-1])))
        elif path[0].idx == len(tree) - 2:  # type: ignore[attr-defined]
            found.append(f"argument {path[1].idx}{rest}")  # type: ignore[attr-defined]
        else:
            found.append(f"argument {path[1].key!r}{rest}")  # type: ignore[attr-defined]
    return list(dict.fromkeys(found))


def _donated_error(args: Any, err: Exception) -> Exception:
    """The clearer error if ``err`` is XLA's about a consumed buffer, else ``err``."""
    if "delete" not in str(err) and "donat" not in str(err):
        return err
    where = _deleted_keys(args)
    if not where:
        return err
    return LiftValueError(
        "A lifted `jit` was called with arrays that an earlier call of a donating "
        "lifted `jit` (`donate_state=True`, `donate_argnums`, `donate_argnames`) "
        f"consumed: deleted buffers at {', '.join(where[:5])}. Use the state and "
        "values that call returned, not the ones you passed in; to keep an old one, "
        "copy it first (`jax.tree.map(jnp.copy, state)`) or do not donate it."
    )


def raise_if_donated(err: Exception, args: Any) -> None:
    """Raise the clearer error if ``err`` is XLA's about a consumed buffer."""
    better = _donated_error(args, err)
    if better is not err:
        raise better from err


def refuse_consumed(tree: tuple) -> None:
    """Raise before dispatch if a donated buffer is reused (XLA may crash on it).

    ``tree`` is ``(args, kwargs)`` or ``(state, args, kwargs)``.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        if _is_deleted(leaf):
            raise _donated_error(tree, RuntimeError("deleted"))


def _is_deleted(leaf: Any) -> bool:
    # A tracer (a lifted jit called while tracing) has no buffer to check.
    is_deleted = getattr(leaf, "is_deleted", None)
    return is_deleted is not None and not isinstance(leaf, Tracer) and is_deleted()


def unshare(tree: Any) -> Any:
    """``tree`` with every array that appears twice in it copied after its first use.

    XLA refuses to donate one buffer twice; one array under two keys (``z`` used for
    two statistics) is legitimate state, so the duplicate gets its own buffer.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    seen: set[int] = set()
    copied = False
    for i, leaf in enumerate(leaves):
        if id(leaf) in seen and is_array(leaf):
            leaves[i] = jax.numpy.copy(leaf)
            copied = True
        seen.add(id(leaf))
    return treedef.unflatten(leaves) if copied else tree


# A consumed array that spans several devices, passed to a compiled `jax.jit`
# function, crashes the process instead of raising; only a check in Python before the
# dispatch prevents it. Until some lifted `jit` donates, no array can have been
# consumed by one, and calls take `jax.jit`'s C++ dispatch unchecked. Once one is
# made, `DONATING[0]` is set and every non-donating lifted `jit` (registered here)
# forgets its C++-cached signatures and stops caching new ones, so each call reaches
# its Python miss handler, which checks the arguments first.
DONATING = [False]
_UNCHECKED: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(fast: Any) -> None:
    """Register the C++ ``jax.jit`` function of a non-donating lifted ``jit``."""
    if not DONATING[0]:
        _UNCHECKED.add(fast)


def donation_starts() -> None:
    """A donating lifted ``jit`` exists: from now on every lifted ``jit`` checks."""
    if DONATING[0]:
        return
    DONATING[0] = True
    for fast in list(_UNCHECKED):
        fast._clear_cache()
    _UNCHECKED.clear()


def donated_args(
    f: Callable[..., Any], argnums: Any, argnames: Any, donate_state: bool
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]:
    """The user's donated argument positions (at top level, in a frame) and names.

    As in :func:`jax.jit`, a position also donates its parameter when passed by name,
    and a name its position, as far as ``f``'s signature tells. Positions count the
    user's arguments, state aside: at top level a function made by
    :func:`lift.stateful` (or any, with ``donate_state``) takes the state first.
    """
    nums = (argnums,) if isinstance(argnums, int) else argnums
    names = (argnames,) if isinstance(argnames, str) else argnames
    try:
        nums = tuple(operator.index(i) for i in nums or ())
        names = tuple(names or ())
    except TypeError:
        nums, names = None, ()
    if nums is None or not all(isinstance(n, str) for n in names):
        raise LiftTypeError(
            "`lift.jit`: `donate_argnums` takes an int or a sequence of ints "
            "(positions of the function's arguments, the state not counted) and "
            "`donate_argnames` a str or a sequence of strs; got "
            f"donate_argnums={argnums!r}, "
            f"donate_argnames={argnames!r}. Donate the state with `donate_state=True`."
        )
    if any(i < 0 for i in nums):
        raise LiftValueError(
            f"`lift.jit`: donate_argnums={argnums!r} has a negative position; give "
            "positions from the first argument on (0, 1, ...), the state not counted."
        )
    params = _parameters(f)
    # At top level a function not taking a state first but donating its state names
    # it as its first parameter; in a frame it has no state parameter.
    skip = int(donate_state and not state_first(f))
    if params is not None:
        _refuse_unknown(f, params, nums, names, skip)
    else:  # no signature: names and positions stay apart
        params = []
    positional = [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    keyword = {
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }

    def resolve(skip: int) -> tuple[tuple[int, ...], set[str]]:
        by_name = positional[skip:]
        more = {by_name.index(n) for n in names if n in by_name}
        named = {by_name[i] for i in nums if i < len(by_name) and by_name[i] in keyword}
        return tuple(sorted({*nums, *more})), named

    top, top_named = resolve(skip)
    frame, frame_named = resolve(0)
    return top, frame, tuple(dict.fromkeys([*names, *top_named, *frame_named]))


def _parameters(f: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """``f``'s parameters, or ``None`` if Python cannot tell them."""
    try:
        return list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        return None


def has_signature(f: Callable[..., Any]) -> bool:
    """Whether ``f``'s donated positions and names were checked when it was wrapped."""
    return _parameters(f) is not None


def _label(f: Callable[..., Any]) -> str:
    return getattr(f, "__qualname__", None) or type(f).__name__


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _refuse_unknown(
    f: Callable[..., Any],
    params: list[inspect.Parameter],
    nums: tuple[int, ...],
    names: tuple[str, ...],
    skip: int,
) -> None:
    """Raise if ``f`` has no argument at a donated position or of a donated name.

    As :func:`jax.jit` does; ``skip``: leading parameters that take the state.
    """
    label = _label(f)
    kinds = {p.kind for p in params}
    own = params[skip:]
    shown = ", ".join(
        ("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "")
        + p.name
        for p in own
    )
    positional = [
        p for p in own if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    bad = sorted({i for i in nums if i >= len(positional)})
    if bad and inspect.Parameter.VAR_POSITIONAL not in kinds:
        fix = (
            f"give positions 0 to {len(positional) - 1} of its own arguments"
            if positional
            else "donate no positions"
        )
        raise LiftValueError(
            f"`lift.jit({label})`: donate_argnums={nums!r} names position "
            f"{', '.join(map(str, bad))}, but `{label}` takes only "
            f"{_plural(len(positional), 'positional argument')} ({shown}), the state "
            f"not counted. Fix `donate_argnums`: {fix}; donate the state with "
            "`donate_state=True`."
        )
    keyword = {
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    unknown = [n for n in dict.fromkeys(names) if n not in keyword]
    if unknown and inspect.Parameter.VAR_KEYWORD not in kinds:
        raise LiftValueError(
            f"`lift.jit({label})`: donate_argnames={names!r} names "
            f"{', '.join(map(repr, unknown))}, which `{label}` does not take: its "
            f"arguments are ({shown}). Fix `donate_argnames`: give names of its "
            "parameters; donate the state with `donate_state=True`."
        )


def refuse_missing_positions(
    f: Callable[..., Any], nums: tuple[int, ...], given: int
) -> None:
    """Raise if a call passes no argument at a donated position.

    For a function without a signature, checked per call (off the compiled path);
    ``given``: the call's positional arguments, the state not counted.
    """
    bad = sorted({i for i in nums if i >= given})
    if bad:
        label = _label(f)
        raise LiftValueError(
            f"`lift.jit({label})`: donate_argnums={nums!r} names position "
            f"{', '.join(map(str, bad))}, but this call passes only "
            f"{_plural(given, 'positional argument')} to `{label}`, the state not "
            "counted. Fix `donate_argnums` or pass the argument; donate the state "
            "with `donate_state=True`."
        )
