"""The one check of a device option (`--device`, `run.device`) before anything loads."""

import torch

from retconvert.errors import RetconvertError

KINDS = ("cpu", "cuda", "mps")  # the device types the models are run and tested on


def check_device(device: str, option: str = "--device", need_available: bool = True) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1", "mps") as a torch.device, or RetconvertError naming
    `option` and a fix: a string torch does not parse, an unsupported type, or (with
    `need_available`) a device this machine lacks. `need_available=False` checks the spelling
    only, for a config that may be written on one machine and run on another."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in KINDS:
        raise RetconvertError(f"{option} {device!r} is not a device; use cpu, cuda, cuda:N (N: the GPU index) or mps")
    if not need_available or parsed.type == "cpu":
        return parsed
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RetconvertError(f"{option} {device}: no Apple MPS device is available here; use {option} cpu")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RetconvertError(f"{option} {device}: no CUDA device is available (torch {torch.__version__}, "
                                  f"CUDA build: {torch.version.cuda or 'no'}); use {option} cpu")
        if parsed.index is not None and parsed.index >= count:
            raise RetconvertError(f"{option} {device}: this machine has {count} CUDA device(s), cuda:0 to "
                                  f"cuda:{count - 1}; pick one of those")
    return parsed
