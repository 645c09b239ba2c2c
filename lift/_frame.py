"""Frames: implicit state for the duration of one call.

:func:`stateful` turns a function that reads and writes state with :func:`get` and
:func:`set` into a pure function ``(state, *args) -> (out, state)``; :func:`lower` goes
the other way. The current frame lives in a :class:`contextvars.ContextVar`, so threads
and async tasks never see each other's state.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import jax

from ._errors import (
    FrameError,
    LiftKeyError,
    LiftTypeError,
    LiftValueError,
    TraceError,
    closest,
)
from ._export import State, check_value
from ._keys import StateEntry, StateKey
from ._tracing import dead_tracer, get_opaque_trace_state

__all__ = ["Frame", "current_frame", "get", "is_pure", "lower", "set", "stateful"]

P = ParamSpec("P")
R = TypeVar("R")


class _NeedRefs(BaseException):
    """Raised inside a foreign trace to restart a frame with array references.

    A ``BaseException``, so that user code catching ``Exception`` does not swallow it.
    """

    def __init__(self, frame: Frame) -> None:
        super().__init__()
        self.frame = frame


class Frame:
    """The state of one :func:`stateful` call, read and written by get/set."""

    __slots__ = ("mutable", "name", "refs", "state", "trace", "why")

    def __init__(
        self,
        state: Mapping[Any, Any],
        *,
        mutable: bool,
        name: str,
        refs: bool = False,
        why: str | None = None,
    ) -> None:
        self.state: State = dict(state)
        self.mutable = mutable
        # Why the frame is read-only, for the error; inference mode by default.
        self.why = why or (
            "it was made by `stateful(..., mutable=False)` (inference mode), where "
            "state is read-only. Use `mutable=True` to update state."
        )
        self.name = name
        self.trace = get_opaque_trace_state()
        # In reference mode every value lives in a JAX array reference created in the
        # frame's own trace, so loops that lift does not own (a raw `lax.scan` in a
        # solver) can read and write it and JAX threads it through them.
        self.refs: dict[Any, Any] | None = None
        if refs:
            self.refs = {
                k: jax.tree_util.tree_map(jax.new_ref, v) for k, v in self.state.items()
            }

    def _missing(self, key: Any, what: str) -> LiftKeyError:
        return LiftKeyError(
            f"`lift.{what}({key!r})`: no state under {str(key)!r} in this frame "
            f"({self.name}). {closest(str(key), self.state)} Pass the state returned "
            "by `export_state` for the tree whose keys you use."
        )

    def read(self, key: Any) -> Any:
        if self.refs is not None:
            refs = self.refs.get(key)
            if refs is None:
                raise self._missing(key, "get")
            return jax.tree_util.tree_map(lambda r: r[...], refs)
        try:
            return self.state[key]
        except (KeyError, TypeError):
            raise self._missing(key, "get") from None

    def write(self, key: Any, value: Any) -> None:
        """A checked write, as done by :func:`set`."""
        if not self.mutable:
            raise FrameError(
                f"`lift.set({key!r}, ...)` in an immutable frame ({self.name}): "
                f"{self.why}"
            )
        if key not in self.state:
            raise self._missing(key, "set")
        value = check_value(
            key, self.state[key], value, where=f"`lift.set({key!r}, ...)`"
        )
        for leaf in jax.tree_util.tree_leaves(value):
            if dead_tracer(leaf):
                raise TraceError(
                    f"`lift.set({key!r}, ...)` got a tracer of a JAX transform that "
                    "has already finished: the value escaped the transform that "
                    "computed it and is meaningless now. Compute the value inside the "
                    "same transform as the `set`, and use lift's transforms "
                    "(`lift.vmap`, `lift.scan`, ...) so state flows out of them."
                )
        self.store(key, value)

    def store(self, key: Any, value: Any) -> None:
        """An unchecked write of a value already known to fit."""
        if self.refs is not None:
            refs = self.refs[key]
            try:
                jax.tree_util.tree_map(_assign, refs, value)
            except Exception as err:
                raise _foreign_write(key, err) from err
            return
        if get_opaque_trace_state() != self.trace:
            raise _NeedRefs(self)
        self.state[key] = value

    def snapshot(self) -> State:
        """The current values of all keys, as a new dict."""
        if self.refs is not None:
            return {
                k: jax.tree_util.tree_map(lambda r: r[...], v)
                for k, v in self.refs.items()
            }
        return dict(self.state)

    def update(self, new: Mapping[Any, Any], *, check: bool) -> None:
        """Write many values (the results of a lifted transform or a lowered call)."""
        if not check and self.refs is None:
            if get_opaque_trace_state() != self.trace:
                raise _NeedRefs(self)
            self.state.update(new)
            return
        for key, value in new.items():
            if check:
                if key not in self.state:
                    raise LiftKeyError(
                        f"A lowered function returned state under {str(key)!r}, which "
                        f"this frame ({self.name}) does not have; state is never added "
                        "silently. Merge the new entry into the state passed to "
                        "`stateful` (`merge_states`)."
                    )
                if value is self.state[key] and self.refs is None:
                    continue
                self.write(key, value)
            else:
                self.store(key, value)


def _assign(ref: Any, value: Any) -> None:
    ref[...] = value


def _foreign_write(key: Any, err: Exception) -> TraceError:
    return TraceError(
        f"`lift.set({key!r}, ...)` got a value traced by a JAX transform that this "
        f"frame does not own (JAX said: {str(err).splitlines()[0]}), so the update "
        "would be lost. Use lift's transform instead of jax's: `lift.vmap` (with "
        "`state_axes=` for per-example state, or `axis_name=` and `lax.pmean` for "
        "shared state) instead of `jax.vmap`, `lift.scan` instead of `lax.scan`."
    )


_FRAME: contextvars.ContextVar[Frame | None] = contextvars.ContextVar(
    "lift_frame", default=None
)


def current_frame() -> Frame | None:
    """The innermost frame of this thread or task, or ``None``."""
    return _FRAME.get()


def _frame_or_raise(what: str, key: Any) -> Frame:
    frame = _FRAME.get()
    if frame is None:
        raise FrameError(
            f"`lift.{what}({key!r}{', ...' if what == 'set' else ''})` was called "
            "outside a frame, so there is no state to use. Call the function through "
            "`lift.stateful(f)(state, *args)` (or a lifted transform inside one)."
        )
    return frame


def _check_key(key: Any, what: str) -> None:
    if isinstance(key, str):
        return
    if isinstance(key, StateEntry):
        raise LiftTypeError(
            f"`lift.{what}` got a StateEntry, not a StateKey: the tree was not "
            "exported. Call `tree, state = lift.export_state(tree)` and pass `tree` "
            "(whose entries are now keys) to your function."
        )
    raise LiftTypeError(
        f"`lift.{what}` takes a StateKey (or its path string); got "
        f"{type(key).__name__}: {key!r}. Pass a key from the tree that "
        "`lift.export_state` returned, e.g. `lift.get(tree['bn']['mean'])`."
    )


def get(key: StateKey | str) -> Any:
    """The current value of ``key`` in the innermost frame.

    Raises:
        FrameError: called outside a frame.
        LiftKeyError: the frame has no such key.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"count": lift.StateEntry(jnp.zeros(()))})
        >>> lift.stateful(lambda: lift.get(tree["count"]) + 1)(state)[0]
        Array(1., dtype=float32)
    """
    if type(key) is not StateKey:
        _check_key(key, "get")
    return _frame_or_raise("get", key).read(key)


def set(key: StateKey | str, value: Any) -> None:
    """Write ``value`` as the new value of ``key`` in the innermost frame.

    The value must have the pytree structure, shapes and dtypes of the current one
    (Python scalars are cast to the state's dtype).

    Raises:
        FrameError: called outside a frame, or in an immutable one.
        LiftKeyError: the frame has no such key.
        LiftValueError: the value changes structure, shape or dtype.
        TraceError: the value is traced by a transform the frame does not own.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"count": lift.StateEntry(jnp.zeros(()))})
        >>> def tick():
        ...     lift.set(tree["count"], lift.get(tree["count"]) + 1)
        >>> _, state = lift.stateful(tick)(state)
        >>> state[tree["count"]]
        Array(1., dtype=float32)
    """
    if type(key) is not StateKey:
        _check_key(key, "set")
    _frame_or_raise("set", key).write(key, value)


def run_in_frame(
    f: Callable[..., R],
    state: Mapping[Any, Any],
    args: Any,
    kwargs: Any,
    *,
    mutable: bool,
    name: str,
    refs: list[bool],
    why: str | None = None,
) -> tuple[R, State]:
    """Call ``f(*args, **kwargs)`` in a new frame over ``state``.

    ``refs`` is a one-element cell: once a call of ``f`` needed array references (it
    wrote state inside a transform lift does not own), later calls start with them.
    """
    while True:
        frame = Frame(state, mutable=mutable, name=name, refs=refs[0], why=why)
        token = _FRAME.set(frame)
        try:
            out = f(*args, **kwargs)
            return out, frame.snapshot() if frame.refs is not None else frame.state
        except _NeedRefs as need:
            if need.frame is not frame or refs[0]:
                raise
            refs[0] = True
        finally:
            _FRAME.reset(token)


def stateful(
    f: Callable[P, R], *, mutable: bool = True
) -> Callable[..., tuple[R, State]]:
    """Turn ``f``, which uses :func:`get` and :func:`set`, into a pure function.

    ``stateful(f)(state, *args, **kwargs)`` runs ``f(*args, **kwargs)`` in a frame over
    ``state`` and returns ``(out, new_state)``. The input dict is never mutated; the
    output has exactly its keys, and values that were not written are the same objects.

    Args:
        f: the implicit function.
        mutable: ``False`` is inference mode: reads work, any ``set`` raises.

    Returns:
        The pure function ``(state, *args, **kwargs) -> (out, new_state)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree = {"n": lift.StateEntry(jnp.zeros((), "int32"))}
        >>> model, state = lift.export_state(tree)
        >>> def count(x):
        ...     lift.set(model["n"], lift.get(model["n"]) + 1)
        ...     return 2 * x
        >>> out, new_state = lift.stateful(count)(state, 3.0)
        >>> out, int(new_state[model["n"]]), int(state[model["n"]])
        (6.0, 1, 0)
    """
    if not callable(f):
        raise LiftTypeError(
            f"`lift.stateful` takes a callable; got {type(f).__name__}."
        )
    name = f"`stateful({getattr(f, '__qualname__', type(f).__name__)})`"
    refs = [False]

    @functools.wraps(f, updated=())
    def pure(state: Mapping[Any, Any], /, *args: Any, **kwargs: Any) -> tuple[R, State]:
        if not isinstance(state, Mapping):
            raise LiftTypeError(
                f"{name} takes the state dict as its first argument; got "
                f"{type(state).__name__}. Call it as `pure(state, *args)` with the "
                "state from `export_state`."
            )
        return run_in_frame(
            f, state, args, kwargs, mutable=mutable, name=name, refs=refs
        )

    pure.__lift_implicit__ = f  # type: ignore[attr-defined]
    pure.__lift_mutable__ = mutable  # type: ignore[attr-defined]
    _PURE.add(pure)
    return pure


# The functions `stateful` made. Membership, not an attribute: `functools.wraps` copies
# attributes onto wrappers that may well use an enclosing frame's state.
_PURE: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def is_pure(f: Any) -> bool:
    """Whether ``f`` was made by :func:`stateful`: it uses no enclosing frame's state.

    Its ``get`` and ``set`` go to the frame it makes itself, so a lifted transform of
    it has no implicit state to thread.
    """
    try:
        return f in _PURE
    except TypeError:  # not weakly referenceable
        return False


def lower(g: Callable[..., tuple[R, Mapping[Any, Any]]]) -> Callable[..., R]:
    """Turn a pure ``(state, *args) -> (out, state)`` into implicit ``(*args) -> out``.

    The lowered function reads the innermost frame's state, passes it to ``g`` and
    writes back what ``g`` returns (each value checked as by :func:`set`).
    ``lower(stateful(f))`` behaves like ``f``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def pure_tick(state, x):
        ...     return x, {**state, tree["n"]: state[tree["n"]] + x}
        >>> lift.stateful(lift.lower(pure_tick))(state, 2.0)[1][tree["n"]]
        Array(2., dtype=float32)
    """
    inner = getattr(g, "__lift_implicit__", None)
    if inner is not None and getattr(g, "__lift_mutable__", False):
        return inner

    @functools.wraps(g, updated=())
    def implicit(*args: Any, **kwargs: Any) -> R:
        frame = _frame_or_raise("lower", getattr(g, "__qualname__", "g"))
        result = g(frame.snapshot(), *args, **kwargs)
        if not (
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[1], Mapping)
        ):
            raise LiftValueError(
                f"`lift.lower({getattr(g, '__qualname__', 'g')})`: the function must "
                "return `(out, state)` with a state dict; got "
                f"{type(result).__name__}. Return the updated state as the second item."
            )
        out, new = result
        frame.update(new, check=True)
        return out

    return implicit
