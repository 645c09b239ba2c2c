"""The package as a whole: import cost, public names, metadata, test setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from hypothesis import settings

import lift

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("equinox", "inox", "flax", "haiku", "orbax")


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (no conftest, no plugins) and return stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_lift_imports_no_optional_framework():
    code = (
        "import json, sys\n"
        "import lift\n"
        f"print(json.dumps(sorted(m for m in sys.modules "
        f"if m.split('.')[0] in {OPTIONAL!r})))\n"
    )
    assert json.loads(_fresh(code)) == []


def test_the_subprocess_check_would_see_an_import():
    # Guards the test above against passing vacuously: the same probe sees
    # `equinox` once something imports it (skipped only if it is not installed).
    pytest.importorskip("equinox")
    code = (
        "import json, sys\n"
        "import lift, equinox\n"
        f"print(json.dumps(sorted(m for m in sys.modules "
        f"if m.split('.')[0] in {OPTIONAL!r})))\n"
    )
    assert "equinox" in json.loads(_fresh(code))


def test_submodules_load_on_first_attribute_access():
    # `lift.equinox` works after a bare `import lift` (PEP 562), and only then does
    # the framework get imported; `dir(lift)` lists the lazy submodules.
    pytest.importorskip("equinox")
    code = (
        "import json, sys\n"
        "import lift\n"
        "before = 'equinox' in sys.modules or 'lift.equinox' in sys.modules\n"
        "listed = all(n in dir(lift) for n in "
        "('equinox', 'inox', 'nnx', 'haiku', 'linen', 'io', 'testing'))\n"
        "fn = lift.equinox.from_equinox\n"
        "print(json.dumps([before, listed, callable(fn), 'equinox' in sys.modules]))\n"
    )
    assert json.loads(_fresh(code)) == [False, True, True, True]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        lift.no_such_thing  # type: ignore[attr-defined]  # noqa: B018


def test_error_classes_are_public_and_defined_in_one_module():
    for name, builtin in [
        ("LiftKeyError", KeyError),
        ("LiftTypeError", TypeError),
        ("LiftValueError", ValueError),
        ("FrameError", RuntimeError),
        ("TraceError", RuntimeError),
        ("StateFileError", ValueError),
        ("StateMismatchError", ValueError),
    ]:
        cls = getattr(lift, name)
        assert name in lift.__all__
        assert cls.__module__ == "lift._errors"
        assert issubclass(cls, lift.LiftError)
        assert issubclass(cls, builtin)
    # The file errors are the same classes under `lift.io`.
    assert lift.io.StateFileError is lift.StateFileError
    assert lift.io.StateMismatchError is lift.StateMismatchError


def test_all_names_exist_and_are_unique():
    assert len(lift.__all__) == len(set(lift.__all__))
    missing = [name for name in lift.__all__ if not hasattr(lift, name)]
    assert missing == []


def test_public_names_have_docstrings_with_examples():
    undocumented = [
        name
        for name in lift.__all__
        if ">>>" not in (getattr(lift, name).__doc__ or "")
    ]
    assert undocumented == []


def test_py_typed_marker_is_shipped():
    assert (Path(lift.__file__).parent / "py.typed").is_file()


def test_version_has_one_source():
    # pyproject.toml reads the version from lift/__init__.py; it states none itself.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"]
    assert meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["hatch"]["version"]["path"] == "lift/__init__.py"


def test_distribution_is_jax_lift():
    # `lift` on the package index is an unrelated project: the distribution is
    # `jax-lift`, and the extras refer to it by that name.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "jax-lift"
    extras = meta["project"]["optional-dependencies"]
    self_refs = [
        r for reqs in extras.values() for r in reqs if r.startswith("jax-lift")
    ]
    assert self_refs, "the dev extra no longer refers to the other extras"
    named = [r.split("[")[1].rstrip("]").split(",") for r in self_refs]
    assert all(name in extras for names in named for name in names), named


def test_installed_metadata_matches_the_source():
    from importlib.metadata import version

    assert version("jax-lift") == lift.__version__


# ----------------------------------------------------- the setup in conftest.py


def test_eight_host_devices():
    assert jax.device_count() == 8
    assert {d.platform for d in jax.devices()} == {"cpu"}


def test_strict_dtype_promotion_is_on():
    with pytest.raises(jax.dtypes.TypePromotionError, match="strict"):
        jnp.ones(2, jnp.int32) + jnp.ones(2, jnp.float32)


def test_rank_promotion_raises():
    with pytest.raises(ValueError, match="rank"):
        jnp.ones((2, 3)) + jnp.ones(3)


def test_hypothesis_profile_follows_env():
    expected = {"dev": 20, "ci": 100}[os.environ.get("HYPOTHESIS_PROFILE", "dev")]
    assert settings().max_examples == expected
    assert settings().deadline is None


def test_corpus_case_needing_a_missing_extra_skips_or_fails(monkeypatch):
    from tests.corpus import Case

    case = Case("fake", lambda: 1 / 0, (), needs="lift_no_such_extra")
    monkeypatch.delenv("LIFT_REQUIRE_EXTRAS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="'fake' needs lift_no_such_extra"):
        case.build()
    monkeypatch.setenv("LIFT_REQUIRE_EXTRAS", "1")
    with pytest.raises(pytest.fail.Exception, match="LIFT_REQUIRE_EXTRAS is set"):
        case.build()


def test_corpus_leaves_out_only_cases_whose_extra_is_missing():
    from tests.corpus import CASES, CORPUS, has

    left_out = [case for case in CASES.values() if case not in CORPUS]
    assert all(case.needs and not has(case.needs) for case in left_out), left_out
    assert {"equinox_model", "inox_net"} <= set(CASES)


def test_a_missing_optional_module_skips_unless_extras_are_required(monkeypatch):
    # The root conftest turns "No module named 'optax'" (an extra's module, not
    # installed) into a skip, and leaves every other import error an error.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_root_conftest", ROOT / "conftest.py"
    )
    assert spec is not None
    assert spec.loader is not None
    root = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root)
    monkeypatch.setattr(root, "_importable", lambda module: module != "optax")
    monkeypatch.delenv("LIFT_REQUIRE_EXTRAS", raising=False)
    assert root._optional_missing("No module named 'optax.contrib'") == "optax"
    assert root._optional_missing("No module named 'equinox'") is None  # installed
    assert root._optional_missing("No module named 'optaxx'") is None  # no extra's
    monkeypatch.setenv("LIFT_REQUIRE_EXTRAS", "1")
    assert root._optional_missing("No module named 'optax'") is None


# The builtin exceptions lift may raise, and why: everything else it raises is a
# `LiftError` (one of the classes in `lift._errors`), an internal signal caught inside
# lift, or the result of a function that builds one of those.
BUILTINS_ALLOWED = {
    "AttributeError": "a missing attribute of the `lift` module (PEP 562)",
    "KeyError": "`Memo.__getitem__`, a mapping's protocol",
    "ImportError": "a converter whose framework is not installed",
    "FileExistsError": "no free temporary name next to the file being saved",
    "FileNotFoundError": "a missing file or folder, as `open` says it",
    "AssertionError": "a branch that cannot be reached",
}
INTERNAL_SIGNALS = {"Damaged", "VersionError", "NeedsLike", "_Fallback"}


def _raised_classes() -> dict[str, list[str]]:
    import ast

    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "lift").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = ast.unparse(exc)
                if name[:1].isupper():  # a class; lower case is a builder's result
                    found.setdefault(name, []).append(f"{path.name}:{node.lineno}")
    return found


def test_lift_raises_its_own_errors_and_a_few_documented_builtins():
    errors = {
        name
        for name in lift.__all__
        if isinstance(getattr(lift, name), type)
        and issubclass(getattr(lift, name), lift.LiftError)
    }
    raised = _raised_classes()
    assert "LiftValueError" in raised  # the scan sees lift's raise sites
    unexpected = {
        name: where
        for name, where in raised.items()
        if name not in errors | INTERNAL_SIGNALS | set(BUILTINS_ALLOWED)
    }
    assert not unexpected, f"raise sites of other exceptions: {unexpected}"
