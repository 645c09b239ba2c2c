"""Process-wide test setup, shared by ``tests/`` and the doctests in ``lift/``.

This file sits at the repository root because pytest loads it first for every
invocation (``pytest``, ``pytest lift``, ``pytest tests/test_x.py``), before any
test module or ``lift`` module imports JAX. Fixtures for the test suite live in
``tests/conftest.py``.

It does three things:

- asks XLA for 8 host (CPU) devices, so sharding and multi-device tests run on
  any machine, and makes JAX strict about dtype and rank promotion;
- registers the hypothesis profiles ``dev`` and ``ci`` (``HYPOTHESIS_PROFILE``);
- skips collecting modules that need an optional extra which is not installed
  (``lift/equinox.py`` without Equinox, ``tests/integrations/test_inox.py``
  without Inox, ...), and skips any other test module or test that fails to
  import a module of an optional extra which is not installed (``optax`` for the
  benchmarks' models, ...), naming it. Set ``LIFT_REQUIRE_EXTRAS=1`` to make a
  missing extra an error instead; ``scripts/test.sh`` does, so CI never drops
  tests silently (and runs the core suite once without extras, so a test that
  needs one but cannot skip is caught).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

# Must happen before JAX initialises its backends (the first `jax.devices()`).
_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_FLAG
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "dev",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# A module whose file stem (or a `_`-separated word of it, `test_` prefix
# dropped) is a key here needs that importable distribution.
OPTIONAL: dict[str, str] = {
    "equinox": "equinox",
    "inox": "inox",
    "nnx": "flax",
    "flax": "flax",
    "linen": "flax",
    "haiku": "haiku",
    "orbax": "orbax.checkpoint",
    "testing": "hypothesis",
}

# Top-level modules that only optional extras install: a test that fails to import
# one of these while it is not installed is skipped (see `_optional_missing`).
OPTIONAL_MODULES = frozenset(
    ({module.split(".")[0] for module in OPTIONAL.values()} - {"hypothesis"})
    | {"optax", "sklearn", "matplotlib", "tqdm"}
)

_ROOT = Path(__file__).parent
_OPTIONAL_DIRS = (_ROOT / "lift", _ROOT / "tests" / "integrations")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package of a dotted name
        return False


def missing_extra(path: Path) -> str | None:
    """The optional module ``path`` needs and cannot import, else ``None``."""
    if path.suffix != ".py" or not any(d in path.parents for d in _OPTIONAL_DIRS):
        return None
    words = path.stem.removeprefix("test_").split("_")
    for word in words:
        module = OPTIONAL.get(word)
        if module is not None and not _importable(module):
            return module
    return None


def _missing_extras() -> dict[Path, str]:
    found = {}
    for directory in _OPTIONAL_DIRS:
        for path in sorted(directory.rglob("*.py")):
            module = missing_extra(path)
            if module is not None:
                found[path] = module
    return found


# Computed once, the same in the xdist controller and in every worker.
MISSING = _missing_extras()


def pytest_configure(config: pytest.Config) -> None:
    """Fail early when extras are required (``LIFT_REQUIRE_EXTRAS``) but missing."""
    if MISSING and os.environ.get("LIFT_REQUIRE_EXTRAS"):
        needed = ", ".join(sorted(set(MISSING.values())))
        raise pytest.UsageError(
            f"LIFT_REQUIRE_EXTRAS is set but {needed} cannot be imported, so "
            f"{len(MISSING)} module(s) would not be tested. Install the extras "
            "(`pip install -e '.[dev]'`) or unset LIFT_REQUIRE_EXTRAS."
        )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip modules whose optional extra is not installed."""
    return True if collection_path in MISSING else None


_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def _optional_missing(text: str) -> str | None:
    """The missing optional module that the error ``text`` reports, if any."""
    if os.environ.get("LIFT_REQUIRE_EXTRAS"):
        return None
    for name in _NO_MODULE.findall(text):
        top = name.split(".")[0]
        if top in OPTIONAL_MODULES and not _importable(top):
            return top
    return None


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A test module that cannot import an optional extra's module is skipped."""
    report = yield
    if report.failed:
        module = _optional_missing(str(report.longrepr))
        if module is not None:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), None, f"Skipped: needs {module}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    """A test that fails importing an optional extra's module is skipped."""
    report = yield
    if report.failed and call.excinfo is not None:
        error = call.excinfo.value
        if isinstance(error, ModuleNotFoundError):
            module = _optional_missing(str(error))
            if module is not None:
                path, line, _ = item.location
                report.outcome = "skipped"
                report.longrepr = (path, (line or 0) + 1, f"Skipped: needs {module}")
    return report


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which devices JAX sees and which profile hypothesis runs."""
    return [
        f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} "
        "devices, strict dtype and rank promotion",
        f"hypothesis profile {os.environ.get('HYPOTHESIS_PROFILE', 'dev')!r}: "
        f"{settings().max_examples} examples",
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List the modules not collected because an optional extra is missing."""
    if MISSING:
        terminalreporter.write_sep("-", "not collected: optional extra missing")
        for path, module in MISSING.items():
            rel = path.relative_to(_ROOT).as_posix()
            terminalreporter.write_line(f"{rel} (needs {module})")
