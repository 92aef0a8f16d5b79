"""The measurement toolkit shared by the eval suite (`retconvert eval`) and the benchmarks (bench/).

Timing with warm-up and medians, engines timed in turns, peak memory, how busy the rest of
the machine was, what machine it was, and JSON output. One definition of each, so that a
figure in a report and one in docs/bench/*.json mean the same thing.

The module needs only the standard library at import time (torch and the version lookups
are imported when used): bench/common.py executes this file by path in every benchmark
worker process, where importing the `retconvert` package would also import transformers.

Conventions:
  * warm-up runs are excluded from the statistics; the median is the headline and every
    run is kept (`times_s`);
  * a case that does not fit its budget is skipped with the reason recorded, never
    estimated and reported as if measured;
  * contention from other processes is measured and recorded next to the figure.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device=None):
    """(seconds that `fn()` takes, its result), the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t, result


def summarize(times: Sequence[float]) -> Dict[str, Any]:
    """`n`, `median_s`, `min_s`, `mean_s`, `max_s`, `stdev_s` of a list of seconds, and the list (`times_s`)."""
    times = [float(t) for t in times]
    if not times:
        return {"n": 0, "times_s": []}
    return {
        "n": len(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "max_s": max(times),
        "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "times_s": times,
    }


def time_callable(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int = 1,
    setup: Optional[Callable[[], Any]] = None,
    budget_s: Optional[float] = None,
    min_repeats: int = 3,
) -> Dict[str, Any]:
    """Time `fn()` `repeats` times after `warmup` untimed calls; return `summarize()`'s keys.

    Wall-clock statistics are at the top level (`median_s`, ...); the process CPU time of the
    same runs (all threads) is under `cpu_time`, with the same keys: with one torch thread it
    is the work done, nearly blind to other processes on the cores (not to their use of the
    caches and memory bandwidth). `setup()` (untimed) runs before every call, e.g. to clear
    gradients. The garbage collector runs before and is disabled during each timed call.

    With `budget_s` (seconds), the warm-up calls are timed and cap the number of repeats so
    that warm-up + repeats fit the budget; if fewer than `min_repeats` would fit, nothing is
    measured: the result is {"status": "skipped", "reason", "warmup_s"} (the warm-up times,
    labelled as such, never used as the measurement).
    """
    warm_times: List[float] = []
    for _ in range(max(warmup, 0)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        warm_times.append(time.perf_counter() - t0)

    n = repeats
    if budget_s is not None:
        # A warm-up may be slower than a steady run (first touches, thread pool start), which
        # makes this cap conservative.
        per_run = max(warm_times) if warm_times else 0.0
        if per_run > 0:
            n = min(repeats, int(max(budget_s - sum(warm_times), 0.0) // per_run))
        if n < min_repeats:
            return {
                "status": "skipped",
                "reason": (f"time budget: one warm-up run took {per_run:.2f} s, so {min_repeats} timed "
                           f"repeats would not fit the {budget_s:.0f} s per-case budget"),
                "warmup_s": warm_times,
            }

    times: List[float] = []
    cpu_times: List[float] = []
    for _ in range(n):
        if setup is not None:
            setup()
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        finally:
            if gc_was_enabled:
                gc.enable()
    out = {"status": "ok", "warmup_s": warm_times, "repeats_requested": repeats}
    out.update(summarize(times))
    out["cpu_time"] = summarize(cpu_times)
    return out


SETTLE_S = 0.3  # pause before each block of take_turns


def take_turns(steps: Mapping[str, Callable[[], Any]], blocks: Sequence[int], warmup: int,
               settle_s: float = SETTLE_S, starts: Optional[Mapping[str, Callable[[], Any]]] = None,
               device=None) -> Dict[str, List[float]]:
    """Time several engines' steps in turns, a block of consecutive steps each.

    `steps`: {name: step()}, one call = one step (a decoded token, say). `blocks`: the timed
    steps of each round, e.g. [8, 8, 8] for three rounds of 8. In every round each engine in
    turn waits `settle_s` s, calls `starts[name]()` if given (untimed: e.g. reload a state),
    makes `warmup` untimed steps, then the round's timed steps, each between device syncs.
    Returns {name: [seconds of each timed step]}, in order.

    Why turns and blocks: a slow phase of a shared machine then hits every engine alike, and
    BLAS/OpenMP worker threads, which keep spinning for a while after a call and slow whatever
    runs next, are given the pause and the warm-up steps to stop.
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for n in blocks:
        for name, step in steps.items():
            time.sleep(settle_s)
            if starts and name in starts:
                starts[name]()
            for i in range(warmup + n):
                t, _ = timed(step, device)
                if i >= warmup:
                    times[name].append(t)
    return times


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> Optional[int]:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    """This process's resident set size now (Linux: VmRSS; elsewhere psutil if installed, else None)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def maxrss_bytes() -> int:
    """This process's RSS high-water mark (ru_maxrss): since it started, or since PeakRSS last reset it."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _high_water_bytes() -> int:
    """The RSS high-water mark: VmHWM (read with VmRSS from one file, so the two agree), else ru_maxrss."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else maxrss_bytes()


def _reset_rss_peak() -> Optional[str]:
    """Reset the RSS high-water mark to the current RSS; None on success, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return None
    except OSError as e:
        return f"cannot reset the RSS high-water mark (/proc/self/clear_refs: {e.strerror or e})"


class PeakRSS:
    """The peak resident set size (RSS) of this process while a block runs, in bytes.

        with PeakRSS() as m:
            op()
        m.peak, m.baseline   # the RSS high-water mark during the block; RSS on entry (after gc)
        m.result             # the same as a JSON record, keys below

    What it measures: pages of the whole process resident in RAM (every thread and allocator:
    torch, numpy, Python), not bytes held by tensors. `peak - baseline` is what the block had
    resident at its peak beyond what was live on entry: temporaries, outputs, autograd
    buffers, gradients, and allocator slack (glibc keeps freed heap memory).

    How: on entry the kernel's high-water mark is reset to the current RSS (5 written to
    /proc/self/clear_refs, Linux >= 4.0); on exit the mark (VmHWM, also ru_maxrss) is the
    block's peak.
    Where the reset is refused, the mark is the process's lifetime peak, and it shows the
    block's peak only if the block went above every earlier peak: then `resolved` is true;
    otherwise `peak` is None, `reason` says why, and `upper_bound_bytes` bounds the block's
    extra peak (in that case probe one block per fresh process, with little before it).

    Limits: memory the process already holds (an allocator's free lists) and reuses does
    not raise the peak, so a block after a larger one can read low; pages swapped out or
    mapped but never touched do not count; the kernel updates its counters in batches of a
    few pages per thread, so a block that allocates next to nothing can read a few hundred
    KiB below zero; GPU memory is not included (torch.cuda.max_memory_allocated).
    Keys of `result`: method, rss_before_bytes, maxrss_before_bytes, maxrss_after_bytes,
    rss_after_bytes, resolved, peak_extra_bytes, upper_bound_bytes.
    """

    def __enter__(self):
        gc.collect()
        self.reset_error = _reset_rss_peak()
        self.baseline: Optional[int] = rss_bytes()
        self.maxrss_before = _high_water_bytes()
        self.peak: Optional[int] = None
        self.reason: Optional[str] = None
        return self

    def __exit__(self, *exc):
        after = _high_water_bytes()
        resolved = self.reset_error is None or after > self.maxrss_before
        if resolved:
            self.peak = after
        else:
            self.reason = (f"{self.reset_error}, and the block stayed under the process's earlier peak "
                           "(probe it in a fresh process)")
        extra = None if self.peak is None or self.baseline is None else self.peak - self.baseline
        self.result = {
            "method": ("RSS high-water mark reset on entry (/proc/self/clear_refs), read on exit (VmHWM)"
                       if self.reset_error is None
                       else "ru_maxrss (lifetime high-water mark) delta, meant for a fresh process"),
            "rss_before_bytes": self.baseline,
            "maxrss_before_bytes": self.maxrss_before,
            "maxrss_after_bytes": after,
            "rss_after_bytes": rss_bytes(),
            "resolved": resolved,
            "peak_extra_bytes": extra,
            "upper_bound_bytes": None if resolved or self.baseline is None
            else max(self.maxrss_before - self.baseline, 0),
        }
        return False


# --------------------------------------------------------------------------------------------
# Contention (Linux): how busy the rest of the machine was while we measured
# --------------------------------------------------------------------------------------------


def _read_proc_stat() -> Optional[Dict[str, int]]:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    vals = [int(x) for x in fields]
    # user nice system idle iowait irq softirq steal guest guest_nice
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    steal = vals[7] if len(vals) > 7 else 0
    total = sum(vals[:8])
    return {"busy": total - idle - steal, "steal": steal, "total": total}


def loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


class CpuMonitor:
    """This process's CPU use over a block, and everybody else's (from /proc/stat).

        with CpuMonitor() as mon:
            op()
        mon.result  # {"wall_s", "self_cpu_s", "self_cores", "other_busy_cores", "steal_cores", "loadavg"}

    `other_busy_cores` is the average number of cores kept busy by *other* processes (the
    system's busy time minus ours, over the wall time); `steal_cores` is hypervisor steal.
    Both should be about 0 for clean numbers; they are recorded so that a noisy run can be
    recognised. Without /proc/stat both are absent.
    """

    def __enter__(self):
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._sys0 = _read_proc_stat()
        self._self0 = os.times()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.result = self.read()
        return False

    def read(self) -> Dict[str, Any]:
        wall = time.perf_counter() - self._t0
        me = os.times()
        self_cpu = (me.user - self._self0.user) + (me.system - self._self0.system)
        out: Dict[str, Any] = {"wall_s": wall, "self_cpu_s": self_cpu,
                               "self_cores": self_cpu / wall if wall > 0 else None}
        sys1 = _read_proc_stat()
        if self._sys0 is not None and sys1 is not None and wall > 0:
            busy = (sys1["busy"] - self._sys0["busy"]) / self._tick
            steal = (sys1["steal"] - self._sys0["steal"]) / self._tick
            out["other_busy_cores"] = max(busy - self_cpu, 0.0) / wall
            out["steal_cores"] = steal / wall
        if loadavg() is not None:
            out["loadavg"] = loadavg()
        return out


def other_busy_cores(sample_s: float = 1.0) -> Optional[float]:
    """Cores kept busy by processes other than this one over the next `sample_s` seconds."""
    with CpuMonitor() as mon:
        time.sleep(sample_s)
    return mon.result.get("other_busy_cores")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def contention_limit(threads: int, tolerance: float) -> float:
    """Cores other processes may keep busy before a measurement with `threads` threads counts
    as contended: the cores our threads do not need, plus `tolerance`."""
    return max(usable_cpus() - threads, 0) + tolerance


def wait_for_quiet(max_wait_s: float, threshold_cores: float, sample_s: float = 1.0,
                   poll_s: float = 4.0) -> Dict[str, Any]:
    """Wait (at most `max_wait_s` s) until other processes keep fewer than `threshold_cores` busy.

    Returns {"quiet": bool, "waited_s", "other_busy_cores": the last sample}. Going on after
    a timeout is the caller's choice; the contention is recorded either way.
    """
    t0 = time.perf_counter()
    while True:
        busy = other_busy_cores(sample_s)
        waited = time.perf_counter() - t0
        if busy is None or busy < threshold_cores:
            return {"quiet": True, "waited_s": waited, "other_busy_cores": busy}
        if waited + poll_s > max_wait_s:
            return {"quiet": False, "waited_s": waited, "other_busy_cores": busy}
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _cpu_flags() -> List[str]:
    """The vector and matrix extensions that decide which CPU kernels run."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma", "avx_vnni")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _total_ram() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def package_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution (e.g. "lm_eval"), or None if it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device="cpu", torch_threads: Optional[int] = None) -> Dict[str, Any]:
    """What a figure was measured on: CPU, memory, OS, library versions, device, date (UTC).

    Three facts carry two names each, so that the eval suite's results.json and the
    committed benchmark JSON keep the keys they were written with: `cpu` = `cpu_model`,
    `cpu_count` = `logical_cpus`, `ram_bytes` = `memory_total_bytes`. `torch_threads`
    records a thread count the caller will set (default: torch's current one).
    """
    import torch

    cpu, cpus, ram = _cpu_model(), os.cpu_count(), _total_ram()
    info: Dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu, "cpu_model": cpu,
        "cpu_flags": _cpu_flags(),
        "cpu_count": cpus, "logical_cpus": cpus,
        "cpus_usable": usable_cpus(),
        "ram_bytes": ram, "memory_total_bytes": ram,
        "torch": torch.__version__,
        "torch_threads": torch_threads if torch_threads is not None else torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "mkl": bool(torch.backends.mkl.is_available()),
        "transformers": package_version("transformers"),
        "lm_eval": package_version("lm_eval"),
        "device": str(device),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend"):
            info["aten_parallel_backend"] = line.split(":", 1)[1].strip()
    try:
        import psutil  # optional: physical cores and free memory

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_available_bytes_at_start"] = psutil.virtual_memory().available
    except ImportError:
        pass
    if loadavg() is not None:
        info["loadavg_at_start"] = loadavg()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy and torch scalars
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any, indent: Optional[int] = 2) -> str:
    """JSON (one line with `indent=None`); paths as strings, numpy/torch scalars as numbers."""
    return json.dumps(obj, indent=indent, default=_json_default)


def write_json(path: os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, creating parent folders; atomic (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(obj) + "\n")
    os.replace(tmp, path)
    return path


def emit_result(result: Dict[str, Any], out: Optional[os.PathLike] = None) -> None:
    """The end of a measurement run: record the load average under `result["machine"]`, print
    the JSON on stdout and, with `out`, also write it there."""
    if loadavg() is not None:
        result["machine"]["loadavg_at_end"] = loadavg()
    print(to_json(result))
    if out:
        write_json(out, result)
        print(f"wrote {out}", file=sys.stderr, flush=True)


def fmt_bytes(n: Optional[float]) -> str:
    """1536 -> '1.50 KiB'; None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def fmt_seconds(s: Optional[float]) -> str:
    """0.0123 -> '12.3 ms'; None -> '-'."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"
