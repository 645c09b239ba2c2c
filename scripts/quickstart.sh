#!/usr/bin/env bash
# Try lift on a fresh machine that has only python3 (with venv and pip):
#
#   bash scripts/quickstart.sh
#
# Creates .venv if missing, installs lift from this clone (the distribution
# `jax-lift`, editable) with the examples' extras, and runs examples/quickstart.py.
# Pass LIFT_EXAMPLES_QUICK=1 for a few-second run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "==> pip install -e '.[examples]'   (jax-lift, imported as lift)"
.venv/bin/python -m pip install -qq --progress-bar off --upgrade pip
.venv/bin/python -m pip install -qq --progress-bar off -e '.[examples]'
echo "==> python examples/quickstart.py"
exec .venv/bin/python examples/quickstart.py "$@"
