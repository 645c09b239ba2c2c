"""``lift.jit``: :func:`jax.jit` that threads state, and its donation bookkeeping.

A :class:`~lift._lifting.Lifted` like every lifted transform (the general path, which
threads a frame's state and makes non-array leaves static), with one optional layer on
top: at top level, calls whose leaves are all arrays go straight to ``jax.jit``'s C++
dispatch (see :class:`_Jit`).
"""

from __future__ import annotations

import contextvars
import functools
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ._donation import (
    DONATING,
    donated_args,
    donation_starts,
    has_signature,
    raise_if_donated,
    refuse_consumed,
    refuse_missing_positions,
    unshare,
    watch,
)
from ._errors import LiftTypeError
from ._export import State
from ._frame import _FRAME, is_pure, refuse_lazy, state_first
from ._lifting import Lifted, Pure
from ._static import Static, unmask
from ._tracing import is_array, with_cache_miss

__all__ = ["fast_path_enabled", "jit", "use_fast_path"]

# The C++ fast path (see `_Jit`) is one optional layer over the general path. Off with
# LIFT_JIT_FAST_PATH=0 in the environment at import, or `use_fast_path(False)`; either
# way a lifted jit means the same, only its dispatch cost differs.
_FAST_PATH = [os.environ.get("LIFT_JIT_FAST_PATH", "1").strip() not in ("0", "")]


def use_fast_path(enabled: bool) -> bool:
    """Switch ``lift.jit``'s C++ dispatch layer on or off; returns the old setting.

    It applies to ``lift.jit`` functions made afterwards. Off, every call takes the
    general path (lift's Python, then ``jax.jit``): useful to tell a bug of the fast
    layer from one of lift's semantics. The environment variable
    ``LIFT_JIT_FAST_PATH=0``, read at import, starts with it off.

    Examples:
        >>> from lift._jit import use_fast_path
        >>> old = use_fast_path(False)
        >>> use_fast_path(old)
        False
    """
    old = _FAST_PATH[0]
    _FAST_PATH[0] = bool(enabled)
    return old


def fast_path_enabled() -> bool:
    """Whether ``lift.jit`` functions made now get the C++ dispatch layer."""
    return _FAST_PATH[0]


class _Jit(Lifted):
    """``lift.jit``: an ordinary :class:`Lifted`, plus an optional C++ dispatch layer.

    The general path is the combinator's: :meth:`_run` applies ``jax.jit`` to the
    pure function (state in and out, non-array leaves static). Everything below
    ``self._fast`` is the optional layer, off with :func:`use_fast_path`.

    ``self._fast`` is ``jax.jit`` of the function whose slow path (run only when no
    compiled signature matches, with the call's own arguments) is lift's
    :meth:`_miss`. A function made by :func:`lift.stateful` is pure, so there is no
    frame's state to thread: without donation, :func:`jit` hands out ``self._fast``
    itself, a ``jax.jit`` function whose compiled calls run no Python at all.
    Otherwise :func:`jit` hands out this object, whose call is ``self._call``, looked
    up by a C-level property (no Python frame of lift's), one of:

    - :meth:`_checked`: checks in Python first. Inside a frame it takes the general
      path, which threads that frame's state; with ``donate_state`` it refuses a state
      that an earlier call consumed before dispatch (XLA can crash on it).
    - :meth:`_general`: non-array leaves of the arguments and outputs become static
      structure (:class:`~lift._lifting.Lifted`).

    The first call that has a non-array leaf (a str, a function, a Python number) in
    its arguments switches to the general path for good: from then on a miss goes
    there, and only signatures compiled before take the fast path. A non-array leaf
    in the outputs does not: ``_plain`` wraps it as static structure (as the general
    path does) and a signature that has one is not cached in ``self._fast`` (whose
    compiled call could not unwrap it) but in :meth:`_wrapping`'s dispatch, which
    shares ``self._fast``'s trace: the function's body runs once per signature.
    """

    # A property, not a method: `instance(...)` then runs no Python code of lift's.
    __call__ = property(operator.attrgetter("_call"))  # type: ignore[assignment]

    def __init__(
        self,
        f: Callable[..., Any],
        donate_state: bool,
        donated: tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]],
        options: dict,
    ) -> None:
        self._options = options
        self._donate = donate_state
        self._f = f
        self._static = False  # a call had a non-array leaf: misses go general
        # Set when an output had a non-array leaf (see `_miss`).
        self._wrapped: Callable[..., Any] | None = None
        super().__init__((f,), self._run, name="jit")
        # At top level the state is the first argument (of a pure function, or given
        # to be donated); the user's argument positions count from after it.
        self._state_first = int(state_first(f) or donate_state)
        self._top_nums, self._frame_nums, self._names = donated
        self._donates = donate_state or any(donated)
        # Without a signature, donated positions are checked per call (off the
        # compiled path: on a miss and when building); else `jit` checked them.
        self._per_call = any(donated[:2]) and not has_signature(f)
        plain = jax.jit(
            self._plain,
            donate_argnums=self._donated_positions(True, 0, self._state_first),
            donate_argnames=self._names,
            **options,
        )
        self._plain_jit = plain
        self._fast = (
            with_cache_miss(plain, self._miss, like=f) if _FAST_PATH[0] else None
        )
        if self._fast is not None:
            # What `jit` hands out may be `self._fast`: it inspects as this object.
            self._fast.lower = self.lower  # type: ignore[attr-defined]
            self._fast.trace = self.trace  # type: ignore[attr-defined]
            self._fast.eval_shape = self.eval_shape  # type: ignore[attr-defined]
        self._call: Callable[..., Any] = (
            self._general if self._fast is None else self._checked
        )
        if self._donates:
            donation_starts()
        elif self._fast is not None:
            watch(self._fast)

    def _donated_positions(
        self, top: bool, state_at: int, first_arg: int
    ) -> tuple[int, ...]:
        """``jax.jit``'s donated positions, the state at ``state_at``.

        The user's arguments start at ``first_arg``; ``top``: called outside a frame.
        """
        nums = self._top_nums if top else self._frame_nums
        state = (state_at,) if self._donate else ()
        return state + tuple(first_arg + i for i in nums)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit``'s ``lower`` of a top-level call (``jax.stages.Lowered``).

        The program the fast path runs for these arguments, with the same donation:
        ``.compile().memory_analysis()`` and ``.as_text()`` inspect it. Arguments are
        taken as ``jax.jit`` takes them: a Python number is lowered as an argument of
        the program, whereas a call makes it static (compiled in as a constant).

        Raises:
            LiftTypeError: the output has a non-array leaf (a str, a Python number):
                the compiled program returns only arrays, and lift handles
                non-array outputs at call time.
        """
        return self._inspect("lower", args, kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit``'s ``trace`` of a top-level call (``jax.stages.Traced``).

        The first stage of :meth:`lower`, with the same arguments and errors.
        """
        return self._inspect("trace", args, kwargs)

    def eval_shape(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit``'s ``eval_shape`` of a top-level call: its outputs' shapes.

        As :meth:`lower` (same arguments and errors), without compiling.
        """
        return self._inspect("eval_shape", args, kwargs)

    def _inspect(self, stage: str, args: tuple, kwargs: dict) -> Any:
        # `_plain` refuses non-array outputs when it is traced here; a trace that a
        # call cached (with them wrapped, see `_miss`) is refused here.
        result = getattr(self._plain_jit, stage)(*args, **kwargs)
        if stage == "eval_shape":
            out = result
        else:
            out = result.out_tree.unflatten([None] * result.out_tree.num_leaves)
        if _has_static(out):
            raise _non_array_output(self._f)
        return result

    def handed_out(self) -> Callable[..., Any]:
        """What :func:`jit` returns: ``jax.jit``'s own function where it can."""
        if self._fast is not None and is_pure(self._f) and not self._donates:
            return self._fast
        return self

    def _miss(
        self, jax_miss: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[Any, Any, bool]:
        # C++ found no compiled signature for these arguments (the call's own).
        if DONATING[0]:
            refuse_consumed((args, kwargs))
        if self._per_call:
            refuse_missing_positions(
                self._f, self._top_nums, len(args) - self._state_first
            )
        if not self._static and all(
            map(is_array, jax.tree_util.tree_leaves((args, kwargs)))
        ):
            try:
                if self._wrapped is not None:
                    return unmask(self._wrapped(*args, **kwargs)), None, False
                out, fastpath, rebuild = self._traced_miss(jax_miss, *args, **kwargs)
            except (RuntimeError, ValueError) as err:
                raise_if_donated(err, (args, kwargs))
                raise
            if _has_static(out):
                # `_plain` wrapped non-array outputs: the compiled call cannot unwrap
                # them, so nothing is cached for it. From now on a miss runs
                # `_wrapped`, whose C++ dispatch caches what `jax_miss` compiles
                # (JAX's cached trace: the body runs once per signature).
                self._wrapped = self._wrapping(jax_miss)
                return unmask(out), None, False
            if DONATING[0] and not self._donates:
                # Cached in C++, a later call would skip the check above.
                return out, None, False
            return out, fastpath, rebuild
        # A leaf that is not an array: a Python number would be a valid JAX argument,
        # but lift makes it static, as it does strs and functions. `None`: no
        # fast path for this call, so nothing is cached in C++.
        self._static = True
        self._call = self._general
        return self._general(*args, **kwargs), None, False

    def _traced_miss(
        self, jax_miss: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[Any, Any, bool]:
        # JAX's slow path, tracing `_plain` for a call (so it wraps non-array outputs).
        token = _MISSING.set(self)
        try:
            return jax_miss(*args, **kwargs)
        finally:
            _MISSING.reset(token)

    def _wrapping(self, jax_miss: Callable[..., Any]) -> Callable[..., Any]:
        """A C++ dispatch of ``jax_miss``'s programs, for outputs that need unwrapping.

        Its own ``jax.jit`` (of a function no other shares, so its compiled calls are
        cached apart from ``self._fast``'s) never traces: its slow path is
        ``jax_miss``, whose trace cache is ``self._fast``'s.
        """
        inner = jax.jit(
            functools.partial(self._plain),
            donate_argnums=self._donated_positions(True, 0, self._state_first),
            donate_argnames=self._names,
            **self._options,
        )

        def miss(_own_miss: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, bool]:
            return self._traced_miss(jax_miss, *args, **kwargs)

        wrapped = with_cache_miss(inner, miss, like=self._f)
        if wrapped is None:  # pragma: no cover - `self._fast` has the same hook
            return lambda *args, **kwargs: miss(None, *args, **kwargs)[0]
        return wrapped

    def _plain(self, *args: Any, **kwargs: Any) -> Any:
        # Traced by `jax.jit` (or called eagerly under `jax.disable_jit`). The general
        # path's own frameless pure function: non-array outputs come out `Static`.
        out, _ = self._pures[None][0]({}, *args, **kwargs)
        if not _has_static(out):
            return out
        if jax.config.jax_disable_jit:  # type: ignore[attr-defined]
            return unmask(out)
        if _MISSING.get() is not self:
            raise _non_array_output(self._f)  # `lower`, `trace` or `eval_shape`
        return out  # a call's miss: `_miss` unwraps them

    def _run(
        self, pures: Sequence[Pure], state: State, /, *args: Any, **kwargs: Any
    ) -> Any:
        if DONATING[0]:
            refuse_consumed((state, args, kwargs))
        if self._donates:
            state, args, kwargs = unshare((state, args, kwargs))
        fn = pures[0].built(len(args), lambda: self._build(pures[0], len(args)))
        return fn(state, *args, **kwargs)

    def _build(self, pure: Pure, n_args: int) -> Callable[..., Any]:
        # The pure function takes the frame's state first and returns it last; at top
        # level that state is empty and the user's state (if any) is the next
        # argument. The user's options speak of the user's arguments and outputs.
        top = pure.frameless
        if self._per_call:
            refuse_missing_positions(
                self._f,
                self._top_nums if top else self._frame_nums,
                n_args - top * self._state_first,
            )
        options = dict(self._options)
        if "in_shardings" in options:
            given = options["in_shardings"]
            if not isinstance(given, (tuple, list)):
                given = (given,) * n_args
            options["in_shardings"] = (None, *given)
        if "out_shardings" in options:
            options["out_shardings"] = (options["out_shardings"], None)
        return jax.jit(
            pure,
            donate_argnums=self._donated_positions(
                top, int(top), 1 + top * self._state_first
            ),
            donate_argnames=self._names,
            **options,
        )

    def _checked(self, *args: Any, **kwargs: Any) -> Any:
        if _FRAME.get() is not None:
            return self._general(*args, **kwargs)
        if DONATING[0]:
            refuse_consumed((args, kwargs))
        if self._donates:
            args, kwargs = unshare((args, kwargs))
        try:
            return self._fast(*args, **kwargs)  # type: ignore[misc]
        except (RuntimeError, ValueError) as err:
            raise_if_donated(err, (args, kwargs))
            raise

    def _general(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return Lifted.__call__(self, *args, **kwargs)
        except (RuntimeError, ValueError) as err:
            raise_if_donated(err, (args, kwargs))
            raise


# The `_Jit` whose `_miss` is tracing `_plain` (a call, not `lower` or `trace`).
_MISSING: contextvars.ContextVar[_Jit | None] = contextvars.ContextVar(
    "_MISSING", default=None
)


def _name(f: Any) -> str:
    return getattr(f, "__qualname__", type(f).__name__)


def _non_array_output(f: Any) -> LiftTypeError:
    return LiftTypeError(
        f"`lift.jit({_name(f)})`: the output has a non-array leaf (a str, a Python "
        "number...). The compiled program returns only arrays and lift handles "
        "non-array outputs at call time, so `lower`, `trace` and `eval_shape` cannot "
        "show them. Return only arrays to inspect the program."
    )


def _has_static(tree: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: type(x) is Static)
    return any(type(x) is Static for x in leaves)


def jit(
    f: Callable[..., Any] | None = None,
    /,
    *,
    donate_state: bool = False,
    donate_argnums: int | Sequence[int] | None = None,
    donate_argnames: str | Sequence[str] | None = None,
    **jit_kwargs: Any,
) -> Any:
    """:func:`jax.jit` that threads state; non-array leaves of the arguments are static.

    Inside a frame, the frame's state goes in and out of the compiled function. At top
    level it compiles ``f`` as it is, typically a pure ``lift.stateful(step)``, and a
    call whose leaves are all arrays is ``jax.jit``'s own C++ dispatch.

    Args:
        f: the function; ``lift.jit(donate_state=True)`` without it gives a decorator.
        donate_state: donate the state's buffers to the computation: inside a frame the
            frame's state, at top level the first argument. Reusing a donated state is
            an error.
        donate_argnums: positions of the arguments to donate, as in :func:`jax.jit`,
            counting the user's arguments with the state aside: for
            ``lift.jit(lift.stateful(step), donate_argnums=0)`` called as
            ``step(state, params, x)``, position 0 is ``params``. Reusing a donated
            argument is an error.
        donate_argnames: names of the arguments to donate, as in :func:`jax.jit`.
        **jit_kwargs: passed to :func:`jax.jit` (``in_shardings``, ``out_shardings``,
            ``keep_unused``, ...).

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> @lift.jit
        ... @lift.stateful
        ... def step(x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + x)
        ...     return 2 * x
        >>> out, state = step(state, jnp.ones(()))
        >>> out, state[tree["n"]]
        (Array(2., dtype=float32), Array(1., dtype=float32))

        Donating the state and the parameters, as a training step does:

        >>> def train(w, x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + 1)
        ...     return w - x
        >>> update = lift.jit(
        ...     lift.stateful(train), donate_state=True, donate_argnums=0
        ... )
        >>> w = jnp.ones(3)
        >>> new_w, state = update(state, w, jnp.ones(3))
        >>> new_w, w.is_deleted()
        (Array([0., 0., 0.], dtype=float32), True)
    """
    for bad in ("static_argnums", "static_argnames"):
        if bad in jit_kwargs:
            raise LiftTypeError(
                f"`lift.jit` does not take `{bad}`: non-array arguments are static "
                "automatically."
            )

    def make(g: Callable[..., Any]) -> Any:
        # A generator or coroutine function's body would run after tracing, with
        # leaked tracers: refused as `lift.stateful` refuses it.
        try:
            refuse_lazy(g, f"`lift.jit({_name(g)})`", "`lift.jit`")
        except LiftTypeError as err:
            err.add_note(
                "`lift.jit` traces the function once, when it is called: the body of "
                "a generator or coroutine would run later, outside the trace."
            )
            raise
        donated = donated_args(g, donate_argnums, donate_argnames, donate_state)
        return _Jit(g, donate_state, donated, jit_kwargs).handed_out()

    return make if f is None else make(f)
