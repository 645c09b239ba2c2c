"""A frame's state, and the array references that carry it through foreign traces.

A :class:`Frame` holds the state of one ``stateful`` call. In the JAX trace it was made
in, values are plain entries of a dict. Code that runs under a trace lift does not own
(a raw ``lax.scan`` body, a raw ``jax.jit``, a solver's loop) reaches a key through a
JAX array reference made lazily in the frame's own trace, which JAX threads through its
transforms; back in the frame's trace the reference is read back. The user's function
runs once per call either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.core import Tracer

from ._errors import FrameError, LiftKeyError, LiftValueError, TraceError, closest
from ._export import State, check_value
from ._tracing import RETIRED, TRACE, foreign_kind, in_trace, retire, shared_in_vmap

__all__ = ["Frame", "cached_reference", "shared_write_in_vmap"]


class Frame:
    """The state of one :func:`stateful` call, read and written by get/set.

    Inside the JAX trace the frame was made in, values live in ``state``. A get or set
    under another trace (a raw ``lax.scan`` body, a raw ``jax.jit``, a solver's loop)
    moves that key into a JAX array reference made in the frame's own trace; JAX
    threads references through its transforms, so every iteration reads what the
    previous one wrote. Back in the frame's trace, references are read back into
    ``state``. ``trace`` is ``None`` once the call has returned (the frame is closed).
    """

    __slots__ = ("detached", "mutable", "name", "refs", "state", "trace", "why")

    def __init__(
        self,
        state: Mapping[Any, Any],
        *,
        mutable: bool,
        name: str,
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
        self.trace: Any = TRACE.value
        # key -> [tree of references, written?], made on first use in another trace.
        self.refs: dict[Any, list[Any]] | None = None
        # Keys read, since the frame's trace last ran, where a later write in a
        # foreign trace would not be seen (inside a function JAX traces apart, such
        # as a custom_jvp's, or a raw while_loop's condition) -> where; such a write
        # is refused.
        self.detached: dict[Any, str] | None = None

    def _missing(self, key: Any, what: str) -> LiftKeyError:
        return LiftKeyError(
            f"`lift.{what}({key!r})`: no state under {str(key)!r} in this frame "
            f"({self.name}). {closest(str(key), self.state)} Pass the state returned "
            "by `export_state` for the tree whose keys you use."
        )

    def _closed(self, key: Any, what: str) -> FrameError:
        return FrameError(
            f"`lift.{what}({key!r}{', ...' if what == 'set' else ''})` used the frame "
            f"of {self.name}, which has returned: the code runs after that call, in "
            "a context copied while it ran (an `asyncio` task created inside it, "
            "`contextvars.copy_context()`) or in a generator or coroutine it "
            "returned. The call's state is in the dict it returned and is never "
            "changed afterwards. Give that code its own frame: call a "
            "`lift.stateful` step with the returned state."
        )

    def read(self, key: Any) -> Any:
        if self.refs is None and TRACE.value is self.trace:
            try:
                return self.state[key]
            except (KeyError, TypeError):
                raise self._missing(key, "get") from None
        return self._read_slow(key)

    def _read_slow(self, key: Any) -> Any:
        if self.trace is None:
            raise self._closed(key, "get")
        try:
            value = self.state[key]
        except (KeyError, TypeError):
            raise self._missing(key, "get") from None
        if TRACE.value is self.trace:
            self.detached = None
            self._settle(key)
            return self.state[key]
        if not self.mutable:  # nothing can change: the value is a constant
            return value
        kind = foreign_kind(self.trace)
        if kind == "detached" and (self.refs is None or key not in self.refs):
            self._watch(key, kind)
            return value  # JAX closes over it, as over any outer value
        if kind == "while_cond":
            self._watch(key, kind)
        return jax.tree_util.tree_map(_deref, self._ref(key, "get")[0])

    def _watch(self, key: Any, where: str) -> None:
        """Refuse a later foreign write of ``key`` until the frame's trace runs."""
        if self.detached is None:
            self.detached = {}
        self.detached[key] = where
        if self.refs is None:
            self.refs = {}  # so that the frame's trace takes the slow path and clears

    def write(self, key: Any, value: Any) -> None:
        """A checked write, as done by :func:`set`."""
        if self.trace is None:
            raise self._closed(key, "set")
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
        self.store(key, value)

    def store(self, key: Any, value: Any) -> None:
        """An unchecked write of a value already known to fit."""
        if self.refs is None and TRACE.value is self.trace:
            self.state[key] = value
            return
        if self.trace is None:
            raise self._closed(key, "set")
        if TRACE.value is self.trace:
            self.detached = None
            self._settle(key, keep=False)
            self.state[key] = value
            return
        kind = foreign_kind(self.trace)
        if kind in (None, "while_cond"):
            kind = None
            if self.detached is not None and key in self.detached:
                kind = "stale " + self.detached[key]
        if kind is not None:
            raise _unthreadable(key, "set", kind)
        if any(
            shared_in_vmap(leaf, self.trace)
            for leaf in jax.tree_util.tree_leaves(self.state[key])
        ):
            raise shared_write_in_vmap(key)
        entry = self._ref(key, "set")
        try:
            jax.tree_util.tree_map(_assign, entry[0], value)
        except Exception as err:
            raise _foreign_write(key, err) from err
        entry[1] = True

    def _ref(self, key: Any, what: str) -> list[Any]:
        """The reference entry of ``key``, made in the frame's trace on first use."""
        refs = self.refs
        if refs is None:
            refs = self.refs = {}
        kind = foreign_kind(self.trace)
        if kind in ("detached", "checkpoint"):
            raise _unthreadable(key, what, kind)
        entry = refs.get(key)
        if entry is None:
            with in_trace(self.trace):
                made = jax.tree_util.tree_map(jax.new_ref, self.state[key])
            entry = refs[key] = [made, False]
        return entry

    def _settle(self, key: Any, *, keep: bool = True) -> None:
        """Back in the frame's trace: read ``key``'s reference back into ``state``."""
        refs = self.refs
        if refs is None:
            return
        entry = refs.pop(key, None)
        if entry is not None:
            if entry[1] and keep:
                self.state[key] = jax.tree_util.tree_map(_deref, entry[0])
            jax.tree_util.tree_map(retire, entry[0])
        if not refs:
            self.refs = None

    def snapshot(self) -> State:
        """The current values of all keys, as a new dict."""
        if self.refs is None and TRACE.value is self.trace:
            return dict(self.state)
        if self.trace is None:
            raise self._closed(next(iter(self.state), "..."), "get")
        if TRACE.value is self.trace:
            self.detached = None
            for key in list(self.refs or ()):
                self._settle(key)
            self.refs = None
            return dict(self.state)
        if not self.mutable:
            return dict(self.state)
        return {
            k: jax.tree_util.tree_map(_deref, self._ref(k, "get")[0])
            for k in self.state
        }

    def update(self, new: Mapping[Any, Any], *, check: bool) -> None:
        """Write many values (the results of a lifted transform or a lowered call)."""
        if not check:
            if self.refs is None and TRACE.value is self.trace:
                self.state.update(new)
                return
            if not self.mutable and self.trace is not None:
                return  # a read-only frame's transforms returned its values unchanged
        for key, value in new.items():
            if check:
                if key not in self.state:
                    raise LiftKeyError(
                        f"A lowered function returned state under {str(key)!r}, which "
                        f"this frame ({self.name}) does not have; state is never added "
                        "silently. Merge the new entry into the state passed to "
                        "`stateful` (`merge_states`)."
                    )
                if value is self.state[key] and (
                    self.refs is None or key not in self.refs
                ):
                    continue
                self.write(key, value)
            else:
                self.store(key, value)

    def close(self) -> State:
        """End the call: settle references and refuse any later get/set."""
        out = self.snapshot() if self.refs is not None else self.state
        self.trace = None
        self.refs = self.detached = None
        return out


def _deref(ref: Any) -> Any:
    return ref[...]


def _assign(ref: Any, value: Any) -> None:
    ref[...] = value


def _foreign_write(key: Any, err: Exception) -> TraceError:
    if "vmap" in str(err):
        return TraceError(
            f"`lift.set({key!r}, ...)` got a value batched by a raw `jax.vmap`: one "
            "shared state entry cannot hold a different value per example, so the "
            "update would be lost. Use `lift.vmap` instead of `jax.vmap`, with "
            "`state_axes=` for per-example state, or with `axis_name=` and "
            "`lax.pmean` (averaging over the batch) for shared state."
        )
    if "differentiated" in str(err):
        return TraceError(
            f"`lift.set({key!r}, ...)` got a value differentiated by a raw `jax.grad` "
            "(or `jax.jvp`, `jax.vjp`) around the `set`: state is never "
            "differentiated, and this frame's state lives outside that transform. "
            "Use `lift.grad`/`lift.value_and_grad`, which thread state as auxiliary "
            "output, or store `lax.stop_gradient(value)`."
        )
    return TraceError(
        f"`lift.set({key!r}, ...)` got a value that this frame's state cannot take "
        f"inside a JAX transform lift does not own ({type(err).__name__}: "
        f"{str(err).split('. ')[0]}). Use lift's transform in its place (`lift.vmap`, "
        "`lift.grad`, `lift.checkpoint`, ...), so the state flows through it."
    )


def shared_write_in_vmap(key: Any | None) -> TraceError:
    """A write of state shared by a ``vmap``'s batch, under a loop lift does not own."""
    what = f"`lift.set({key!r}, ...)`" if key is not None else "A `lift.set`"
    return TraceError(
        f"{what} inside a raw `lax.scan`/`fori_loop`/`while_loop` (or another JAX "
        "transform lift does not own) under `lift.vmap` or `jax.vmap`, where that "
        "state is shared by the batch: JAX batches the state it threads through a raw "
        "loop under vmap, so the shared state cannot be threaded through it. Use "
        "`lift.fori_loop`/`lift.scan`/`lift.while_loop` in place of the raw loop, "
        "inside `lift.vmap` (in place of `jax.vmap`); they carry the state through "
        "the loop. A per-example update then needs `state_axes=` (per-example "
        "state) or `axis_name=` and `lax.pmean` (shared state) on `lift.vmap`."
    )


def cached_reference(name: str, err: Exception) -> TraceError:
    return TraceError(
        f"{name}: JAX ran a function it had compiled before (JAX said: "
        f"{str(err).splitlines()[0]}). A raw `jax.jit` (or another cached JAX "
        "function) that uses `lift.get`/`lift.set` keeps the state it saw when it "
        "was first traced, and that is gone: an earlier call has returned, or this "
        "call moved the state on (a `lift.set` outside it) before calling it again. "
        "JAX reuses the compiled code for the same Python function, even through a "
        "new `jax.jit(f)` (and the traced body of a raw `lax` loop). Use `lift.jit` "
        "in its place (for a loop, "
        "`lift.scan`/`lift.fori_loop`/`lift.while_loop`); it threads each call's "
        "state."
    )


def _unthreadable(key: Any, what: str, kind: str) -> TraceError:
    call = f"`lift.{what}({key!r}{', ...' if what == 'set' else ''})`"
    if kind == "stale while_cond":
        return TraceError(
            f"{call} in the body of a raw `lax.while_loop` whose condition reads "
            f"{str(key)!r}: JAX 0.10.2 gives the condition that state's value from "
            "loop entry, never the body's writes, so the loop would not see them. "
            "Use `lift.while_loop`, whose condition reads the carried state, or make "
            "the condition depend on the loop's carry instead of on state."
        )
    if kind.startswith("stale"):
        return TraceError(
            f"{call} under a JAX transform lift does not own (a raw loop body, "
            f"...), after `lift.get({key!r})` read it inside a `jax.custom_jvp` or "
            "`jax.custom_vjp` function, which JAX traces apart: in a loop, that read "
            "would keep seeing the value from before the loop. Read the state "
            "before calling that function and pass it in as an argument."
        )
    if kind == "checkpoint":
        return TraceError(
            f"{call} inside a raw `jax.checkpoint` under differentiation: JAX would "
            "replay the state's writes when it recomputes the checkpoint, or cannot "
            "differentiate it at all. Use `lift.checkpoint` instead of "
            "`jax.checkpoint`; it threads the state through the checkpoint."
        )
    return TraceError(
        f"{call} inside a function that JAX traces apart from the frame's "
        "computation, so the state cannot flow in or out of it: the body of a raw "
        "`jax.shard_map` or `jax.pmap`, or the function of a `jax.custom_jvp`/"
        "`custom_vjp` under a transform. Use `lift.shard_map`/`lift.pmap` in place "
        "of `jax.shard_map`/`jax.pmap`. For a custom "
        "derivative, read the state before calling the function and pass it in as an "
        "argument; return the new value and `lift.set` it after the call."
    )


def explain(
    err: Exception, state: Mapping[Any, Any], frame: Frame, name: str
) -> Exception | None:
    """A lift error for what JAX raised out of the user's function, if lift knows why.

    ``None`` leaves the exception as it is.
    """
    text = str(err)
    # JAX says "Array has been deleted", or from a compiled primitive "Buffer has
    # been deleted or donated".
    if "has been deleted" in text and isinstance(err, (RuntimeError, ValueError)):
        consumed = _consumed_keys(state)
        if consumed:
            return LiftValueError(
                f"{name} was called with a state whose arrays were consumed (a "
                "donating lifted `jit` deleted them): deleted buffers at "
                f"{', '.join(consumed[:5])}. Pass the state that donating step "
                "returned, not the one you gave it; to keep an old one, copy it "
                "first (`jax.tree.map(jnp.copy, state)`) or do not donate it."
            )
        if RETIRED[0] and isinstance(err, RuntimeError):
            return cached_reference(name, err)
        return None
    if "vmapped value on an unbatched array reference" in text:
        # A raw `jax.vmap` batched a raw loop that writes state through a reference
        # made outside it: name the key written.
        written = [k for k, entry in (frame.refs or {}).items() if entry[1]]
        return shared_write_in_vmap(written[0] if written else None)
    if _CACHED_TRACER in text.replace("\n", " "):
        # Under a vmap, a raw loop body JAX traced in an earlier call closes over that
        # call's reference, now a tracer of a finished trace.
        return cached_reference(name, err)
    return None


# What JAX says when code it cached closes over a reference from a finished trace.
_CACHED_TRACER = "allowing for a reference to an intermediate value with type Ref{"


def _consumed_keys(state: Mapping[Any, Any]) -> list[str]:
    """The keys of ``state`` (repr) holding an array a donating call deleted."""
    return [
        repr(str(key))
        for key, value in state.items()
        if any(
            isinstance(leaf, jax.Array)
            and not isinstance(leaf, Tracer)
            and leaf.is_deleted()
            for leaf in jax.tree_util.tree_leaves(value)
        )
    ]
