"""Hypothesis strategies for lift's tests: the public ones, plus test-only helpers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from hypothesis import strategies as st

from lift import StateKey, export_state
from lift.testing import (
    DTYPES,
    Box,
    Pair,
    Record,
    arrays,
    shapes,
    state_values,
    states,
    trees,
)

__all__ = [
    "DTYPES",
    "Box",
    "Pair",
    "Record",
    "arrays",
    "exported",
    "filters",
    "like",
    "mutations",
    "shapes",
    "state_values",
    "states",
    "trees",
]


@st.composite
def exported(draw: st.DrawFn, **tree_options: Any) -> tuple[Any, Any, dict]:
    """``(tree, exported_tree, state)`` for a tree drawn by ``trees``."""
    tree = draw(trees(**tree_options))
    return (tree, *export_state(tree))


def like(value: Any, bump: int = 1) -> Any:
    """A new value with the structure, shapes and dtypes of ``value``."""

    def new(x: Any) -> Any:
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            return jnp.logical_not(x)
        return (x + bump).astype(x.dtype)

    return jax.tree_util.tree_map(new, value)


@st.composite
def mutations(draw: st.DrawFn, state: dict) -> dict:
    """A mutation for ``state``: new, well-shaped values for some of its keys."""
    keys = draw(st.lists(st.sampled_from(sorted(state)), unique=True)) if state else []
    return {k: like(state[k]) for k in keys}


def filters(state: dict) -> st.SearchStrategy[Any]:
    """State filters of every kind that may match some keys of ``state``."""
    keys = sorted(state)
    options: list[st.SearchStrategy[Any]] = [
        st.sampled_from(["*", "nothing-matches-this", "*.0.*", "*first*"]),
        st.sampled_from([jax.Array, tuple, dict, Pair]),
        st.frozensets(st.sampled_from(keys or [StateKey("")])).map(
            lambda chosen: lambda key, value: key in chosen
        ),
    ]
    if keys:
        options.append(st.sampled_from(keys))
    return st.one_of(options)
