"""Fixtures for the test suite.

Process-wide setup (8 host CPU devices, strict dtype and rank promotion,
hypothesis profiles ``dev``/``ci`` chosen by ``HYPOTHESIS_PROFILE``, and
skipping modules whose optional extra is missing) lives in the repository's root
``conftest.py``: pytest loads that one first for every invocation, including
``pytest lift`` (doctests only), so the settings hold before anything imports
JAX. ``tests/test_package.py`` checks that they are in effect.

This file holds the fixtures shared by the tests.
"""

from __future__ import annotations

import chex
import pytest


@pytest.fixture(autouse=True)
def _fresh_trace_counts():
    """Start every test with ``chex.assert_max_traces`` counts at zero.

    Chex counts the traces of a function by where it is defined, for the whole
    process: without this, a test run twice in one worker (or two tests defining a
    function at the same place) would add up their traces.
    """
    chex.clear_trace_counter()
