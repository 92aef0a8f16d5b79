#!/usr/bin/env bash
# The main job on the embedded default: set up .venv if needed, convert the SmolLM2-135M
# teacher into a RetNet, then print teacher vs student perplexity on the held-out C4 set
# and a greedy sample from each. Extra arguments go to `retconvert from-hf`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/retconvert from-hf smollm2-135m --out outputs/smollm2-135m-retnet --force --compare "$@"
