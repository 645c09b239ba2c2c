"""Autodiff and remat that thread state: ``grad``, ``value_and_grad``, ``checkpoint``.

State is auxiliary output of the differentiated function, never differentiated.
``eval_shape`` lives here too: like ``grad``, it traces ``f`` once without running it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from ._errors import LiftTypeError
from ._export import State
from ._keys import StateEntry, StateKey
from ._lifting import Lifted, Pure, lift_transform
from ._static import Static, unmask

__all__ = ["checkpoint", "eval_shape", "grad", "remat", "value_and_grad"]


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

    def run(pures: Sequence[Pure], state: State, /, *args: Any, **kwargs: Any) -> Any:
        _refuse_state(args, nums, what)
        # A Python number differentiated as a whole argument is an input, as in JAX
        # (an int or a bool gets JAX's error, or with `allow_int` a float0 gradient);
        # numbers inside trees (a module's hyperparameters) stay static.
        args = tuple(
            jax.numpy.asarray(a.value)
            if i in nums and type(a) is Static and type(a.value) in _NUMBERS
            else a
            for i, a in enumerate(args)
        )

        def loss(*args: Any) -> Any:
            out, new = pures[0](state, *args, **kwargs)
            if has_aux:
                value, aux = out
                return _unstatic(value), (aux, new)
            return _unstatic(out), (None, new)

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


_NUMBERS = (float, complex, int, bool)


def _unstatic(value: Any) -> Any:
    # The differentiated output as `f` returned it: a Python number is a constant
    # (gradient zero, as in JAX), anything else gets JAX's own error about it.
    return value.value if type(value) is Static else value


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
    return _checkpoint(f, prevent_cse=prevent_cse, policy=policy)


_checkpoint = lift_transform(jax.checkpoint)


remat = checkpoint


def eval_shape(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`jax.eval_shape` of an implicit function; the state is read, not written.

    Examples:
        >>> import jax.numpy as jnp
        >>> import lift
        >>> lift.eval_shape(lambda x: x @ x.T, jnp.ones((3, 2)))
        ShapeDtypeStruct(shape=(3, 3), dtype=float32)
    """

    def run(pures: Sequence[Pure], state: State, /, *args: Any, **kwargs: Any) -> Any:
        out, _ = jax.eval_shape(pures[0], state, *args, **kwargs)
        return out, state

    return Lifted((f,), run, name="eval_shape")(*args, **kwargs)
