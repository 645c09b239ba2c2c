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

# Transform fixtures (a `variant` over "eager", "jit", "vmap", "scan") go here.
