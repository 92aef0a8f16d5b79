"""Where things are, resolved at run time (never absolute paths in code)."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from retconvert.errors import RetconvertError

# The repository root, when retconvert runs from a checkout (editable install).
REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The offline data folder: $RETCONVERT_DATA, else `../shared/data` beside the checkout."""
    env = os.environ.get("RETCONVERT_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def shared_data_file(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.exists():
        raise RetconvertError(
            f"offline data file {path} not found; set RETCONVERT_DATA to the folder holding {relative}"
        )
    return path


@contextmanager
def atomic_output_dir(out: Path, force: bool = False):
    """Yield a temporary sibling folder; on success it is renamed to `out`.

    A failure or Ctrl-C removes the temporary folder, so `out` is either absent, the old
    content (kept until the new one is complete), or the complete new content.
    """
    out = Path(out)
    if out.exists() and not force:
        raise RetconvertError(f"output {out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
