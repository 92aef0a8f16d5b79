"""Shared helpers for the benchmarks in bench/: timing, machine info, memory probes, JSON.

Nothing here imports torch at module level, so a parent process that only orchestrates
workers stays light; the helpers that need torch import it lazily.

Conventions every benchmark follows:
  * warm-up runs are excluded from the statistics;
  * a timing reports min / median / mean / max and every run (`times_s`), median first;
  * a case that does not fit a budget is *skipped with a recorded reason*, never estimated
    and reported as if measured;
  * the JSON carries the command line, the date and the machine it ran on.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = [
    "REPO", "summarize", "time_callable", "CpuMonitor", "other_busy_cores", "wait_for_quiet",
    "rss_bytes", "maxrss_bytes", "PeakRSS", "emit_worker_result", "run_worker", "machine_info",
    "file_sha256", "git_state", "run_header", "to_json", "write_json", "log", "fmt_bytes", "fmt_seconds",
]

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def summarize(times: Sequence[float]) -> Dict[str, Any]:
    """min / median / mean / max / stdev of a list of seconds, plus the list itself."""
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
    """Time `fn()` `repeats` times after `warmup` untimed calls; return a summary.

    Wall-clock statistics are at the top level (`median_s`, ...); the process CPU time of
    the same runs is under `cpu_time` (same keys).

    `setup()` (untimed) runs before every call, e.g. to clear gradients. The garbage
    collector is run before and disabled during each timed call.

    With `budget_s`, the warm-up calls are timed and used to cap the number of repeats so
    that warm-up + repeats fit the budget. If fewer than `min_repeats` would fit, nothing
    is measured and the result has status "skipped" with the reason (the warm-up time is
    kept under `warmup_s`, labelled as such, and is never used as the measurement).
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
        # The warm-up may be slower than a steady run (first touches, thread pool start),
        # which makes this cap conservative.
        per_run = max(warm_times) if warm_times else 0.0
        spent = sum(warm_times)
        if per_run > 0:
            n = min(repeats, int(max(budget_s - spent, 0.0) // per_run))
        if n < min_repeats:
            return {
                "status": "skipped",
                "reason": (
                    f"time budget: one warm-up run took {per_run:.2f} s, so {min_repeats} "
                    f"timed repeats would not fit the {budget_s:.0f} s per-case budget"
                ),
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
    # CPU time of the whole process (all its threads) per run. With one torch thread it is
    # the work done, mostly insensitive to other processes competing for the cores (it
    # still includes their cache / memory-bandwidth interference).
    out["cpu_time"] = summarize(cpu_times)
    return out


# --------------------------------------------------------------------------------------
# CPU contention (Linux): how busy the rest of the machine was while we measured
# --------------------------------------------------------------------------------------


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


class CpuMonitor:
    """Measures, over an interval, this process's CPU use and everybody else's.

    `other_busy_cores` is the average number of cores kept busy by *other* processes
    (system busy time minus ours); `steal_cores` is hypervisor steal. Both should be ~0
    for clean numbers; they are recorded so that a noisy run can be recognised.
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
        out: Dict[str, Any] = {
            "wall_s": wall,
            "self_cpu_s": self_cpu,
            "self_cores": self_cpu / wall if wall > 0 else None,
        }
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


def loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def wait_for_quiet(max_wait_s: float, threshold_cores: float, sample_s: float = 1.0, poll_s: float = 4.0) -> Dict[str, Any]:
    """Wait (at most `max_wait_s`) until other processes use < `threshold_cores` cores.

    Returns {"quiet": bool, "waited_s": ..., "other_busy_cores": last sample}. Proceeding
    after a timeout is the caller's choice; the contention is recorded either way.
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


# --------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil  # fallback for non-Linux

        return psutil.Process().memory_info().rss


def maxrss_bytes() -> int:
    """High-water mark of this process's RSS since it started (ru_maxrss)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


class PeakRSS:
    """Extra peak memory of a block, from ru_maxrss. Use in a *fresh* process.

        with PeakRSS() as m:
            op()
        m.result  # {"peak_extra_bytes": ..., "resolved": bool, ...}

    ru_maxrss is a process-lifetime high-water mark, so the block's peak is only visible
    if it exceeds every earlier peak of the process. Hence: one case per fresh process,
    small setup before the block. If the high-water mark did not move (`resolved` false),
    the block's extra peak is only known to be <= `upper_bound_bytes` and
    `peak_extra_bytes` is None. `peak_extra_bytes` = high-water after - RSS just before,
    i.e. everything the block had resident at its peak beyond what was live on entry
    (temporaries, outputs, autograd buffers, gradients, allocator slack).
    """

    def __enter__(self):
        gc.collect()
        self.rss_before = rss_bytes()
        self.maxrss_before = maxrss_bytes()
        return self

    def __exit__(self, *exc):
        maxrss_after = maxrss_bytes()
        resolved = maxrss_after > self.maxrss_before
        self.result = {
            "method": "ru_maxrss high-water delta in a fresh subprocess",
            "rss_before_bytes": self.rss_before,
            "maxrss_before_bytes": self.maxrss_before,
            "maxrss_after_bytes": maxrss_after,
            "rss_after_bytes": rss_bytes(),
            "resolved": resolved,
            "peak_extra_bytes": (maxrss_after - self.rss_before) if resolved else None,
            "upper_bound_bytes": None if resolved else max(self.maxrss_before - self.rss_before, 0),
        }
        return False


# --------------------------------------------------------------------------------------
# Workers: run one case in a fresh Python process, exchange JSON
# --------------------------------------------------------------------------------------

WORKER_MARK = "@@BENCH_RESULT@@ "


def emit_worker_result(obj: Any) -> None:
    """Called by a worker: print its result as one marked JSON line on stdout."""
    sys.stdout.write(WORKER_MARK + json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def run_worker(cmd: Sequence[str], timeout_s: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run `cmd` (a worker), return its marked JSON result, or a failure record."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout_s, env=env, cwd=str(REPO)
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"worker killed after the {timeout_s:.0f} s hard timeout"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_MARK):
            res = json.loads(line[len(WORKER_MARK):])
            if isinstance(res, dict):
                res.setdefault("worker_wall_s", wall)
            return res
    tail = (proc.stderr or proc.stdout or "")[-2000:]
    return {"status": "failed", "reason": f"worker exited with code {proc.returncode}", "stderr_tail": tail}


# --------------------------------------------------------------------------------------
# Provenance: machine, date, command, code
# --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> List[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma", "avx_vnni")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def machine_info(torch_threads: Optional[int] = None) -> Dict[str, Any]:
    """CPU, memory, OS, Python and torch facts for the JSON header."""
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = usable_cpus()
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        vm = psutil.virtual_memory()
        info["memory_total_bytes"] = vm.total
        info["memory_available_bytes_at_start"] = vm.available
    except Exception:  # psutil is optional
        pass
    if loadavg() is not None:
        info["loadavg_at_start"] = loadavg()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch_threads if torch_threads is not None else torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        info["mkldnn"] = bool(torch.backends.mkldnn.is_available())
        info["mkl"] = bool(torch.backends.mkl.is_available())
        for line in torch.__config__.parallel_info().splitlines():
            if line.startswith("ATen parallel backend"):
                info["aten_parallel_backend"] = line.split(":", 1)[1].strip()
    except Exception as e:  # pragma: no cover
        info["torch"] = f"unavailable ({e})"
    return info


def file_sha256(path: os.PathLike) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def git_state(paths: Sequence[str] = ()) -> Dict[str, Any]:
    """HEAD commit and whether `paths` (repo-relative) differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    out: Dict[str, Any] = {"commit": git("rev-parse", "HEAD") or None}
    if paths:
        out["modified_vs_head"] = {p: bool(git("status", "--porcelain", "--", p)) for p in paths}
    return out


def run_header(name: str, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv if argv is None else argv)
    return {
        "benchmark": name,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO)] + argv),
        "argv": argv,
        "cwd": os.getcwd(),
    }


# --------------------------------------------------------------------------------------
# JSON and logging
# --------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default)


def write_json(path: os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, creating parent folders; atomic via a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(obj) + "\n")
    os.replace(tmp, path)
    return path


def emit_result(result: Dict[str, Any], out: Optional[os.PathLike] = None) -> None:
    """The end of a benchmark run: record the load average, print the JSON on stdout and,
    with `out`, also write it there."""
    if loadavg() is not None:
        result["machine"]["loadavg_at_end"] = loadavg()
    print(to_json(result))
    if out:
        write_json(out, result)
        log(f"wrote {out}")


def log(msg: str) -> None:
    """Progress goes to stderr; stdout is reserved for the JSON result."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"
