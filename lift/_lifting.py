"""The one combinator every lifted transform is an instance of.

Lifting a function: implicit state becomes an explicit argument (the current frame's
state dict), non-array leaves of the arguments become static tree structure; then a JAX
transform runs the pure function; then the result is lowered: the new state goes back
into the frame and static outputs are unwrapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from ._errors import LiftTypeError, TraceError
from ._export import State
from ._frame import _FRAME, run_in_frame
from ._keys import StateKey
from ._static import mask, unmask

__all__ = ["Lifted", "Pure", "lift_transform", "refuse_varying_writes"]

# run(pures, state, *args, **kwargs) -> (out, new_state): applies a JAX transform to the
# pure functions `pure(state, *args, **kwargs) -> (out, new_state)` and calls it.
Run = Callable[..., tuple[Any, State]]


class Pure:
    """A lifted function's implicit ``f`` as pure ``(state, *args) -> (out, state)``.

    Arguments arrive with non-array leaves wrapped as static structure and are unwrapped
    before ``f`` sees them; non-array leaves of the output are wrapped on the way out
    (``has_static_out`` remembers that they were, so the caller unwraps them).
    """

    __slots__ = (
        "__weakref__",
        "_built",
        "f",
        "frameless",
        "has_static_out",
        "keep_scalars",
        "mutable",
        "name",
        "why",
    )

    def __init__(
        self,
        f: Callable[..., Any],
        *,
        mutable: bool,
        name: str,
        keep_scalars: bool = False,
        why: str | None = None,
        frameless: bool = False,
    ) -> None:
        self.f = f
        self._built: dict[Hashable, Callable[..., Any]] = {}
        self.frameless = frameless
        self.why = why
        self.keep_scalars = keep_scalars
        self.mutable = mutable
        self.name = name
        self.has_static_out = False

    # The state's parameter has a name no user argument has: `jax.jit(pure,
    # donate_argnames=...)` refuses a donated name that is positional-only here.
    def __call__(
        self, lift_state_: State, /, *args: Any, **kwargs: Any
    ) -> tuple[Any, State]:
        state = lift_state_
        args, kwargs = unmask((args, kwargs))
        if self.frameless:
            # Called outside any frame: `f` gets none either, so its get/set say so.
            out, new = self.f(*args, **kwargs), state
        else:
            out, new = run_in_frame(
                self.f,
                state,
                args,
                kwargs,
                mutable=self.mutable,
                name=self.name,
                why=self.why,
            )
        out, static = mask(
            out, keep_scalars=self.keep_scalars, refuse=self._leaked_tracer
        )
        if static:
            self.has_static_out = True
        return out, new

    def _leaked_tracer(self, value: Any) -> Exception:
        kind = type(value).__qualname__
        return TraceError(
            f"{self.name}: the function returned a {kind} (not a pytree) that holds "
            "traced JAX values; lift would hand it back as a static output with the "
            f"tracers inside, which belong to the finished transform. Make {kind} a "
            "pytree (an Equinox module, a registered dataclass, "
            "`jax.tree_util.register_pytree_node`), or return its arrays."
        )

    def on_carry(self, *args: Any) -> tuple[Any, State]:
        """This function as a loop body over the carry ``(value, state)``.

        The carry is the last argument: ``on_carry(*lead, (value, state))`` is
        ``self(state, *lead, value)``, whose ``(new_value, new_state)`` is the next
        carry. All state rides the loop, including state the body only reads.
        """
        *lead, (value, state) = args
        return self(state, *lead, value)

    def built(
        self, key: Hashable, build: Callable[[], Callable[..., Any]]
    ) -> Callable[..., Any]:
        """The JAX-transformed function for ``key``, built on first use.

        The build cache of every lifted transform: ``jax.jit`` and friends cache
        their traces per function object, so the transformed function is built once
        per pure function and per ``key`` (the options that change the transform,
        such as per-key partition specs). An unhashable ``key`` is built every time.
        """
        try:
            fn = self._built.get(key)
        except TypeError:
            return build()
        if fn is None:
            fn = self._built[key] = build()
        return fn


def refuse_varying_writes(
    leaves: Iterable[tuple[StateKey, Any, Any]],
    varies: Callable[[Any, Any], Any],
    error: Callable[[StateKey, Any, Any, Any], Exception],
) -> None:
    """Refuse a per-example (per-device) value written into state shared by the map.

    The check of every mapping transform: ``leaves`` gives ``(key, leaf, where)`` for
    the new values of shared state, ``varies(leaf, where)`` says how ``leaf`` differs
    across the mapped axis (falsy: it does not), and ``error(key, leaf, where, how)``
    is the error to raise, naming the key.
    """
    for key, leaf, where in leaves:
        how = varies(leaf, where)
        if how:
            raise error(key, leaf, where, how)


class Lifted:
    """An implicit function made by a lifted transform; call it like ``f``.

    Inside a frame it threads that frame's state through the transform; outside any
    frame it runs with no implicit state (so ``f`` may be a pure function taking the
    state explicitly, as made by :func:`lift.stateful`).

    Args:
        fns: the implicit functions (one, or several for branches and loops).
        run: ``run(pures, state, *args, **kwargs) -> (out, new_state)`` applies the
            JAX transform to the pure functions ``pure(state, *args) -> (out, state)``
            (one per function in ``fns``) and calls the result.
        name: the transform's name, for error messages.
        static_args: make non-array leaves of the arguments static.
        keep_scalars: keep Python numbers dynamic (as ``lax`` control flow does).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import lift
        >>> def run(pures, state, /, *args):  # the pure function, under jax.jit
        ...     return jax.jit(pures[0])(state, *args)
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def tick(x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + x)
        ...     return x
        >>> my_jit = lift.Lifted((tick,), run, name="my_jit")
        >>> lift.stateful(my_jit)(state, 1.0)[1][tree["n"]]
        Array(1., dtype=float32)
    """

    def __init__(
        self,
        fns: Sequence[Callable[..., Any]],
        run: Run,
        *,
        name: str,
        static_args: bool = True,
        keep_scalars: bool = False,
    ) -> None:
        for f in fns:
            if not callable(f):
                raise LiftTypeError(
                    f"`lift.{name}` takes callables; got {type(f).__name__}: {f!r}."
                )
        self.fns = tuple(fns)
        self.run = run
        self.name = name
        self.static_args = static_args
        self.keep_scalars = keep_scalars
        label = ", ".join(getattr(f, "__qualname__", type(f).__name__) for f in fns)
        # Keyed by the frame's mutability; `None`: called outside any frame.
        self._pures = {
            m: tuple(
                Pure(
                    f,
                    mutable=m is not False,
                    name=f"`lift.{name}({label})`",
                    keep_scalars=keep_scalars,
                    frameless=m is None,
                )
                for f in self.fns
            )
            for m in (True, False, None)
        }
        if len(self.fns) == 1:
            functools.update_wrapper(self, self.fns[0], updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        frame = _FRAME.get()
        if self.static_args:
            (args, kwargs), _ = mask(
                (args, kwargs), keep_scalars=self.keep_scalars, refuse=self._stale
            )
        if frame is None:
            pures = self._pures[None]
            out, _ = self.run(pures, {}, *args, **kwargs)
        else:
            pures = self._pures[frame.mutable]
            out, new_state = self.run(pures, frame.snapshot(), *args, **kwargs)
            frame.update(new_state, check=False)
        if any(p.has_static_out for p in pures):
            out = unmask(out)
        return out

    def _stale(self, value: Any) -> Exception:
        owner = getattr(value, "__self__", None) if callable(value) else None
        kind = type(value if owner is None else owner).__qualname__
        what = kind if owner is None else f"bound method of a {kind}"
        return LiftTypeError(
            f"`lift.{self.name}`: an argument is a {what} (not a pytree) holding JAX "
            "arrays. lift makes such an argument static and compares it by identity, "
            "so a later change to its arrays would not be seen and the call would "
            f"return a stale result. Make {kind} a pytree (an Equinox module, a "
            "registered dataclass, `jax.tree_util.register_pytree_node`), or pass its "
            "arrays as arguments."
        )

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        # Used as a method decorator: bind like a function.
        if instance is None:
            return self
        return functools.partial(self, instance)


def lift_transform(
    transform: Callable[..., Callable[..., Any]],
) -> Callable[..., Lifted]:
    """Lift a JAX transform (``jax.jit``, ``jax.checkpoint``, ...) to lift's state.

    ``lift_transform(T)(f, *options)`` is an implicit function: called inside a frame,
    it runs ``T(pure, *options)(state, *args)`` where ``pure`` is ``f`` with the frame's
    state as an explicit first argument, and writes the new state back. Non-array
    leaves of the arguments are static. The transforms lift ships (``lift.jit``,
    ``lift.vmap``, ``lift.scan``, ...) are built on the same combinator.

    Args:
        transform: a function ``T(fun, *options, **options) -> transformed fun`` that
            keeps the calling convention of ``fun`` (the state is its first argument).

    Returns:
        The lifted transform.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import lift
        >>> named = lift.lift_transform(jax.named_call)
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def tick(x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + x)
        ...     return x
        >>> lift.stateful(named(tick, name="tick"))(state, 2.0)[1][tree["n"]]
        Array(2., dtype=float32)
    """

    def lifted(f: Callable[..., Any], *options: Any, **kw_options: Any) -> Lifted:
        def run(
            pures: Sequence[Pure], state: State, /, *args: Any, **kwargs: Any
        ) -> Any:
            pure = pures[0]
            fn = pure.built((), lambda: transform(pure, *options, **kw_options))
            return fn(state, *args, **kwargs)

        return Lifted((f,), run, name=getattr(transform, "__name__", "transform"))

    return lifted
