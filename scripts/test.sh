#!/usr/bin/env bash
# The full check, on a fresh machine that has only python3 (with venv and pip):
#
#   bash scripts/test.sh
#
# Creates .venv if missing, installs lift with every extra (`.[dev]`), then runs,
# stopping at the first failure:
#   build the sdist and wheel, check them (twine check --strict,
#     check-wheel-contents, what the wheel holds)
#   · tests + doctests (pytest -n 2, every extra required) · ruff check
#   · ruff format --check · pyright · mkdocs build --strict (if mkdocs.yml exists)
#   · the examples, quick mode
#   · the built wheel (not editable) in its own venv made from python3: the
#     quickstart and an import of every public module, run outside the repository
#   · the core suite (`test` extra only, no optional framework) on each Python of
#     LIFT_OTHER_PYTHONS (default "3.12 3.13"; `LIFT_OTHER_PYTHONS=` skips them).
# CI runs exactly this (.ci/run). With CI set, hypothesis uses its `ci` profile.
# The venvs live in .venv and .venvs/, and are reinstalled only when pyproject.toml
# changes (.venvs/ ones from scratch, so a dropped dependency is noticed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
VENVS=$ROOT/.venvs
PYTHON=${PYTHON:-python3}
OTHER_PYTHONS=${LIFT_OTHER_PYTHONS-3.12 3.13}
START=$SECONDS
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
TIMES=()

step() {
    STEP_NAME=$1
    STEP_START=$SECONDS
    printf '\n==> %s\n' "$STEP_NAME"
}
done_step() {
    local took=$((SECONDS - STEP_START))
    printf '<== %s: ok (%ds)\n' "$STEP_NAME" "$took"
    TIMES+=("$(printf '%5ds  %s' "$took" "$STEP_NAME")")
}
fail() {
    echo "error: $*" >&2
    exit 1
}

# -qq: pip prints errors only (this machine's pip.conf makes -q chatty).
pip_install() {
    "$1" -m pip install -qq --progress-bar off --disable-pip-version-check "${@:2}"
}
pyproject_hash() {
    "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' pyproject.toml
}

# `fresh_venv DIR PYTHON`: make DIR a venv of PYTHON from scratch unless the one
# there was made by the same interpreter for this pyproject.toml. Sets NEW_VENV to
# 1 when it made a new one (its dependencies still to install), else to 0.
fresh_venv() {
    local dir=$1 python=$2 version
    version=$("$python" -c 'import sys; print(sys.version.split()[0])')
    VENV_STAMP="python $version, ${JAX_PINS[*]}, pyproject.toml $(pyproject_hash)"
    NEW_VENV=0
    if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.lift-stamp" 2>/dev/null || true)" = "$VENV_STAMP" ]; then
        echo "reusing $dir (delete it to start afresh)"
        return
    fi
    rm -rf "$dir"
    "$python" -m venv "$dir"
    NEW_VENV=1
}
# Call after the dependencies of the venv from the last `fresh_venv` are installed.
stamp_venv() {
    echo "$VENV_STAMP" >"$1/.lift-stamp"
}

# `find_python 3.12`: a working interpreter of that version, from PATH or pyenv.
find_python() {
    local version=$1 candidate
    for candidate in "$(command -v "python$version" || true)" \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python; do
        if [ -x "$candidate" ] && "$candidate" -c 'import sys, venv' >/dev/null 2>&1 \
            && [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$version" ]; then
            echo "$candidate"
            return
        fi
    done
    return 1
}

# `run_pytest LOG PYTHON ARGS...`: pytest, refusing a run with no passed test.
run_pytest() {
    local log=$1 python=$2
    # `set -o pipefail` fails on pytest's exit code (5 = nothing collected); the
    # summary check also refuses a run that reports no passed test at all.
    "$python" -m pytest -n 2 -p no:cacheprovider "${@:3}" 2>&1 | tee "$log"
    if ! tail -n 5 "$log" | grep -Eq '[0-9]+ passed'; then
        fail "pytest reported no passed tests"
    fi
}

# ------------------------------------------------------------------ environment
step "environment (.venv, pip install -e '.[dev]')"
# The interpreter the script was given, before .venv comes first on PATH.
BASE_PYTHON=$(command -v "$PYTHON") || fail "$PYTHON not found"
if [ ! -x "$VENV/bin/python" ]; then
    "$BASE_PYTHON" -m venv "$VENV"
fi
export VIRTUAL_ENV=$VENV
export PATH="$VENV/bin:$PATH"
# Skip the (slow, network-bound) install when pyproject.toml has not changed
# since the last successful one in this .venv.
STAMP=$VENV/.lift-dev-install
WANT=$(pyproject_hash)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    pip_install python --upgrade pip
    pip_install python -e '.[dev]'
    # The distribution was called `lift` before it became `jax-lift`; an old
    # install of that name (or the unrelated `lift` on the package index) would
    # leave a second `lift` package behind.
    if python -m pip show -qq lift >/dev/null 2>&1; then
        python -m pip uninstall -qq -y lift
        pip_install python --no-deps --force-reinstall -e .
    fi
    echo "$WANT" >"$STAMP"
else
    echo "dependencies up to date (delete $STAMP to reinstall)"
fi
python -c 'import jax, lift; print("jax", jax.__version__, "| lift", lift.__version__)'
# The other venvs get the same JAX: on Python 3.12+ the newest release would
# otherwise be picked, and a test run should not change with the index.
mapfile -t JAX_PINS < <(python -c 'import jax, jaxlib; print(f"jax=={jax.__version__}"); print(f"jaxlib=={jaxlib.__version__}")')
done_step

# -------------------------------------------------------------------- packaging
step "build the sdist and wheel (python -m build)"
# The wheel is built from the sdist, so a file missing from the sdist fails here.
python -m build --outdir "$TMP/dist" . >"$TMP/build.log" 2>&1 || {
    cat "$TMP/build.log"
    fail "python -m build failed"
}
SDIST=$(echo "$TMP"/dist/*.tar.gz)
WHEEL=$(echo "$TMP"/dist/*.whl)
ls -l "$TMP/dist"
done_step

step "check the sdist and wheel (twine, check-wheel-contents, contents)"
twine check --strict "$SDIST" "$WHEEL"
check-wheel-contents "$WHEEL"
python - "$WHEEL" <<'EOF'
import re
import sys
import zipfile
from email.parser import Parser

from lift import __version__

wheel = zipfile.ZipFile(sys.argv[1])
names = set(wheel.namelist())
meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
meta = Parser().parsestr(wheel.read(meta_name).decode())
problems = []
if meta["Name"] != "jax-lift":
    problems.append(f"distribution name {meta['Name']!r}, expected 'jax-lift'")
if meta["Version"] != __version__:
    problems.append(f"version {meta['Version']} but lift.__version__ {__version__}")
for needed in ("lift/__init__.py", "lift/py.typed"):
    if needed not in names:
        problems.append(f"{needed} is not in the wheel")
stray = sorted(n for n in names if not re.match(r"lift/|jax_lift-[^/]+\.dist-info/", n))
if stray:
    problems.append(f"files outside lift/: {stray}")
if problems:
    sys.exit("wheel: " + "; ".join(problems))
print(f"{meta['Name']} {meta['Version']}: {len(names)} files, py.typed shipped")
EOF
done_step

# ------------------------------------------------------------------------ tests
step "pytest (tests/ and doctests in lift/, every extra)"
if [ -n "${CI:-}" ]; then
    export HYPOTHESIS_PROFILE=ci
fi
# Every optional extra is installed above: a module that cannot import its extra
# is an error here, not a silent skip.
LIFT_REQUIRE_EXTRAS=1 run_pytest "$TMP/pytest.log" python
done_step

# lift.jit's C++ dispatch layer is optional: the transform tests pass without it too.
step "pytest, transforms with lift.jit's fast path off (LIFT_JIT_FAST_PATH=0)"
LIFT_JIT_FAST_PATH=0 LIFT_REQUIRE_EXTRAS=1 run_pytest "$TMP/pytest-slow-path.log" \
    python tests/test_transforms.py tests/test_multidevice.py tests/test_memory.py \
    tests/test_equivalence.py tests/test_differential.py
done_step

# ------------------------------------------------------------------------- lint
SOURCES=()
for dir in lift tests examples benchmarks; do
    if [ -d "$dir" ]; then SOURCES+=("$dir"); fi
done
step "ruff check ${SOURCES[*]}"
ruff check "${SOURCES[@]}"
done_step

step "ruff format --check ${SOURCES[*]}"
ruff format --check "${SOURCES[@]}"
done_step

step "pyright lift"
pyright lift
done_step

# ------------------------------------------------------------------------- docs
if [ -f mkdocs.yml ]; then
    step "mkdocs build --strict"
    NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet -d "$TMP/site"
    done_step
fi

# --------------------------------------------------------------------- examples
# Examples run once per check: here, unless a pytest module runs them already.
if [ -f tests/test_examples.py ]; then
    echo "examples: run by tests/test_examples.py in the pytest step"
else
    shopt -s nullglob
    EXAMPLES=(examples/*.py)
    shopt -u nullglob
    if [ ${#EXAMPLES[@]} -gt 0 ]; then
        step "examples (LIFT_EXAMPLES_QUICK=1)"
        for example in "${EXAMPLES[@]}"; do
            t0=$SECONDS
            LIFT_EXAMPLES_QUICK=1 MPLBACKEND=Agg python "$example" \
                >"$TMP/example.log" 2>&1 || {
                cat "$TMP/example.log"
                fail "$example failed"
            }
            echo "  $example ok ($((SECONDS - t0))s)"
        done
        done_step
    fi
fi

# ---------------------------------------------------------------- the wheel, installed
# What a user gets from `pip install 'jax-lift[...]'`: the built wheel in a venv
# made from plain python3, used from a folder outside the repository so that
# `import lift` cannot find the source tree.
WHEEL_VENV=$VENVS/wheel
WHEEL_EXTRAS=examples,equinox,inox,nnx,linen,haiku,testing
step "install the wheel in $(basename "$VENVS")/wheel ([$WHEEL_EXTRAS], not editable)"
mkdir -p "$VENVS"
fresh_venv "$WHEEL_VENV" "$BASE_PYTHON"
if [ "$NEW_VENV" = 1 ]; then
    pip_install "$WHEEL_VENV/bin/python" "$WHEEL[$WHEEL_EXTRAS]" "${JAX_PINS[@]}"
    stamp_venv "$WHEEL_VENV"
fi
# The dependencies are those of this pyproject.toml (stamp); lift itself is this
# run's wheel, always.
pip_install "$WHEEL_VENV/bin/python" --no-deps --force-reinstall "$WHEEL"
"$WHEEL_VENV/bin/python" -m pip check --disable-pip-version-check
done_step

step "the installed wheel: quickstart (quick mode) and every public module"
OUTSIDE=$TMP/outside
mkdir -p "$OUTSIDE"
# The whole folder, in case an example imports a module beside it.
cp -r examples "$OUTSIDE/examples"
(
    cd "$OUTSIDE"
    env -u PYTHONPATH "$WHEEL_VENV/bin/python" - "$ROOT" <<'EOF'
import importlib
import pkgutil
import sys
from importlib.metadata import version
from pathlib import Path

import lift

package = Path(lift.__file__).resolve().parent
if package == Path(sys.argv[1]).resolve() / "lift" or Path(sys.prefix).resolve() not in package.parents:
    sys.exit(f"lift was imported from {package}, not from the wheel in {sys.prefix}")
if version("jax-lift") != lift.__version__:
    sys.exit(f"jax-lift {version('jax-lift')} installed, lift says {lift.__version__}")
assert (package / "py.typed").is_file(), "py.typed is missing"
public = sorted(m.name for m in pkgutil.iter_modules(lift.__path__) if m.name[0] != "_")
expected = {"equinox", "inox", "nnx", "haiku", "io", "testing"}
if not expected <= set(public):
    sys.exit(f"the wheel lacks lift modules {sorted(expected - set(public))}")
for name in public:
    importlib.import_module(f"lift.{name}")
print(f"lift {lift.__version__} from {package}: imported lift.{{{','.join(public)}}}")
EOF
    LIFT_EXAMPLES_QUICK=1 MPLBACKEND=Agg env -u PYTHONPATH \
        "$WHEEL_VENV/bin/python" examples/quickstart.py >"$TMP/quickstart.log" 2>&1 || {
        cat "$TMP/quickstart.log"
        fail "examples/quickstart.py failed with the installed wheel"
    }
    tail -n 3 "$TMP/quickstart.log"
)
done_step

# ---------------------------------------------------------------- other Pythons
# The core suite (the `test` extra, no optional framework) on each other Python:
# this also proves that every test needing an extra skips cleanly without it.
for version in $OTHER_PYTHONS; do
    step "pytest on Python $version, without optional extras"
    interpreter=$(find_python "$version") \
        || fail "no Python $version found (on PATH or in pyenv); install it, or set LIFT_OTHER_PYTHONS to the versions to test (empty: none)"
    core_venv=$VENVS/core-$version
    fresh_venv "$core_venv" "$interpreter"
    if [ "$NEW_VENV" = 1 ]; then
        pip_install "$core_venv/bin/python" "$WHEEL[test]" "${JAX_PINS[@]}"
        stamp_venv "$core_venv"
    fi
    pip_install "$core_venv/bin/python" --no-deps --force-reinstall "$WHEEL"
    "$core_venv/bin/python" -c 'import sys, jax; print("python", sys.version.split()[0], "| jax", jax.__version__)'
    # pytest imports lift from the source tree (the root conftest.py puts the
    # repository first on sys.path); the wheel supplies the metadata. The `dev`
    # hypothesis profile: the run above searched with the `ci` one already.
    HYPOTHESIS_PROFILE=dev LIFT_REQUIRE_EXTRAS='' \
        run_pytest "$TMP/pytest-$version.log" "$core_venv/bin/python"
    done_step
done

printf '\nstep times:\n'
printf '%s\n' "${TIMES[@]}"
printf '\nall checks passed in %ds\n' $((SECONDS - START))
