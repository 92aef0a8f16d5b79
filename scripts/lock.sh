#!/usr/bin/env bash
# Write requirements.lock from a tested virtual environment: every installed package (the
# project itself aside) at its exact version with the sha256 of the file pip installs here.
#   bash scripts/lock.sh [VENV]      default .venv-newest (see scripts/deps.sh newest)
# The lock is for this platform (Linux x86_64, CPython 3.11, the CPU build of torch), which is
# what scripts/setup.sh and CI install. Commit it with the dependency report of the same venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-newest}
[[ -x $VENV/bin/python ]] || { echo "lock.sh: no virtual environment at $VENV; run 'bash scripts/deps.sh newest' first" >&2; exit 2; }
export PYTHONWARNINGS="ignore:Editable installation"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$VENV/bin/python" -m pip freeze --all --exclude-editable | grep -v -i '^retconvert' > "$TMP/freeze.txt"
# pip lock (experimental) records the file and its hash for each pin; --no-deps: the freeze is
# already the whole closure. deepspeed's metadata build imports torch, hence no isolation.
"$VENV/bin/python" -m pip --disable-pip-version-check -q lock --no-deps --no-build-isolation \
    -r "$TMP/freeze.txt" -o "$TMP/pylock.toml" 2> >(grep -v -e "is ignored" -e "experimental" >&2)
"$VENV/bin/python" - "$TMP/pylock.toml" requirements.lock "$VENV" <<'PY'
import re
import sys
import tomllib

lock, out, venv = sys.argv[1:]
packages = tomllib.load(open(lock, "rb"))["packages"]
# Every dependency pyproject.toml declares, the dev extra included (pytest, ruff: what CI runs),
# must be in the lock; a venv without them would write a lock that CI cannot run from.
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = project["dependencies"] + project["optional-dependencies"]["dev"]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


locked = {norm(p["name"]) for p in packages}
missing = [r for r in declared if norm(re.match(r"[A-Za-z0-9_.\-]+", r).group()) not in locked]
if missing:
    sys.exit(f"lock.sh: {venv} lacks {', '.join(missing)}; install '.[dev]' there (scripts/deps.sh newest does)")
lines = [
    f"# Every package scripts/setup.sh installs, exact versions and file hashes (written by scripts/lock.sh",
    f"# from {venv}; Linux x86_64, CPython 3.11, torch's CPU build). Installed with --no-deps --require-hashes.",
]
for p in sorted(packages, key=lambda p: p["name"].lower()):
    files = p.get("wheels") or [p["sdist"]]
    hashes = " ".join(f"--hash=sha256:{f['hashes']['sha256']}" for f in files)
    lines.append(f"{p['name']}=={p['version']} {hashes}")
open(out, "w").write("\n".join(lines) + "\n")
print(f"lock.sh: {len(packages)} packages -> {out}")
PY
