"""What gets installed: the lock's exact versions, and a package list setuptools does not warn about."""

import importlib.metadata
import re
import tomllib

from conftest import REPO
import pytest

LOCK = REPO / "requirements.lock"


def locked_versions() -> dict:
    versions = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
            versions[re.sub(r"[-_.]+", "-", name).lower()] = version
    return versions


def test_lock_pins_every_package_with_a_hash():
    lines = [x for x in LOCK.read_text().splitlines() if x and not x.startswith("#")]
    assert lines and all(re.fullmatch(r"\S+==\S+( --hash=sha256:[0-9a-f]{64})+", x) for x in lines)
    assert {"torch", "transformers", "deepspeed", "pytest", "ruff"} <= set(locked_versions())


def test_lock_holds_every_declared_dependency():
    """CI installs only the lock: a dependency or dev tool (pytest, ruff) that pyproject.toml
    declares but a regenerated lock dropped would be missing there."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = [re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", r).group()).lower() for r in declared]
    assert "ruff" in names
    missing = sorted(set(names) - set(locked_versions()))
    assert not missing, f"requirements.lock lacks {missing} (regenerate it with bash scripts/lock.sh)"


def test_installed_versions_are_the_locked_ones():
    """A venv that drifted from the lock (a resolve that took newer releases) tests something
    else than what users get; CI installs from the lock, so this holds there."""
    if not (REPO / ".venv" / ".retconvert-setup").exists():
        pytest.skip("not the venv of scripts/setup.sh (e.g. scripts/deps.sh testing other versions)")
    drift = []
    for name, version in locked_versions().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            drift.append(f"{name}: locked {version}, installed {installed}")
    assert not drift, "; ".join(drift) + " (run bash scripts/setup.sh)"


def test_every_folder_of_package_data_is_a_listed_package():
    """setuptools warns once per importable folder missing from `packages` (a screen of
    warnings on every install): every folder that ships files must be listed."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    missing = []
    for package, folder in setup["package-dir"].items():
        for sub in (REPO / folder).rglob("*"):
            if sub.is_dir() and sub.name != "__pycache__" and any(f.is_file() for f in sub.iterdir()):
                name = package + "." + ".".join(sub.relative_to(REPO / folder).parts)
                if name not in listed:
                    missing.append(name)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
