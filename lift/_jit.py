"""``lift.jit``: :func:`jax.jit` that threads state, and its donation bookkeeping.

A :class:`~lift._lifting.Lifted` like every lifted transform (the general path, which
threads a frame's state and makes non-array leaves static), with one optional layer on
top: at top level, calls whose leaves are all arrays go straight to ``jax.jit``'s C++
dispatch (see :class:`_Jit`).
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.core import Tracer

from ._errors import LiftTypeError, LiftValueError
from ._export import State
from ._frame import _FRAME, is_pure
from ._keys import StateKey
from ._lifting import Lifted, Pure
from ._tracing import is_array, with_cache_miss

__all__ = ["jit"]


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


def _raise_if_donated(err: Exception, args: Any) -> None:
    """Raise the clearer error if ``err`` is XLA's about a consumed buffer."""
    better = _donated_error(args, err)
    if better is not err:
        raise better from err


def _refuse_consumed(tree: tuple) -> None:
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


def _unshare(tree: Any) -> Any:
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
# made, `_DONATING[0]` is set and every non-donating lifted `jit` (registered here)
# forgets its C++-cached signatures and stops caching new ones, so each call reaches
# its Python miss handler, which checks the arguments first.
_DONATING = [False]
_UNCHECKED: weakref.WeakSet[_Jit] = weakref.WeakSet()


def _donation_starts() -> None:
    if _DONATING[0]:
        return
    _DONATING[0] = True
    for jitted in list(_UNCHECKED):
        if jitted._fast is not None:
            jitted._fast._clear_cache()  # type: ignore[attr-defined]
    _UNCHECKED.clear()


class _Jit(Lifted):
    """``lift.jit``: calls go straight to ``jax.jit``'s C++ dispatch where they can.

    ``self._fast`` is ``jax.jit`` of the function whose slow path (run only when no
    compiled signature matches, with the call's own arguments) is lift's
    :meth:`_miss`. A function made by :func:`lift.stateful` is pure, so there is no
    frame's state to thread: without donation, :func:`jit` hands out ``self._fast``
    itself, a ``jax.jit`` function whose calls cost what ``jax.jit`` calls cost.
    Otherwise :func:`jit` hands out this object, whose call is ``self._call``, looked
    up by a C-level property (no Python frame of lift's), one of:

    - :meth:`_checked`: checks in Python first. Inside a frame it takes the general
      path, which threads that frame's state; with ``donate_state`` it refuses a state
      that an earlier call consumed before dispatch (XLA can crash on it).
    - :meth:`_general`: non-array leaves of the arguments and outputs become static
      structure (:class:`~lift._lifting.Lifted`).

    The first call that has a non-array leaf (a str, a function, a Python number) in
    its arguments or outputs switches to the general path for good: from then on a
    miss goes there, and only signatures compiled before take the fast path.
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
        super().__init__((f,), self._run, name="jit")
        # At top level the state is the first argument (of a pure function, or given
        # to be donated); the user's argument positions count from after it.
        self._state_first = int(is_pure(f) or donate_state)
        self._top_nums, self._frame_nums, self._names = donated
        self._donates = donate_state or any(donated)
        plain = jax.jit(
            self._plain,
            donate_argnums=self._donated_positions(True, 0, self._state_first),
            donate_argnames=self._names,
            **options,
        )
        self._plain_jit = plain
        self._fast = with_cache_miss(plain, self._miss, like=f)
        self._call: Callable[..., Any] = (
            self._general if self._fast is None else self._checked
        )
        if self._donates:
            _donation_starts()
        elif not _DONATING[0]:
            _UNCHECKED.add(self)

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
        ``.compile().memory_analysis()`` and ``.as_text()`` inspect it.
        """
        return self._plain_jit.lower(*args, **kwargs)

    def handed_out(self) -> Callable[..., Any]:
        """What :func:`jit` returns: ``jax.jit``'s own function where it can."""
        if self._fast is not None and is_pure(self._f) and not self._donates:
            return self._fast
        return self

    def _miss(
        self, jax_miss: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[Any, Any, bool]:
        # C++ found no compiled signature for these arguments (the call's own).
        if _DONATING[0]:
            _refuse_consumed((args, kwargs))
        if not self._static and all(
            map(is_array, jax.tree_util.tree_leaves((args, kwargs)))
        ):
            try:
                out, fastpath, rebuild = jax_miss(*args, **kwargs)
                if _DONATING[0] and not self._donates:
                    # Cached in C++, a later call would skip the check above.
                    return out, None, False
                return out, fastpath, rebuild
            except _Fallback:
                pass
            except (RuntimeError, ValueError) as err:
                _raise_if_donated(err, (args, kwargs))
                raise
        # A leaf that is not an array: a Python number would be a valid JAX argument,
        # but lift makes it static, as it does strs and functions. `None`: no
        # fast path for this call, so nothing is cached in C++.
        self._static = True
        self._call = self._general
        return self._general(*args, **kwargs), None, False

    def _plain(self, *args: Any, **kwargs: Any) -> Any:
        # Traced by `jax.jit` (or called eagerly under `jax.disable_jit`).
        out = self._f(*args, **kwargs)
        if not all(map(is_array, jax.tree_util.tree_leaves(out))):
            if jax.config.jax_disable_jit:  # type: ignore[attr-defined]
                return out
            raise _Fallback
        return out

    def _run(
        self, pures: Sequence[Pure], state: State, *args: Any, **kwargs: Any
    ) -> Any:
        if _DONATING[0]:
            _refuse_consumed((state, args, kwargs))
        if self._donates:
            state, args, kwargs = _unshare((state, args, kwargs))
        fn = pures[0].built((), lambda: self._build(pures[0]))
        return fn(state, *args, **kwargs)

    def _build(self, pure: Pure) -> Callable[..., Any]:
        # The pure function's state comes first; at top level it is empty and the
        # user's state (if any) is the next argument.
        top = pure.frameless
        return jax.jit(
            pure,
            donate_argnums=self._donated_positions(
                top, int(top), 1 + top * self._state_first
            ),
            donate_argnames=self._names,
            **self._options,
        )

    def _checked(self, *args: Any, **kwargs: Any) -> Any:
        if _FRAME.get() is not None:
            return self._general(*args, **kwargs)
        if _DONATING[0]:
            _refuse_consumed((args, kwargs))
        if self._donates:
            args, kwargs = _unshare((args, kwargs))
        try:
            return self._fast(*args, **kwargs)  # type: ignore[misc]
        except (RuntimeError, ValueError) as err:
            _raise_if_donated(err, (args, kwargs))
            raise

    def _general(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return Lifted.__call__(self, *args, **kwargs)
        except (RuntimeError, ValueError) as err:
            _raise_if_donated(err, (args, kwargs))
            raise


class _Fallback(Exception):
    pass


def _donated_args(
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
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):  # no signature: names and positions stay apart
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

    # At top level a function not made by `stateful` but donating its state names it
    # as its first parameter; in a frame it has no state parameter.
    top, top_named = resolve(int(donate_state and not is_pure(f)))
    frame, frame_named = resolve(0)
    return top, frame, tuple(dict.fromkeys([*names, *top_named, *frame_named]))


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
        donated = _donated_args(g, donate_argnums, donate_argnames, donate_state)
        return _Jit(g, donate_state, donated, jit_kwargs).handed_out()

    return make if f is None else make(f)
