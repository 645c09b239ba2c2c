#!/usr/bin/env bash
# The full check, on a fresh machine that has only python3 (with venv and pip):
#
#   bash scripts/test.sh
#
# Creates .venv if missing, installs lift with every extra (`.[dev]`), then runs,
# stopping at the first failure:
#   tests + doctests (pytest -n 2) · ruff check · ruff format --check · pyright
#   · mkdocs build --strict (if mkdocs.yml exists) · the examples, quick mode.
# CI runs exactly this (.ci/run). With CI set, hypothesis uses its `ci` profile.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PYTHON=${PYTHON:-python3}
START=$SECONDS
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

step() {
    STEP_NAME=$1
    STEP_START=$SECONDS
    printf '\n==> %s\n' "$STEP_NAME"
}
done_step() {
    printf '<== %s: ok (%ds)\n' "$STEP_NAME" $((SECONDS - STEP_START))
}

# ------------------------------------------------------------------ environment
step "environment (.venv, pip install -e '.[dev]')"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
export VIRTUAL_ENV=$VENV
export PATH="$VENV/bin:$PATH"
# -qq: pip prints errors only (this machine's pip.conf makes -q chatty).
# Skip the (slow, network-bound) install when pyproject.toml has not changed
# since the last successful one in this .venv.
STAMP=$VENV/.lift-dev-install
WANT=$(python -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' pyproject.toml)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    python -m pip install -qq --progress-bar off --upgrade pip
    python -m pip install -qq --progress-bar off -e '.[dev]'
    echo "$WANT" >"$STAMP"
else
    echo "dependencies up to date (delete $STAMP to reinstall)"
fi
python -c 'import jax, lift; print("jax", jax.__version__, "| lift", lift.__version__)'
done_step

# ------------------------------------------------------------------------ tests
step "pytest (tests/ and doctests in lift/)"
if [ -n "${CI:-}" ]; then
    export HYPOTHESIS_PROFILE=ci
fi
# Every optional extra is installed above: a module that cannot import its extra
# is an error here, not a silent skip.
export LIFT_REQUIRE_EXTRAS=1
pytest -n 2 -p no:cacheprovider 2>&1 | tee "$TMP/pytest.log"
# `set -o pipefail` already fails on pytest's exit code (5 = nothing collected);
# this also refuses a run whose summary reports no passed test at all.
if ! tail -n 5 "$TMP/pytest.log" | grep -Eq '[0-9]+ passed'; then
    echo "error: pytest reported no passed tests" >&2
    exit 1
fi
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
                echo "error: $example failed" >&2
                exit 1
            }
            echo "  $example ok ($((SECONDS - t0))s)"
        done
        done_step
    fi
fi

printf '\nall checks passed in %ds\n' $((SECONDS - START))
