"""Errors raised by lift, and the builders of their messages.

Every message says what went wrong, where (the key path), what was expected and what
came, and how to fix it. Long messages are built here so their wording stays consistent.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "FrameError",
    "LiftError",
    "LiftKeyError",
    "LiftTypeError",
    "LiftValueError",
    "StateFileError",
    "StateMismatchError",
    "TraceError",
    "closest",
    "describe",
    "unflattenable",
]


class LiftError(Exception):
    """Base class of every error lift raises.

    Examples:
        >>> import lift
        >>> try:
        ...     lift.get("w")
        ... except lift.LiftError as err:
        ...     print(type(err).__name__)
        FrameError
    """


class LiftTypeError(LiftError, TypeError):
    """The wrong kind of object was given (also a builtin ``TypeError``).

    Examples:
        >>> import lift
        >>> try:
        ...     lift.export_state({}, prefix=3)
        ... except lift.LiftTypeError as err:
        ...     print(isinstance(err, TypeError), "prefix" in str(err))
        True True
    """


class LiftValueError(LiftError, ValueError):
    """An object of the right kind has the wrong structure, shape or dtype.

    Also a builtin ``ValueError``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> try:
        ...     lift.update_state(state, {tree["n"]: jnp.zeros(3)})
        ... except lift.LiftValueError as err:
        ...     print(isinstance(err, ValueError), "['n']" in str(err))
        True True
    """


class LiftKeyError(LiftError, KeyError):
    """A state key is missing; the message names the closest existing path.

    Also a builtin ``KeyError``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"mean": lift.StateEntry(jnp.zeros(()))})
        >>> try:
        ...     lift.update_state(state, {lift.StateKey("['maen']"): jnp.ones(())})
        ... except lift.LiftKeyError as err:
        ...     print(isinstance(err, KeyError), "['mean']" in str(err))
        True True
    """

    def __str__(self) -> str:
        # KeyError quotes its argument; a message reads better unquoted.
        return str(self.args[0]) if self.args else ""


class FrameError(LiftError, RuntimeError):
    """State was read or written where no frame allows it.

    Examples:
        >>> import lift
        >>> try:
        ...     lift.get("w")
        ... except lift.FrameError as err:
        ...     print(str(err).split(",")[0])
        `lift.get('w')` was called outside a frame
    """


class TraceError(LiftError, RuntimeError):
    """State was written under a JAX transform that its frame does not own.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def f(x):  # raw `jax.vmap` writing state: use `lift.vmap` instead
        ...     jax.vmap(lambda v: lift.set(tree["n"], v))(x)
        >>> try:
        ...     lift.stateful(f)(state, jnp.ones(3))
        ... except lift.TraceError:
        ...     print("TraceError")
        TraceError
    """


class StateFileError(LiftValueError):
    """A file is not a readable lift state file: truncated, damaged, or unknown.

    Examples:
        >>> import os, tempfile
        >>> from lift import StateFileError, load_state
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "notes.txt")
        ...     with open(path, "w") as f:
        ...         _ = f.write("not a state")
        ...     try:
        ...         load_state(path)
        ...     except StateFileError as err:
        ...         print("not a readable lift state file" in str(err))
        True
    """


class StateMismatchError(LiftValueError):
    """Loaded state does not match ``like``; ``problems`` lists every difference.

    Attributes:
        problems: ``(path, description)`` pairs, one per problem, in path order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateKey
        >>> from lift import StateMismatchError, from_pure_dict
        >>> like = {StateKey("a"): jnp.zeros(2), StateKey("b"): jnp.zeros(())}
        >>> try:
        ...     from_pure_dict({"a": jnp.zeros(3)}, like=like)
        ... except StateMismatchError as err:
        ...     for problem in err.problems:
        ...         print(problem)
        ('a', 'shape (3,) in the dict, `like` has (2,)')
        ('b', 'in `like` but not in the dict')
    """

    def __init__(self, message: str, problems: list[tuple[str, str]]) -> None:
        """Hold the message and the list of problems."""
        super().__init__(message)
        self.problems = problems

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (across processes), copied and deep-copied with its problems.
        return (type(self), (str(self), self.problems))


# How alike (difflib's ratio, 0 to 1) an existing path must be to be suggested: a
# one-letter typo in a short path scores about 0.9, an unrelated path of similar length
# well under 0.5.
CLOSE = 0.6


def closest(path: str, candidates: Iterable[Any]) -> str:
    """A hint naming an existing path close to ``path``, or ``""`` when none is.

    Only a path that is actually alike is suggested (:data:`CLOSE`); an unrelated one
    would mislead more than it helps.
    """
    names = [str(c) for c in candidates]
    if not names:
        return "The state is empty."
    match = difflib.get_close_matches(path, names, n=1, cutoff=CLOSE)
    return f"The closest existing path is {match[0]!r}." if match else ""


def unflattenable(where: str, key: Any, err: BaseException) -> LiftValueError:
    """The error for a state value JAX cannot flatten (a dict with mixed key types)."""
    return LiftValueError(
        f"{where}: the value of {str(key)!r} cannot be flattened by JAX "
        f"({str(err).rstrip('.')}). A "
        "state value is a pytree of arrays that JAX can flatten: a dict in it needs "
        "keys of one type (all str, for example)."
    )


def describe(value: Any) -> str:
    """A short ``shape dtype`` description of an array-like or pytree of them."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(value)
    parts = []
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            parts.append(type(leaf).__name__)
        else:
            weak = "weak " if getattr(leaf, "weak_type", False) else ""
            parts.append(f"{weak}{dtype}{list(shape)}")
    inner = ", ".join(parts)
    if treedef.num_nodes == 1 and len(leaves) == 1:
        return inner
    return f"{treedef} with leaves ({inner})"
