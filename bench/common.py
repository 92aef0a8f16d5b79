"""What the benchmarks in bench/ share beyond the measurement toolkit.

The measurement helpers (timing, peak RSS, contention, machine info, JSON output) are the
library's, `retconvert.eval.measure`, re-exported here. This file executes it by path: it
needs only the standard library, whereas `import retconvert...` runs the package's
__init__, which imports transformers (about 3 s of CPU in every worker process).

Bench-only code lives here: running one case in a fresh worker process, the provenance
header of a run (command, git commit, file hashes), and the cases of the retention
functions that bench/retention.py and bench/prefill.py time alike (loading the code under
test, memory estimates, time budgets, waiting for a quiet machine, retrying contended cases).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def load_by_path(path: os.PathLike, name: str):
    """Execute a Python file as a module named `name`, outside the `retconvert` package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    spec.loader.exec_module(module)
    return module


measure = load_by_path(REPO / "eval" / "measure.py", "_retconvert_eval_measure")
CpuMonitor = measure.CpuMonitor
PeakRSS = measure.PeakRSS
contention_limit = measure.contention_limit
fmt_bytes = measure.fmt_bytes
fmt_seconds = measure.fmt_seconds
machine_info = measure.machine_info
maxrss_bytes = measure.maxrss_bytes
other_busy_cores = measure.other_busy_cores
package_version = measure.package_version
rss_bytes = measure.rss_bytes
summarize = measure.summarize
take_turns = measure.take_turns
time_callable = measure.time_callable
to_json = measure.to_json
usable_cpus = measure.usable_cpus
wait_for_quiet = measure.wait_for_quiet


def log(msg: str) -> None:
    """Progress goes to stderr; stdout is reserved for the JSON result."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def int_list(s: str) -> List[int]:
    """'128, 1024' -> [128, 1024] (argparse type)."""
    return [int(x) for x in s.replace(" ", "").split(",") if x]


# --------------------------------------------------------------------------------------------
# Workers: run one case in a fresh Python process, exchange JSON
# --------------------------------------------------------------------------------------------

WORKER_MARK = "@@BENCH_RESULT@@ "


def emit_worker_result(obj: Any) -> None:
    """Called by a worker: print its result as one marked JSON line on stdout."""
    sys.stdout.write(WORKER_MARK + to_json(obj, indent=None) + "\n")
    sys.stdout.flush()


def run_worker(cmd: Sequence[str], timeout_s: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run `cmd` (a worker), return its marked JSON result, or a failure record."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, env=env, cwd=str(REPO))
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


def spawn(script: str, kind: str, payload: Dict[str, Any], timeout_s: float,
          extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run `script --worker {"kind": kind, **payload}` in a fresh process (see run_worker)."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps({"kind": kind, **payload})]
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    env.update(extra_env or {})
    return run_worker(cmd, timeout_s=timeout_s, env=env)


# --------------------------------------------------------------------------------------------
# Provenance: command, date, code
# --------------------------------------------------------------------------------------------


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


def portable(value: Any) -> Any:
    """`value` with an absolute local path written as the README's commands write it: relative
    to the repository when inside it or beside it (`.`, `../shared/...`), `~/...` under the
    home folder; anything else unchanged; dicts and lists element by element. Committed JSON
    then names no machine's folders."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if not isinstance(value, (str, Path)) or not os.path.isabs(value):
        return value
    path = os.path.normpath(value)

    def inside(folder) -> bool:
        folder = os.path.normpath(folder)
        return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

    home = os.path.expanduser("~")
    if inside(REPO):
        return os.path.relpath(path, REPO)
    if inside(home):
        return "~" + path[len(home.rstrip(os.sep)):]
    if REPO.parent != Path(REPO.anchor) and inside(REPO.parent):  # beside the repository (../shared)
        return os.path.relpath(path, REPO)
    return str(value)


def emit_result(result: Dict[str, Any], out: Optional[os.PathLike] = None) -> None:
    """`measure.emit_result` on the result with its paths `portable`."""
    measure.emit_result(portable(result), out)


def write_json(path: os.PathLike, obj: Any) -> Path:
    """`measure.write_json` of `obj` with its paths `portable`."""
    return measure.write_json(path, portable(obj))


def cpu_run_header(name: str, args) -> Dict[str, Any]:
    """For a one-process CPU benchmark whose parsed `args` has `threads`: sets torch's threads
    and returns `run_header` with the machine and the arguments (paths as strings, `portable`)."""
    import torch  # here, not at the top: this file stays importable without torch's start-up

    torch.set_num_threads(args.threads)
    result = run_header(name, sys.argv)
    result["machine"] = machine_info("cpu", torch_threads=args.threads)
    result["args"] = portable(vars(args))
    return result


def run_header(name: str, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The provenance of a benchmark run: its name, the UTC date, the command (paths `portable`)
    and the working folder."""
    argv = [portable(a) for a in (sys.argv if argv is None else argv)]
    return {
        "benchmark": name,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO)] + argv),
        "argv": argv,
        "cwd": portable(os.getcwd()),
    }


# --------------------------------------------------------------------------------------------
# Cases of the retention functions (bench/retention.py, bench/prefill.py)
# --------------------------------------------------------------------------------------------

RETENTION_FILE = REPO / "models" / "retention.py"
MODES = ("fwd", "fwd_bwd")  # forward under no_grad; forward + backward
METRICS = ("wall", "cpu")  # wall-clock time; process CPU time of the same runs
BYTES_FP32 = 4


def load_retention():
    """models/retention.py, executed by path: it needs only torch (see the module docstring)."""
    return load_by_path(RETENTION_FILE, "_retconvert_retention_under_test")


def paper_decay(num_heads: int) -> List[float]:
    """gamma_h = 1 - 2^(-5-h): retconvert.models.configuration_retnet.paper_decay, which imports
    transformers (hence not imported into the workers)."""
    return [1.0 - 2.0 ** (-5 - h) for h in range(num_heads)]


def estimate_peak_bytes(form: str, chunk: Optional[int], T: int, B: int, H: int, Dk: int, Dv: int, mode: str) -> int:
    """Rough fp32 peak of one retention form (from models/retention.py's code), used only to
    decide whether to run a case; the JSON puts it next to the measured peak."""
    s = BYTES_FP32
    act = B * T * H * (3 * Dk + 2 * Dv) * s  # linear-size tensors: transposes, output, grads
    if form == "parallel":
        # decay_matrix: dist (T,T) + (H,T,T) product + (H,T,T) exp + masked copy + mask,
        # then scores: D (H,T,T) + q k^T (B,H,T,T) + masked scores (B,H,T,T).
        decay_phase = s * (T * T * 2 + 3 * H * T * T)
        score_phase = s * H * T * T * (1 + 2 * B)
        fwd = max(decay_phase, score_phase)
        if mode == "fwd":
            return fwd + act
        # backward: D + saved scores + grad of scores + grad of q k^T (+ a transpose copy).
        return max(fwd, s * H * T * T * (1 + 3 * B)) + 3 * act
    if form == "chunkwise":
        N = -(-T // chunk)
        blocks = s * B * H * N * chunk * chunk  # one (B,H,N,C,C) score tensor
        states = s * B * H * N * Dk * Dv  # S_in (B,H,N,Dk,Dv), also the per-chunk kv
        fwd = 3 * blocks + 3 * states + act
        return fwd if mode == "fwd" else 3 * fwd
    if form == "recurrent":
        state = s * B * H * Dk * Dv
        if mode == "fwd":
            return 2 * act + 4 * state
        # autograd keeps every step's state (for q_t @ S_t) plus per-step outer products.
        return T * 2 * state + 4 * act
    raise ValueError(form)


# Time complexity exponent per form, to predict a case's time from the shorter lengths. The
# prediction uses the larger of this and the exponent seen between the two previous lengths
# (capped at 3): the recurrent form's backward, for one, is superlinear.
TIME_EXPONENT = {"parallel": 2.0, "chunkwise": 1.0, "recurrent": 1.0}


def predict_run_s(history: List[tuple], T: int, form: str) -> tuple:
    """(predicted seconds of one run at T, exponent used) from [(T_i, median_i), ...]."""
    expo = TIME_EXPONENT[form]
    if len(history) >= 2:
        (T1, t1), (T2, t2) = history[-2:]
        if t1 > 0 and t2 > 0 and T2 > T1:
            expo = min(max(expo, math.log(t2 / t1) / math.log(T2 / T1)), 3.0)
    T0, t0 = history[-1]
    return t0 * (T / T0) ** expo, expo


def time_budget_reason(history: List[tuple], T: int, form: str, args, rec: Dict[str, Any]) -> Optional[str]:
    """Why a case at length T does not fit --max-seconds-per-case with --warmup + --min-repeats
    runs, predicted from the medians at shorter lengths; None if it fits. Records the
    prediction in `rec` (`predicted_run_s`)."""
    pred, expo = predict_run_s(history, T, form)
    rec["predicted_run_s"] = pred
    need = pred * (args.warmup + args.min_repeats)
    if need <= args.max_seconds_per_case:
        return None
    T0, t0 = history[-1]
    return (f"time budget: predicted {pred:.1f} s per run (median {t0:.2f} s at T={T0} scaled by "
            f"T^{expo:.2f}), {args.warmup}+{args.min_repeats} runs = {need:.0f} s > {args.max_seconds_per_case:.0f} s")


def skip_reason(form: str, chunk: Optional[int], T: int, estimated_bytes: int, stopped: Optional[str],
                history: Optional[List[tuple]], args, rec: Dict[str, Any]) -> Optional[str]:
    """Why a case (form, chunk size, length T) is not run, or None to run it: a chunk longer
    than T, an estimated peak over --max-bytes, a shorter length already skipped (`stopped`:
    its reason), or a time predicted from the shorter lengths' medians (`history`) that does
    not fit the budget (time_budget_reason, which records its prediction in `rec`)."""
    if chunk and chunk > T:
        return f"chunk_size {chunk} > T {T}"
    if estimated_bytes > args.max_bytes:
        return (f"memory budget: estimated peak {estimated_bytes / 1e9:.1f} GB > --max-bytes "
                f"{args.max_bytes / 1e9:.1f} GB")
    if stopped:
        return f"a shorter length was already skipped: {stopped}"
    if history:
        return time_budget_reason(history, T, form, args, rec)
    return None


def over_total(args, t_start: float) -> bool:
    return bool(args.max_total_seconds) and time.perf_counter() - t_start > args.max_total_seconds


def wait_quiet(args, t_start: float, waits: List[float]) -> Dict[str, Any]:
    """Before a timing case: wait up to --wait-quiet s (and --max-wait-total s over the whole
    run) for other processes to go idle. `waits` accumulates the time waited."""
    left = max(args.max_wait_total - sum(waits), 0.0)
    max_wait = 0.0 if over_total(args, t_start) else min(args.wait_quiet, left)
    res = wait_for_quiet(max_wait, args.contention_limit, sample_s=0.5, poll_s=3.0)
    waits.append(res["waited_s"])
    return res


def contention(r: Dict[str, Any]) -> float:
    """Other processes' busy cores while a mode ran (inf if the worker failed)."""
    if r.get("status") not in ("ok", "skipped"):
        return math.inf
    v = r.get("cpu", {}).get("other_busy_cores")
    return v if v is not None else 0.0


def _rank(r: Dict[str, Any]) -> tuple:
    """Which attempt to keep: measured beats skipped, then least contended."""
    return (0 if r.get("status") == "ok" else 1, contention(r))


def _brief(res: Dict[str, Any]) -> Dict[str, Any]:
    """An attempt's per-mode medians and contention, for the record of retries."""
    if res.get("status") != "ok":
        return {"status": res.get("status"), "reason": res.get("reason")}
    return {m: {"status": r.get("status"), "median_s": r.get("median_s"),
                "other_busy_cores": r.get("cpu", {}).get("other_busy_cores")} for m, r in res["modes"].items()}


def time_modes(script: str, payload: Dict[str, Any], modes: List[str], args, t_start: float, waits: List[float],
               label: str) -> tuple:
    """Time `modes` of one case in fresh `time` workers of `script`, retrying contended ones.

    Before each attempt, wait (bounded) for a quiet machine; re-time the modes measured or
    skipped while other processes kept more than args.contention_limit cores busy, up to
    args.retry_contended times, keeping each mode's least contended attempt. Returns
    ({mode: kept result}, [record of each attempt]); a result's `contended` says whether it
    stayed contended.
    """
    pending, attempts, best = list(modes), [], {}
    for attempt in range(1 + max(args.retry_contended, 0)):
        quiet = wait_quiet(args, t_start, waits)
        res = spawn(script, "time", {**payload, "modes": pending},
                    timeout_s=(args.max_seconds_per_case * 2 + 60) * len(pending))
        attempts.append({"quiet_wait": quiet, "modes": pending, "result": _brief(res)})
        for mode in pending:
            r = res["modes"][mode] if res.get("status") == "ok" else {
                "status": "failed", "reason": res.get("reason"), "detail": res}
            r.update(quiet_wait=quiet, attempt=attempt)
            if mode not in best or _rank(r) < _rank(best[mode]):
                best[mode] = r
        pending = [m for m in pending if best[m].get("status") in ("ok", "skipped")
                   and contention(best[m]) > args.contention_limit]
        if not pending or attempt == args.retry_contended or over_total(args, t_start):
            break
        log(f"  {label}: {pending} ran with {max(contention(best[m]) for m in pending):.2f} other busy cores; retrying")
    for r in best.values():
        r["contended"] = contention(r) > args.contention_limit
    return best, attempts


def memory_skip(timed: Dict[str, Any], args) -> Optional[Dict[str, Any]]:
    """Why a mode's peak-memory probe is not run (a skipped record), or None to run it."""
    if timed.get("status") != "ok":
        return {"status": "skipped", "reason": "not timed: " + str(timed.get("reason"))}
    if args.no_memory:
        return {"status": "skipped", "reason": "--no-memory"}
    if timed["median_s"] > args.max_seconds_per_case / 2:
        return {"status": "skipped", "reason": "one run takes over half the per-case time budget"}
    return None


def median_of(case: Dict[str, Any], mode: str, metric: str = "wall") -> Optional[float]:
    """A case's median time in `mode`, wall-clock or CPU (`metric`); None if not measured."""
    m = case["modes"].get(mode, {})
    if m.get("status") != "ok":
        return None
    return m.get("median_s") if metric == "wall" else m.get("cpu_time", {}).get("median_s")


def loglog_slope(points: List[tuple]) -> Optional[float]:
    """Least-squares slope of log(y) vs log(T) (y: a time or a byte count). Points without a
    positive y are left out: a memory probe whose peak stayed under its baseline reads <= 0."""
    pts = [(math.log(t), math.log(y)) for t, y in points if y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None
