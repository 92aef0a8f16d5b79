"""Where things are, resolved at run time (never absolute paths in code)."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

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


def display_path(spec: str) -> str:
    """`spec` as a report shows it: an absolute path under the home folder as `~/...` (so committed
    reports do not carry the machine's home), anything else (a name, a Hub ID) unchanged."""
    home = Path.home()
    path = Path(spec)
    if path.is_absolute() and path.is_relative_to(home) and path != home:
        return f"~/{path.relative_to(home).as_posix()}"
    return spec


def is_retnet_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a RetNet checkpoint: a config.json whose model_type is "retnet"."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "retnet"
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not a JSON object
        return False


def check_output_dir(out: Path, force: bool = False, ours: Callable[[Path], bool] = is_retnet_checkpoint,
                     kind: str = "a RetNet checkpoint (config.json with model_type retnet)"):
    """Raise RetconvertError unless `out` may be written: it is absent, or `force` is set and it
    is a folder `ours` recognises as this tool's output of that `kind`. --force never replaces a
    plain file or a folder of something else (a home folder, a teacher, a half-finished run)."""
    out = Path(out)
    if not out.exists():
        return
    if not force and out.is_dir() and ours(out):
        raise RetconvertError(f"output {out} already exists; pass --force to replace it")
    if not out.is_dir():
        raise RetconvertError(f"output {out} already exists and is a file, which --force never replaces; "
                              f"choose another --out or remove {out} yourself")
    if not ours(out):
        raise RetconvertError(f"output {out} already exists and is not {kind}, which --force never replaces; "
                              f"choose another --out or remove {out} yourself")


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, ours: Callable[[Path], bool] = is_retnet_checkpoint,
                      kind: str = "a RetNet checkpoint (config.json with model_type retnet)"):
    """Yield a temporary sibling folder; on success it is renamed to `out`.

    An existing `out` is replaced only with `force`, and only when `ours(out)` recognises it as
    this tool's output (`check_output_dir`; `kind` names it in the error). A failure or Ctrl-C
    removes the temporary folder, so `out` is either absent, the old content (kept until the new
    one is complete), or the complete new content.
    """
    out = Path(out)
    check_output_dir(out, force=force, ours=ours, kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            check_output_dir(out, force=force, ours=ours, kind=kind)  # it may have changed meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
