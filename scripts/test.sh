#!/usr/bin/env bash
# Set up .venv if needed, lint, then run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The linter (ruff, pinned in the lock; configuration in pyproject.toml) first: a finding
# fails the run, as a failing test does.
if ! .venv/bin/ruff check --quiet .; then
    echo "test.sh: ruff reports the findings above; fix them, then run the tests again" >&2
    exit 1
fi
if [[ $# -eq 0 ]]; then
    set -- -m "not slow"
fi
exec .venv/bin/python -m pytest "$@"
