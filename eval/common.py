"""Helpers shared by the eval suites: progress lines, machine description, timing, memory probes."""

import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

_T0 = time.time()


def log(message: str):
    """A progress line on stderr: elapsed time, then the message."""
    elapsed = time.time() - _T0
    print(f"[eval {int(elapsed // 60):3d}:{elapsed % 60:04.1f}] {message}", file=sys.stderr, flush=True)


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device):
    """(seconds that `fn()` takes, its result), with the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t, result


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def free_memory(device=None):
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def machine_info(device) -> dict:
    """What the figures were measured on."""
    import transformers

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _total_ram(),
        "device": str(device),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import lm_eval

        info["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        info["lm_eval"] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _total_ram() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class PeakRSS:
    """Peak resident set size over a block, via Linux's resettable high-water mark.

    Writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0); where that is not
    possible `reason` says why and `peak` stays None (the lifetime peak would be misleading).
    """

    def __init__(self):
        self.peak: Optional[int] = None
        self.baseline: Optional[int] = None
        self.reason: Optional[str] = None

    def __enter__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.baseline = rss_bytes()
        except OSError as e:
            self.reason = f"cannot reset the peak RSS (/proc/self/clear_refs: {e.strerror or e})"
        return self

    def __exit__(self, *exc):
        if self.reason is None:
            kib = _status_kib("VmHWM")
            if kib is None:
                self.reason = "no VmHWM in /proc/self/status"
            else:
                self.peak = kib * 1024
        return False


def cache_nbytes(cache) -> int:
    """Bytes held by a decoding cache: RetNetState.nbytes(), or the tensors of a KV cache."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    if hasattr(cache, "layers"):  # transformers >= 4.56 Cache: one object per layer
        return sum(_tensor_bytes(vars(layer)) for layer in cache.layers)
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return _tensor_bytes(list(cache.key_cache) + list(cache.value_cache))
    return _tensor_bytes(cache)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
