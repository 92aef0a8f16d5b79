#!/usr/bin/env bash
# Create and fill .venv idempotently from requirements.lock: every package at the exact version
# and file hash that CI tests, whatever has been released since. A second run with unchanged
# inputs returns at once. To move the lock: scripts/deps.sh newest, then scripts/lock.sh.
# GPU users: install your CUDA torch into a venv first, then `pip install -e .` (open ranges).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.retconvert-setup
LOCK=requirements.lock
# Everything that decides what gets installed; a change re-runs the install.
INPUTS=$(cat pyproject.toml "$LOCK" scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && $(cat "$STAMP") == "$INPUTS" ]]; then
    exit 0
fi

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q install --require-hashes --no-deps)
# setuptools says "Editable installation... be careful with folders named like your package" on
# every editable install of a mapped layout; it is information, not a fault.
export PYTHONWARNINGS="ignore:Editable installation"
FIRST='^(pip|setuptools|wheel|torch)=='

# pip's own tools and the CPU torch first: deepspeed builds from source and imports torch.
"${PIP[@]}" -r <(grep -E "$FIRST" "$LOCK")
# Then everything else exactly as locked, no resolve (the lock is the whole closure); the
# source-only packages build against this venv.
"${PIP[@]}" --no-build-isolation -r <(grep -v -E "$FIRST" "$LOCK" | grep -v '^#')
# The project itself, editable.
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e .

echo "$INPUTS" > "$STAMP"
