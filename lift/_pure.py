"""``to_pure_dict`` and ``from_pure_dict``: a state as a flat ``{path: array}`` dict.

The flat dict is what Orbax, safetensors and ``np.savez`` take; its names are the
member names of a state file without ``.npy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from ._errors import LiftTypeError, LiftValueError
from ._export import State
from ._format import is_key_dtype, leaf_paths
from ._keys import StateKey
from ._like import aval, check_state, like_state, mismatch, sharding_of

__all__ = ["from_pure_dict", "to_pure_dict"]


def to_pure_dict(state: Mapping[StateKey, Any]) -> dict[str, Any]:
    """A flat ``{path: array}`` dict of ``state``, for Orbax, safetensors, ``np.savez``.

    Each array leaf gets the key path of its state key followed by its own path
    inside the value (an array value keeps just the key's path), the names the
    state file uses for its arrays. Typed PRNG key arrays become their
    :func:`jax.random.key_data`; :func:`from_pure_dict` wraps them again.

    Args:
        state: a state dict.

    Returns:
        A new ``dict`` from path strings to arrays (not copied).

    Raises:
        LiftValueError: two leaves would get the same path.

    Examples:
        >>> import jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> from lift.io import to_pure_dict
        >>> _, state = export_state({"bn": StateEntry({"mean": jnp.zeros(2)}),
        ...                          "n": StateEntry(jnp.int32(3))})
        >>> to_pure_dict(state)  # doctest: +NORMALIZE_WHITESPACE
        {"['bn']['mean']": Array([0., 0.], dtype=float32),
         "['n']": Array(3, dtype=int32)}
    """
    check_state(state, "to_pure_dict")
    out: dict[str, Any] = {}
    for key, value in state.items():
        paths, leaves, _ = leaf_paths(value, key, "`to_pure_dict`")
        for path, leaf in zip(paths, leaves, strict=True):
            name = str(key) + path
            if name in out:
                raise LiftValueError(
                    f"`to_pure_dict`: two leaves would both be named {name!r} (a key "
                    "path equals another key's path plus a leaf path). Export with "
                    "distinct `prefix=` values or rename one of the entries."
                )
            if isinstance(leaf, jax.Array) and is_key_dtype(leaf.dtype):
                leaf = jax.random.key_data(leaf)
            out[name] = leaf
    return out


def from_pure_dict(d: Mapping[str, Any], *, like: Mapping[StateKey, Any]) -> State:
    """The state that :func:`to_pure_dict` flattened to ``d``, rebuilt like ``like``.

    ``like`` gives the keys, structures, shapes and dtypes (and shardings, which the
    arrays are placed with); every difference is reported at once, as in
    :func:`load_state`. Values may be JAX or numpy arrays (what Orbax, safetensors or
    ``np.load`` give back); the result holds :class:`jax.Array` values.

    Args:
        d: a flat dict from path strings to arrays.
        like: a state with the expected keys, structures, shapes and dtypes.

    Returns:
        A state dict in ``like``'s key order.

    Raises:
        StateMismatchError: (a ``LiftValueError``) ``d`` does not match ``like``;
            ``.problems`` lists every difference.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from lift import StateEntry, export_state
        >>> from lift.io import from_pure_dict, to_pure_dict
        >>> _, state = export_state({"rng": StateEntry(jax.random.key(1)),
        ...                          "n": StateEntry(jnp.int32(3))})
        >>> pure = {k: jax.device_get(v) for k, v in to_pure_dict(state).items()}
        >>> again = from_pure_dict(pure, like=state)
        >>> again["['rng']"].dtype, int(again["['n']"])
        (key<fry>, 3)
    """
    where = "from_pure_dict"
    like_dict = like_state(like, where)
    if not isinstance(d, Mapping):
        raise LiftTypeError(
            f"`from_pure_dict` takes a dict from path strings to arrays, got a "
            f"{type(d).__name__}."
        )
    problems: list[tuple[str, str]] = []
    used: set[str] = set()
    plans = []
    for key, like_value in like_dict.items():
        paths, like_leaves, like_def = leaf_paths(like_value)
        names = [str(key) + p for p in paths]
        plans.append((key, names, like_leaves, like_def))
        for name, like_leaf in zip(names, like_leaves, strict=True):
            if name in used:
                raise LiftValueError(
                    f"`from_pure_dict`: two leaves of `like` are both named {name!r}."
                )
            used.add(name)
            if name not in d:
                problems.append((name, "in `like` but not in the dict"))
                continue
            _compare_pure(name, d[name], like_leaf, problems)
    for name in d:
        if name not in used:
            problems.append((str(name), "in the dict but not in `like`"))
    if problems:
        hint = (
            "Pass the `like` state whose `to_pure_dict` was saved, or filter it with "
            "`filter_state` to the part the dict holds."
        )
        raise mismatch(where, problems, hint)
    out: State = {}
    for key, names, like_leaves, like_def in plans:
        arrays = [
            _place_pure(n, d[n], leaf)
            for n, leaf in zip(names, like_leaves, strict=True)
        ]
        out[key] = jax.tree_util.tree_unflatten(like_def, arrays)
    return out


def _is_key_data_for(value: Any, like_leaf: Any) -> bool:
    """Whether ``value`` is raw key data standing for ``like_leaf``'s typed keys."""
    return is_key_dtype(getattr(like_leaf, "dtype", None)) and not is_key_dtype(
        getattr(value, "dtype", None)
    )


def _compare_pure(
    name: str, value: Any, like_leaf: Any, problems: list[tuple[str, str]]
) -> None:
    expected = aval(like_leaf)
    got = aval(value)
    if expected is None or got is None:
        bad = "`like`" if expected is None else "the dict"
        thing = like_leaf if expected is None else value
        problems.append((name, f"{bad} holds a {type(thing).__name__}, not an array"))
        return
    if _is_key_data_for(value, like_leaf):
        # Key data: the key's shape plus one trailing axis of uint32.
        width = like_leaf.dtype.itemsize // 4  # uint32 words per key
        expected = (*expected[0], width), "uint32"
    if got[0] != expected[0]:
        problems.append((name, f"shape {got[0]} in the dict, `like` has {expected[0]}"))
    if got[1] != expected[1]:
        problems.append((name, f"dtype {got[1]} in the dict, `like` has {expected[1]}"))


def _impl_of(like_leaf: Any) -> str:
    if isinstance(like_leaf, jax.Array):
        return str(jax.random.key_impl(like_leaf))
    # A ShapeDtypeStruct of keys: JAX has no public accessor for its dtype's impl.
    return str(like_leaf.dtype._impl.name)


def _place_pure(name: str, value: Any, like_leaf: Any) -> jax.Array:
    if _is_key_data_for(value, like_leaf):
        value = jax.random.wrap_key_data(value, impl=_impl_of(like_leaf))
    sharding = sharding_of(like_leaf, name, "from_pure_dict")
    if sharding is not None:
        return jax.device_put(value, sharding)
    return value if isinstance(value, jax.Array) else jax.device_put(value)
