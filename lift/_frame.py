"""Frames: implicit state for the duration of one call.

:func:`stateful` turns a function that reads and writes state with :func:`get` and
:func:`set` into a pure function ``(state, *args) -> (out, state)``; :func:`lower` goes
the other way. The current frame lives in a :class:`contextvars.ContextVar`, so threads
and async tasks never see each other's state.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable, Generator, Mapping
from types import CoroutineType, GeneratorType
from typing import Any, ParamSpec, TypeVar, cast

import jax

from ._errors import FrameError, LiftError, LiftTypeError, LiftValueError
from ._export import State
from ._keys import StateEntry, StateKey
from ._refs import Frame, explain
from ._tracing import TRACE, retire

__all__ = [
    "Frame",
    "current_frame",
    "get",
    "is_pure",
    "lower",
    "refuse_lazy",
    "set",
    "state_first",
    "stateful",
]

P = ParamSpec("P")
R = TypeVar("R")


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
    frame = _FRAME.get()
    # The common case inline: a key, in the trace the frame was made in, no references.
    if (
        frame is not None
        and type(key) is StateKey
        and frame.refs is None
        and TRACE.value is frame.trace
    ):
        try:
            return frame.state[key]
        except KeyError:
            pass
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
    why: str | None = None,
) -> tuple[R, State]:
    """Call ``f(*args, **kwargs)`` once, in a new frame over ``state``.

    The frame closes when ``f`` returns or raises: later get/set through it (from a
    context copied while it ran) raise :class:`FrameError`, and the returned dict is
    never written again.
    """
    frame = Frame(state, mutable=mutable, name=name, why=why)
    token = _FRAME.set(frame)
    try:
        out = f(*args, **kwargs)
        new = frame.close()
    except Exception as err:
        better = (
            None if isinstance(err, LiftError) else explain(err, state, frame, name)
        )
        if better is None:
            raise
        raise better from err
    finally:
        _FRAME.reset(token)
        if frame.refs:  # `f` raised: drop its references as a return would
            for entry in frame.refs.values():
                jax.tree_util.tree_map(retire, entry[0])
        frame.trace = frame.refs = None
    kind = type(out)
    if kind is GeneratorType:
        return cast(R, _in_closed_frame(out, frame)), new
    if kind is CoroutineType:
        return cast(R, _awaited_in_closed_frame(out, frame)), new
    return out, new


async def _awaited_in_closed_frame(coro: Any, frame: Frame) -> Any:
    """``coro``, each step run with its closed frame current, so its get/set raise."""
    return await _Steps(coro, frame)


class _Steps:
    __slots__ = ("coro", "frame")

    def __init__(self, coro: Any, frame: Frame) -> None:
        self.coro = coro
        self.frame = frame

    def __await__(self) -> Generator[Any, Any, Any]:
        return _in_closed_frame(self.coro, self.frame)


def _in_closed_frame(gen: Any, frame: Frame) -> Generator[Any, Any, Any]:
    """``gen`` (a generator or coroutine), resumed with its closed frame current."""

    def step(method: Callable[..., Any], *value: Any) -> Any:
        token = _FRAME.set(frame)
        try:
            return method(*value)
        finally:
            _FRAME.reset(token)

    def proxy() -> Generator[Any, Any, Any]:
        try:
            item = step(gen.send, None)
            while True:
                try:
                    sent = yield item
                except GeneratorExit:
                    step(gen.close)
                    raise
                except BaseException as err:
                    item = step(gen.throw, err)
                else:
                    item = step(gen.send, sent)
        except StopIteration as stop:
            return stop.value

    return proxy()


def stateful(
    f: Callable[P, R], *, mutable: bool = True
) -> Callable[..., tuple[R, State]]:
    """Turn ``f``, which uses :func:`get` and :func:`set`, into a pure function.

    ``stateful(f)(state, *args, **kwargs)`` runs ``f(*args, **kwargs)`` in a frame over
    ``state`` and returns ``(out, new_state)``. The input dict is never mutated; the
    output has exactly its keys, and values that were not written are the same objects.
    ``f`` runs once per call, also when it uses state inside raw JAX loops. The frame
    closes when ``f`` returns: code that runs later through it (an ``asyncio`` task
    created inside ``f``, a generator or coroutine ``f`` returned) gets a
    :class:`FrameError`, and ``new_state`` is never changed afterwards.

    Args:
        f: the implicit function; not a generator or coroutine function, whose body
            would run after the frame has closed.
        mutable: ``False`` is inference mode: reads work, any ``set`` raises.

    Returns:
        The pure function ``(state, *args, **kwargs) -> (out, new_state)``.

    Raises:
        LiftTypeError: ``f`` is not callable, or is a generator or coroutine
            function; when called, the first argument is not a state dict (a model,
            or the state and the model swapped).

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
    refuse_lazy(f, name)

    @functools.wraps(f, updated=())
    def pure(
        state: Mapping[Any, Any] = cast(Any, _NONE), /, *args: Any, **kwargs: Any
    ) -> tuple[R, State]:
        if type(state) is not dict or (
            state and type(next(iter(state))) is not StateKey
        ):
            _check_state_arg(state, name, kwargs)
        return run_in_frame(f, state, args, kwargs, mutable=mutable, name=name)

    pure.__lift_implicit__ = f  # type: ignore[attr-defined]
    pure.__lift_mutable__ = mutable  # type: ignore[attr-defined]
    _PURE.add(pure)
    return pure


def refuse_lazy(f: Any, name: str, who: str = "`lift.stateful`") -> None:
    """Refuse generator and coroutine functions: their bodies run after the call."""
    call = getattr(f, "__call__", None)  # noqa: B004 - a callable object's method
    for what, test in (
        ("a generator function", inspect.isgeneratorfunction),
        ("a coroutine function", inspect.iscoroutinefunction),
        ("an async generator function", inspect.isasyncgenfunction),
    ):
        if test(f) or (not inspect.isroutine(f) and test(call)):
            raise LiftTypeError(
                f"{name}: {who} got {what}. Its body runs only when the result is "
                "iterated or awaited, after the call has returned (and a stateful "
                "call's frame has closed), so it could not use this call's state. "
                "Call `lift.get`/`lift.set` in a regular function, and iterate or "
                "await outside: call a stateful step once per item, e.g. "
                "`for x in data: out, state = step(state, x)`."
            )


def _check_state_arg(state: Any, name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse a first argument that is not a state dict (a model, or no state)."""
    expected = (
        "Call it as `step(state, *args)`, with the state dict from "
        "`model, state = lift.export_state(tree)` first and the model among the "
        "other arguments."
    )
    if state is _NONE:
        given = ", ".join(f"{k}=" for k in kwargs)
        raise LiftTypeError(
            f"{name} was called without a positional argument"
            + (f" (with keyword arguments {given}...)" if kwargs else "")
            + ": the state dict is its first positional argument, never a keyword "
            "one. Call it as `step(state, *args, **kwargs)`, e.g. "
            "`step(state, model=model, x=x)`."
        )
    if not isinstance(state, Mapping):
        raise LiftTypeError(
            f"{name} takes the state dict as its first argument; got "
            f"{type(state).__name__}. {expected}"
        )
    bad = next((k for k in state if type(k) is not StateKey), _NONE)
    if bad is not _NONE:
        raise LiftTypeError(
            f"{name} takes the state dict as its first argument; got a "
            f"{type(state).__name__} with the key {bad!r} ({type(bad).__name__}), not "
            f"a StateKey: a model or another dict was passed in place of the state. "
            f"{expected}"
            + (
                " Its keys look like key paths, as in `lift.to_pure_dict(state)`: turn "
                "such a dict back into state with `lift.from_pure_dict(d, like=state)`."
                if isinstance(bad, str) and bad.startswith(("[", "."))
                else ""
            )
        )
    keys = [
        x
        for x in jax.tree_util.tree_leaves(
            dict(state), is_leaf=lambda x: type(x) in (StateKey, StateEntry)
        )
        if type(x) in (StateKey, StateEntry)
    ]
    if keys:
        raise LiftTypeError(
            f"{name} takes the state dict as its first argument; got a "
            f"{type(state).__name__} whose values hold {type(keys[0]).__name__} "
            f"{str(keys[0])!r}: that is a model (an exported tree), not its state. "
            f"{expected}"
        )


_NONE = object()


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


def state_first(f: Any) -> bool:
    """Whether ``f`` takes a state first, as a :func:`stateful` function does.

    Also true of a wrapper of one that passes its arguments through: a
    ``functools.partial`` binding no positional argument, ``jax.jit``/``lift.jit``,
    anything that sets ``__wrapped__``.
    """
    for _ in range(32):  # a chain of wrappers, not a cycle
        if is_pure(f):
            return True
        if isinstance(f, functools.partial):
            if f.args:
                return False
            f = f.func
        else:
            f = getattr(f, "__wrapped__", None)
            if f is None:
                return False
    return False


def unpack(
    result: Any, state_type: type | tuple[type, ...], label: str, *, must: str, fix: str
) -> tuple[Any, Any]:
    """``(out, state)`` from what a pure function (or a converter's library) returned.

    Raises:
        LiftValueError: ``result`` is not a pair whose second item is a
            ``state_type``; the message is ``{label}: {must}; ... {fix}``.
    """
    if not (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[1], state_type)
    ):
        raise LiftValueError(
            f"{label}: {must}; it returned {type(result).__name__}. {fix}"
        )
    return result


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
        out, new = unpack(
            g(frame.snapshot(), *args, **kwargs),
            Mapping,
            f"`lift.lower({getattr(g, '__qualname__', 'g')})`",
            must="the function must return `(out, state)` with a state dict",
            fix="Return the updated state as the second item.",
        )
        frame.update(new, check=True)
        return out

    return implicit
