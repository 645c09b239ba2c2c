"""Lifted transforms: JAX's transforms, threading the current frame's state.

Each is a few lines over :class:`~lift._lifting.Lifted`: a ``run`` that applies the
JAX transform to the pure function(s) and says how the state enters and leaves it.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
from jax import lax
from jax.core import Tracer

from ._errors import LiftTypeError, LiftValueError, describe
from ._export import State, match_filters
from ._frame import _FRAME, is_pure
from ._keys import StateEntry, StateKey
from ._lifting import Lifted, Pure
from ._static import Static, unmask
from ._tracing import batched_here, is_array, with_cache_miss

__all__ = [
    "checkpoint",
    "cond",
    "eval_shape",
    "fori_loop",
    "grad",
    "jit",
    "remat",
    "scan",
    "switch",
    "value_and_grad",
    "vmap",
    "while_loop",
]

# ---------------------------------------------------------------------------- jit


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
    return (
        is_deleted is not None
        and not isinstance(leaf, Tracer)
        and is_deleted()
    )


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
        self._jitted: dict[Pure, Callable[..., Any]] = {}
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
            donate_argnums=self._donated_positions(0, self._state_first),
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

    def _donated_positions(self, state_at: int, first_arg: int) -> tuple[int, ...]:
        """``jax.jit``'s donated positions, the state at ``state_at``.

        The user's arguments start at ``first_arg``.
        """
        nums = self._frame_nums if _FRAME.get() is not None else self._top_nums
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
        fn = self._jitted.get(pures[0])
        if fn is None:
            # The pure function's state comes first; at top level it is empty and the
            # user's state (if any) is the next argument.
            top = _FRAME.get() is None
            donate = self._donated_positions(int(top), 1 + top * self._state_first)
            fn = jax.jit(
                pures[0],
                donate_argnums=donate,
                donate_argnames=self._names,
                **self._options,
            )
            self._jitted[pures[0]] = fn
        return fn(state, *args, **kwargs)

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


# --------------------------------------------------------------------------- vmap

_AUTO = object()


def _keys_in(tree: Any) -> list[StateKey]:
    return [
        x
        for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: type(x) is StateKey)
        if type(x) is StateKey
    ]


def _arg_axes(args: tuple, kwargs: dict, in_axes: Any) -> dict[StateKey, int]:
    """The axis of each state key found inside a mapped argument.

    Callers check first that ``in_axes`` has one spec per positional argument.
    """
    found: dict[StateKey, int] = {}

    def note(tree: Any, axis: Any) -> None:
        if axis is None:
            return
        for key in _keys_in(tree):
            if found.setdefault(key, axis) != axis:
                raise LiftValueError(
                    f"`lift.vmap`: the key {str(key)!r} appears in arguments mapped "
                    f"over different axes ({found[key]} and {axis}). Say which one "
                    f"with `state_axes={{StateKey({str(key)!r}): axis}}`."
                )

    for arg, spec in zip(args, in_axes, strict=True):
        if spec is None or isinstance(spec, int):
            note(arg, spec)
            continue
        specs, treedef = jax.tree_util.tree_flatten(spec, is_leaf=lambda x: x is None)
        for sub, axis in zip(treedef.flatten_up_to(arg), specs, strict=True):
            note(sub, axis)
    note(kwargs, 0)
    return found


def _state_axes(
    state: State, state_axes: Any, inferred: dict[StateKey, int]
) -> dict[StateKey, int | None]:
    if state_axes is None or state_axes is _AUTO:
        return {k: inferred.get(k) for k in state}
    if isinstance(state_axes, int):
        return dict.fromkeys(state, state_axes)
    if not isinstance(state_axes, Mapping):
        raise LiftTypeError(
            "`state_axes` must be None, an int, or a dict {filter: axis} whose filters "
            "are globs, StateKeys, types or predicates; got "
            f"{type(state_axes).__name__}."
        )
    return match_filters(state, state_axes.items(), inferred.get)


def _check_rank(state: State, axes: Mapping[StateKey, int | None], what: str) -> None:
    for key, axis in axes.items():
        if axis is None:
            continue
        for leaf in jax.tree_util.tree_leaves(state[key]):
            ndim = len(getattr(leaf, "shape", ()))
            if not -ndim <= axis < ndim:
                raise LiftValueError(
                    f"`lift.{what}`: the state {str(key)!r} is {describe(state[key])}, "
                    f"which has no axis {axis} to map over. Build that state with a "
                    "batch axis (e.g. vmap its constructor), or mark it shared with "
                    f"`state_axes={{StateKey({str(key)!r}): None}}`."
                )


def mapped_axes(
    state: State, state_axes: Any, in_axes: Any, args: tuple, kwargs: dict, what: str
) -> tuple[tuple, dict[StateKey, int | None]]:
    """One axis spec per argument, and the axis of each state key (None: shared).

    Shared by the mapping transforms (``vmap``, ``pmap``).
    """
    spec = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    if not isinstance(spec, tuple):
        spec = (spec,) * len(args)
    if len(spec) != len(args):
        raise LiftValueError(
            f"`lift.{what}`: in_axes has {len(spec)} entries but the function got "
            f"{len(args)} positional arguments; give one axis spec per argument."
        )
    axes = _state_axes(state, state_axes, _arg_axes(args, kwargs, spec))
    _check_rank(state, axes, what)
    return spec, axes


def vmap(
    f: Callable[..., Any],
    in_axes: Any = 0,
    out_axes: Any = 0,
    *,
    state_axes: Any = None,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Any = None,
) -> Lifted:
    """:func:`jax.vmap` that threads state.

    State is shared by the batch unless said otherwise: ``state_axes`` is ``None``, an
    int (every key mapped over that axis), or ``{filter: axis}`` with the filters of
    :func:`lift.filter_state`. State whose keys appear in a mapped argument (an
    ensemble whose entries were built under ``vmap``) is mapped over that argument's
    axis without being named. Writing a batched value into shared state is an error.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"total": lift.StateEntry(jnp.zeros(()))})
        >>> def add(x):
        ...     t = lift.get(tree["total"])
        ...     lift.set(tree["total"], t + jax.lax.psum(x, "batch"))
        ...     return x + t
        >>> import jax
        >>> batched = lift.stateful(lift.vmap(add, axis_name="batch"))
        >>> out, state = batched(state, jnp.arange(3.0))
        >>> state[tree["total"]]
        Array(3., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, *args: Any, **kwargs: Any) -> Any:
        spec, axes = mapped_axes(state, state_axes, in_axes, args, kwargs, "vmap")
        shared = [k for k, a in axes.items() if a is None]

        def body(state: State, args: tuple, kwargs: dict) -> Any:
            out, new = pures[0](state, *args, **kwargs)
            for key in shared:
                if any(map(batched_here, jax.tree_util.tree_leaves(new[key]))):
                    raise LiftValueError(
                        f"`lift.vmap`: the new value of {str(key)!r} differs across "
                        "the batch, but that state is shared by the batch (its state "
                        "axis is None), so one value per example cannot be written to "
                        "it. Reduce it over the batch: pass `axis_name='batch'` and "
                        "write `lax.pmean(value, 'batch')`; or keep one state per "
                        f"example with `state_axes={{StateKey({str(key)!r}): 0}}` (the "
                        "state then needs that batch axis)."
                    )
            return out, new

        return jax.vmap(
            body,
            in_axes=(axes, spec, 0),
            out_axes=(out_axes, axes),
            axis_name=axis_name,
            axis_size=axis_size,
            spmd_axis_name=spmd_axis_name,
        )(state, args, kwargs)

    return Lifted((f,), run, name="vmap")


# --------------------------------------------------------------------------- scan


def _split_scanned(state: State, state_axes: Any) -> tuple[State, dict[StateKey, int]]:
    """The scanned keys (with their axes) and the carried rest."""
    if state_axes is None:
        return dict(state), {}
    if not isinstance(state_axes, Mapping):
        raise LiftTypeError(
            "`lift.scan(state_axes=...)` must be None (carry all state) or a dict "
            "{filter: axis} naming the state stacked per step (scan over layers); got "
            f"{type(state_axes).__name__}."
        )
    axes = {
        k: a for k, a in _state_axes(state, state_axes, {}).items() if a is not None
    }
    _check_rank(state, axes, "scan")
    return {k: v for k, v in state.items() if k not in axes}, axes


def _check_lengths(
    stacked: State, axes: Mapping[StateKey, int], xs: Any, length: int | None
) -> None:
    """Refuse stacked state whose length is not the number of steps, naming the key."""
    if length is not None:
        steps, source = length, f"`length={length}`"
    else:
        leaves = jax.tree_util.tree_leaves(xs)
        steps = jax.numpy.shape(leaves[0])[0] if leaves else None
        source = "the leading axis of `xs`"
    first: tuple[StateKey, int] | None = None
    for key, value in stacked.items():
        for leaf in jax.tree_util.tree_leaves(value):
            n = leaf.shape[0]
            where = f"the state {str(key)!r} has {n} entries along its axis {axes[key]}"
            if steps is not None and n != steps:
                raise LiftValueError(
                    f"`lift.scan`: {where}, but the scan runs {steps} steps (from "
                    f"{source}). Scanned state (`state_axes`) needs one slice per "
                    "step: stack it with as many entries as steps, or carry it "
                    f"instead (`state_axes={{StateKey({str(key)!r}): None}}`)."
                )
            if first is None:
                first = (key, n)
            elif n != first[1]:
                raise LiftValueError(
                    f"`lift.scan`: {where}, but the state {str(first[0])!r} has "
                    f"{first[1]}: all scanned state (`state_axes`) needs one slice per "
                    "step. Stack both with the same number of entries, or carry one "
                    f"(`state_axes={{StateKey({str(key)!r}): None}}`)."
                )


def _moveaxis(tree: Any, src: int, dst: int) -> Any:
    if src == dst:
        return tree
    return jax.tree_util.tree_map(lambda x: jax.numpy.moveaxis(x, src, dst), tree)


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    state_axes: Any = None,
) -> tuple[Any, Any]:
    """:func:`jax.lax.scan` that carries state.

    All state is carried through the loop by default, including state the body only
    reads. ``state_axes={filter: axis}`` scans over state stacked along ``axis`` instead
    (one slice per step, as in scan over layers) and restacks the new values.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def body(carry, x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + 1)
        ...     return carry + x, carry
        >>> run = lambda xs: lift.scan(body, 0.0, xs)
        >>> (total, _), state = lift.stateful(run)(state, jnp.arange(4.0))
        >>> total, state[tree["n"]]
        (Array(6., dtype=float32), Array(4., dtype=float32))
    """

    def run(pures: Sequence[Pure], state: State, init: Any, xs: Any) -> Any:
        carried, axes = _split_scanned(state, state_axes)
        stacked = {k: _moveaxis(state[k], a, 0) for k, a in axes.items()}
        _check_lengths(stacked, axes, xs, length)

        def body(carry: Any, x: Any) -> Any:
            (c, carried), (xi, sliced) = carry, x
            (c, y), new = pures[0]({**carried, **sliced}, c, xi)
            return (c, {k: new[k] for k in carried}), (y, {k: new[k] for k in sliced})

        (c, carried), (ys, stacked) = lax.scan(
            body,
            (init, carried),
            (xs, stacked),
            length=length,
            reverse=reverse,
            unroll=unroll,
        )
        stacked = {k: _moveaxis(v, 0, axes[k]) for k, v in stacked.items()}
        return (c, ys), {**carried, **stacked}

    return Lifted((f,), run, name="scan", static_args=False, keep_scalars=True)(
        init, xs
    )


# ------------------------------------------------------------------------ control


def cond(pred: Any, true_fun: Callable, false_fun: Callable, *operands: Any) -> Any:
    """:func:`jax.lax.cond` that threads state: the branch not taken never writes.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def bump(x):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + x)
        ...     return x
        >>> f = lambda p, x: lift.cond(p, bump, lambda x: -x, x)
        >>> lift.stateful(f)(state, False, 2.0)[1][tree["n"]]
        Array(0., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, pred: Any, *ops: Any) -> Any:
        return lax.cond(unmask(pred), pures[0], pures[1], state, *ops)

    return Lifted((true_fun, false_fun), run, name="cond", keep_scalars=True)(
        pred, *operands
    )


def switch(index: Any, branches: Sequence[Callable], *operands: Any) -> Any:
    """:func:`jax.lax.switch` that threads state: only the chosen branch writes.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def put(v):
        ...     return lambda: lift.set(tree["n"], jnp.asarray(v, jnp.float32))
        >>> pick = lift.stateful(lambda i: lift.switch(i, [put(1), put(2), put(3)]))
        >>> pick(state, 1)[1][tree["n"]]
        Array(2., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, index: Any, *ops: Any) -> Any:
        return lax.switch(unmask(index), list(pures), state, *ops)

    return Lifted(tuple(branches), run, name="switch", keep_scalars=True)(
        index, *operands
    )


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any) -> Any:
    """:func:`jax.lax.while_loop` that carries state; ``cond_fun`` may read it.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def body(i):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + 2)
        ...     return i + 1
        >>> loop = lambda: lift.while_loop(lambda i: lift.get(tree["n"]) < 5, body, 0)
        >>> lift.stateful(loop)(state)
        (Array(3, dtype=int32, weak_type=True),
         {StateKey("['n']"): Array(6., dtype=float32)})
    """

    def run(pures: Sequence[Pure], state: State, init: Any) -> Any:
        test = Pure(
            pures[0].f,
            mutable=False,
            name=pures[0].name,
            keep_scalars=True,
            why="it runs the `cond_fun` of `lift.while_loop`, which may read state but "
            "not write it. Move the write into `body_fun`.",
            frameless=pures[0].frameless,
        )
        val, state = lax.while_loop(
            lambda c: test(c[1], c[0])[0], lambda c: pures[1](c[1], c[0]), (init, state)
        )
        return val, state

    return Lifted(
        (cond_fun, body_fun),
        run,
        name="while_loop",
        static_args=False,
        keep_scalars=True,
    )(init_val)


def fori_loop(
    lower: Any, upper: Any, body_fun: Callable, init_val: Any, *, unroll: Any = None
) -> Any:
    """:func:`jax.lax.fori_loop` that carries state.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"n": lift.StateEntry(jnp.zeros(()))})
        >>> def body(i, acc):
        ...     lift.set(tree["n"], lift.get(tree["n"]) + i)
        ...     return acc + 1
        >>> lift.stateful(lambda: lift.fori_loop(0, 4, body, 0))(state)[1][tree["n"]]
        Array(6., dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, init: Any) -> Any:
        def body(i: Any, c: Any) -> Any:
            return pures[0](c[1], i, c[0])

        return lax.fori_loop(lower, upper, body, (init, state), unroll=unroll)

    return Lifted(
        (body_fun,), run, name="fori_loop", static_args=False, keep_scalars=True
    )(init_val)


# ------------------------------------------------------------- autodiff and remat


def _refuse_state(args: tuple, argnums: Sequence[int], what: str) -> None:
    for i in argnums:
        if i >= len(args):
            continue
        arg = unmask(args[i])
        is_state = (
            isinstance(arg, Mapping) and arg and all(type(k) is StateKey for k in arg)
        )
        has_entry = any(
            type(x) is StateEntry
            for x in jax.tree_util.tree_leaves(
                arg, is_leaf=lambda x: type(x) is StateEntry
            )
        )
        if is_state or has_entry:
            if is_state:
                kind = f"a state dict with keys such as {str(next(iter(arg)))!r}"
            else:
                kind = "a tree holding StateEntry"
            raise LiftTypeError(
                f"`lift.{what}` was asked for a gradient with respect to state "
                f"(argument {i} is {kind}). "
                "State is threaded as auxiliary output and never differentiated: "
                "differentiate with respect to the parameters, export the state with "
                "`export_state` and let lift thread it (call inside `lift.stateful`)."
            )


def value_and_grad(
    f: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    holomorphic: bool = False,
    allow_int: bool = False,
) -> Lifted:
    """:func:`jax.value_and_grad` that threads state as auxiliary output.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> tree, state = lift.export_state({"calls": lift.StateEntry(jnp.zeros(()))})
        >>> def loss(w):
        ...     lift.set(tree["calls"], lift.get(tree["calls"]) + 1)
        ...     return jnp.sum(w**2)
        >>> pure = lift.stateful(lift.value_and_grad(loss))
        >>> (value, grad), state = pure(state, jnp.ones(2))
        >>> value, grad, state[tree["calls"]]
        (Array(2., dtype=float32), Array([2., 2.], dtype=float32),
         Array(1., dtype=float32))
    """
    return Lifted(
        (f,),
        _vg_run(argnums, has_aux, holomorphic, allow_int, "value_and_grad"),
        name="value_and_grad",
    )


def _vg_run(
    argnums: int | Sequence[int],
    has_aux: bool,
    holomorphic: bool,
    allow_int: bool,
    what: str,
    *,
    values: bool = True,
) -> Callable[..., Any]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def run(pures: Sequence[Pure], state: State, *args: Any, **kwargs: Any) -> Any:
        _refuse_state(args, nums, what)
        # A Python number differentiated as a whole argument is an input, as in JAX;
        # numbers inside trees (a module's hyperparameters) stay static.
        args = tuple(
            jax.numpy.asarray(a.value)
            if i in nums and type(a) is Static and type(a.value) in (float, complex)
            else a
            for i, a in enumerate(args)
        )

        def loss(*args: Any) -> Any:
            out, new = pures[0](state, *args, **kwargs)
            if has_aux:
                value, aux = out
                return value, (aux, new)
            return out, (None, new)

        (value, (aux, new)), grads = jax.value_and_grad(
            loss,
            argnums=argnums,
            has_aux=True,
            holomorphic=holomorphic,
            allow_int=allow_int,
        )(*args)
        grads = unmask(grads, static_as_none=True)
        if not values:
            return ((grads, aux) if has_aux else grads), new
        return (((value, aux), grads) if has_aux else (value, grads)), new

    return run


def grad(
    f: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    holomorphic: bool = False,
    allow_int: bool = False,
) -> Lifted:
    """:func:`jax.grad` that threads state as auxiliary output (never differentiated).

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> lift.grad(lambda w: jnp.sum(w**2))(jnp.ones(2))
        Array([2., 2.], dtype=float32)
    """
    return Lifted(
        (f,),
        _vg_run(argnums, has_aux, holomorphic, allow_int, "grad", values=False),
        name="grad",
    )


def checkpoint(
    f: Callable[..., Any],
    *,
    prevent_cse: bool = True,
    policy: Callable[..., bool] | None = None,
) -> Lifted:
    """:func:`jax.checkpoint` (``remat``) that threads state.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import lift
        >>> jax.grad(lift.checkpoint(lambda x: 3 * x**2))(1.0)
        Array(6., dtype=float32, weak_type=True)
    """

    def run(pures: Sequence[Pure], state: State, *args: Any, **kwargs: Any) -> Any:
        return jax.checkpoint(pures[0], prevent_cse=prevent_cse, policy=policy)(
            state, *args, **kwargs
        )

    return Lifted((f,), run, name="checkpoint")


remat = checkpoint


def eval_shape(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`jax.eval_shape` of an implicit function; the state is read, not written.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> lift.eval_shape(lambda x: x @ x.T, jnp.ones((3, 2)))
        ShapeDtypeStruct(shape=(3, 3), dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, *args: Any, **kwargs: Any) -> Any:
        out, _ = jax.eval_shape(pures[0], state, *args, **kwargs)
        return out, state

    return Lifted((f,), run, name="eval_shape")(*args, **kwargs)
