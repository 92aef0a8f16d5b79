"""Shared fixtures: tiny random models and paths to the offline data."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RETCONVERT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """The packed decoder's kernel choices go to a file of this run, not the user's cache."""
    os.environ["RETCONVERT_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernels") / "decoder-kernels.json")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data not found at {SHARED_DATA}")
    return SHARED_DATA
