"""Fixtures for the integration tests.

Each test module skips cleanly (``pytest.importorskip``) only when its library is not
installed; the root ``conftest.py`` also leaves such modules uncollected unless
``LIFT_REQUIRE_EXTRAS`` asks for every extra.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import pytest


@pytest.fixture
def standard_promotion() -> Iterator[None]:
    """Standard dtype promotion for the duration of one test.

    The suite runs with strict promotion, but Haiku mixes dtypes internally: its
    ``ExponentialMovingAverage`` (inside ``hk.BatchNorm``) multiplies Python floats
    with its ``int32`` counter, which strict promotion refuses. That code is not ours
    to fix, so the tests that run it use JAX's default rules.
    """
    with jax.numpy_dtype_promotion("standard"):
        yield
