#!/usr/bin/env python
"""CPU benchmark of the three retention forms in models/retention.py.

For every sequence length T and every form (parallel; chunkwise at each --chunk-sizes;
recurrent) it measures

  * forward time           (under torch.no_grad(): prefill / inference),
  * forward+backward time  (q, k, v require grad; backward of the output with a fixed
                            random upstream gradient; the final state is not in the loss),
  * peak extra memory      of each of the two, in a fresh subprocess (see below),

and, separately, the per-token cost of one recurrent decoding step starting from a state
that has absorbed P tokens, for several P (it should not depend on P: the state is
[B, H, Dk, Dv] whatever P is).

Method
  * Every timing case (form, chunk size, T) runs in its own fresh Python process, so one
    case's allocator state (e.g. after the GBs the parallel form frees) cannot slow the next.
  * --warmup untimed runs, then up to --repeats timed runs; the median is the headline,
    min/mean/max and every run are in the JSON. GC is collected before and disabled during
    each timed run.
  * Budgets, never faked: a (form, T) whose estimated peak memory exceeds --max-bytes is
    skipped without running; a case predicted (from the previous length, scaled by the
    form's complexity) or observed (from its warm-up) not to fit --min-repeats runs in
    --max-seconds-per-case is skipped; repeats are reduced to fit the budget otherwise.
    Skips carry their reason and numbers.
  * Peak memory: torch has no CPU allocator statistics, and tracemalloc does not see
    torch's allocations, so each (case, fwd | fwd+bwd) runs once more in a fresh process,
    under PeakRSS (eval/measure.py): the RSS high-water mark during the op minus the RSS
    just before it. Inputs are allocated and a tiny warm-up (T <= 64) is run before the
    baseline, so thread pools and kernels are loaded and only the op is counted. Where the
    kernel's mark cannot be reset and the op's peak does not exceed the process's earlier
    high-water mark, the value is reported as an upper bound only.
  * Every run's wall time and process CPU time are kept (`cpu_time`); with --threads 1 the
    CPU time is the figure least disturbed by other processes on a shared machine.
  * Contention: each case records how many cores *other* processes kept busy meanwhile
    (from /proc/stat); before each case the bench waits (bounded) for the machine to be
    quiet, and re-times a contended case (--retry-contended), keeping the least contended
    attempt. With more torch threads than free cores OpenMP spin-waits make small ops
    10-100x slower: on a busy machine pass --threads 1.

Usage
  .venv/bin/python bench/retention.py                      # defaults below
  .venv/bin/python bench/retention.py --lengths 256,1024 --repeats 3 --out /tmp/r.json

The JSON goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    METRICS,
    MODES,
    REPO,
    RETENTION_FILE,
    CpuMonitor,
    PeakRSS,
    contention_limit,
    emit_result,
    emit_worker_result,
    estimate_peak_bytes,
    file_sha256,
    fmt_bytes,
    fmt_seconds,
    git_state,
    int_list,
    load_retention,
    log,
    loglog_slope,
    machine_info,
    median_of,
    memory_skip,
    paper_decay,
    run_header,
    skip_reason,
    spawn,
    summarize,
    time_callable,
    time_modes,
    wait_quiet,
)


def form_label(form: str, chunk: Optional[int]) -> str:
    return f"chunkwise-{chunk}" if form == "chunkwise" else form


def form_fn(mod, form: str, chunk: Optional[int]):
    if form == "parallel":
        return mod.retention_parallel
    if form == "chunkwise":
        return lambda q, k, v, g, initial_state=None: mod.retention_chunkwise(
            q, k, v, g, chunk_size=chunk, initial_state=initial_state
        )
    if form == "recurrent":
        return mod.retention_recurrent
    raise ValueError(form)


# --------------------------------------------------------------------------------------
# Workers (run in fresh processes)
# --------------------------------------------------------------------------------------


def _make_inputs(torch, T, B, H, Dk, Dv, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen) * Dk**-0.5
    k = torch.randn(B, T, H, Dk, generator=gen)
    v = torch.randn(B, T, H, Dv, generator=gen)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


def _case_runner(torch, fn, gamma, q, k, v, grad_out, mode):
    """Return (run, setup) closures for one mode."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn(q, k, v, gamma)

        return run, None

    leaves = (q, k, v)

    def setup():
        for x in leaves:
            x.grad = None

    def run():
        o, _ = fn(q, k, v, gamma)
        o.backward(grad_out)

    return run, setup


def worker_time(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(p["threads"])
    mod = load_retention()
    fn = form_fn(mod, p["form"], p["chunk"])
    B, T, H, Dk, Dv = p["B"], p["T"], p["H"], p["Dk"], p["Dv"]
    gamma = torch.tensor(paper_decay(H), dtype=torch.float32)
    out: Dict[str, Any] = {"status": "ok", "modes": {}}
    for mode in p["modes"]:
        need_grad = mode == "fwd_bwd"
        q, k, v = _make_inputs(torch, T, B, H, Dk, Dv, p["seed"], requires_grad=need_grad)
        grad_out = torch.randn(B, T, H, Dv, generator=torch.Generator().manual_seed(p["seed"] + 1))
        run, setup = _case_runner(torch, fn, gamma, q, k, v, grad_out, mode)
        with CpuMonitor() as mon:
            res = time_callable(
                run,
                repeats=p["repeats"],
                warmup=p["warmup"],
                setup=setup,
                budget_s=p["budget_s"],
                min_repeats=p["min_repeats"],
            )
        res["cpu"] = mon.result
        out["modes"][mode] = res
        del q, k, v, grad_out, run, setup
    return out


def worker_mem(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(p["threads"])
    mod = load_retention()
    fn = form_fn(mod, p["form"], p["chunk"])
    B, T, H, Dk, Dv = p["B"], p["T"], p["H"], p["Dk"], p["Dv"]
    mode = p["mode"]
    gamma = torch.tensor(paper_decay(H), dtype=torch.float32)
    need_grad = mode == "fwd_bwd"

    # Tiny warm-up of the same code path: loads kernels, starts the OpenMP pool.
    T0 = min(T, 64)
    q0, k0, v0 = _make_inputs(torch, T0, B, H, Dk, Dv, p["seed"], requires_grad=need_grad)
    run0, setup0 = _case_runner(torch, fn, gamma, q0, k0, v0, torch.randn(B, T0, H, Dv), mode)
    if setup0:
        setup0()
    run0()
    del q0, k0, v0, run0, setup0

    q, k, v = _make_inputs(torch, T, B, H, Dk, Dv, p["seed"], requires_grad=need_grad)
    grad_out = torch.randn(B, T, H, Dv, generator=torch.Generator().manual_seed(p["seed"] + 1))
    run, setup = _case_runner(torch, fn, gamma, q, k, v, grad_out, mode)
    if setup:
        setup()
    t0 = time.perf_counter()
    with PeakRSS() as m:
        run()
    res = dict(m.result)
    res["status"] = "ok"
    res["run_s"] = time.perf_counter() - t0
    return res


def worker_decode(p: Dict[str, Any]) -> Dict[str, Any]:
    """Per-token time of recurrent steps continuing from a state that has seen P tokens."""
    import torch

    torch.set_num_threads(p["threads"])
    mod = load_retention()
    B, H, Dk, Dv = p["B"], p["H"], p["Dk"], p["Dv"]
    steps = p["steps"]
    gamma = torch.tensor(paper_decay(H), dtype=torch.float32)
    # The decode tokens: [B, 1, H, D] each, materialised up front (not part of the step).
    qd, kd, vd = _make_inputs(torch, steps, B, H, Dk, Dv, p["seed"] + 7)
    toks = [tuple(x[:, i : i + 1].contiguous() for x in (qd, kd, vd)) for i in range(steps)]
    results = []
    for P in p["positions"]:
        q, k, v = _make_inputs(torch, P, B, H, Dk, Dv, p["seed"])
        with torch.no_grad():
            _, S_P = mod.retention_chunkwise(q, k, v, gamma, chunk_size=64)  # state after P tokens
        del q, k, v

        def block(S0=S_P):
            with torch.no_grad():
                S = S0
                for qt, kt, vt in toks:
                    _, S = mod.retention_recurrent(qt, kt, vt, gamma, initial_state=S)

        with CpuMonitor() as mon:
            res = time_callable(block, repeats=p["repeats"], warmup=p["warmup"])
        per_tok = summarize([t / steps for t in res["times_s"]])
        per_tok_cpu = summarize([t / steps for t in res["cpu_time"]["times_s"]])
        results.append(
            {
                "position": P,
                "steps_per_sample": steps,
                "per_token": per_tok,
                "per_token_cpu_time": per_tok_cpu,
                "state_abs_max": float(S_P.abs().max()),
                "cpu": mon.result,
            }
        )
    return {"status": "ok", "points": results}


def worker_check(p: Dict[str, Any]) -> Dict[str, Any]:
    """The forms agree (fp64, T not a multiple of any chunk size) before we time them."""
    import torch

    mod = load_retention()
    B, H, Dk, Dv, T = 1, p["H"], p["Dk"], p["Dv"], 300
    gamma = torch.tensor(paper_decay(H), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=torch.float64) for d in (Dk, Dk, Dv))
    ref_o, ref_s = mod.retention_parallel(q, k, v, gamma)
    diffs = {}
    for label, fn in [("recurrent", form_fn(mod, "recurrent", None))] + [
        (form_label("chunkwise", c), form_fn(mod, "chunkwise", c)) for c in p["chunks"]
    ]:
        o, s = fn(q, k, v, gamma)
        diffs[label] = {
            "output_max_abs_diff": float((o - ref_o).abs().max()),
            "state_max_abs_diff": float((s - ref_s).abs().max()),
        }
    worst = max(max(d.values()) for d in diffs.values())
    return {"status": "ok" if worst < 1e-8 else "mismatch", "T": T, "dtype": "float64", "vs_parallel": diffs}


WORKERS = {"time": worker_time, "mem": worker_mem, "decode": worker_decode, "check": worker_check}


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int_list, default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--forms", default="parallel,chunkwise,recurrent", help="comma list of forms to run")
    ap.add_argument("--chunk-sizes", type=int_list, default=[32, 64, 128, 256])
    ap.add_argument("--batch", "-B", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9, help="default: SmolLM2-135M (9 query heads)")
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per case (after warm-up)")
    ap.add_argument("--min-repeats", type=int, default=3, help="fewer fitting the budget -> skip")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds-per-case", type=float, default=60.0,
                    help="wall budget for warm-up + repeats of one (form, T, fwd|fwd_bwd)")
    ap.add_argument("--max-bytes", type=float, default=6e9, help="skip cases whose estimated peak exceeds this")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--mmap-variant", choices=("recurrent", "all", "none"), default="recurrent",
                    help="also measure peak memory with MALLOC_MMAP_THRESHOLD_=131072 for these forms")
    ap.add_argument("--wait-quiet", type=float, default=120.0,
                    help="before each timing case, wait up to this many s for other processes to go idle")
    ap.add_argument("--max-wait-total", type=float, default=300.0,
                    help="total seconds the whole run may spend waiting for quiet")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="tolerance: contended = others busy on more than (usable cpus - threads + this) cores")
    ap.add_argument("--retry-contended", type=int, default=1,
                    help="re-time a case up to N more times if measured under contention; keep the least contended")
    ap.add_argument("--max-total-seconds", type=float, default=0,
                    help="after this much total time, stop waiting for quiet and stop retrying (0 = no limit)")
    ap.add_argument("--decode-positions", type=int_list, default=[128, 1024, 4096, 8192, 16384])
    ap.add_argument("--decode-steps", type=int, default=256, help="consecutive decode steps per timed sample")
    ap.add_argument("--decode-repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def summarise(cases: List[Dict[str, Any]], decode: Dict[str, Any], args) -> Dict[str, Any]:
    labels = []
    for c in cases:
        if c["label"] not in labels:
            labels.append(c["label"])
    by = {(c["label"], c["T"]): c for c in cases}
    lengths = sorted({c["T"] for c in cases})
    summary: Dict[str, Any] = {}
    for metric in METRICS:
        summary[metric] = {"median_s": {}, "crossover_vs_parallel": {}, "scaling_exponent": {}, "best_chunk": {}}
        for mode in MODES:
            table = {lab: {str(T): median_of(by[(lab, T)], mode, metric) if (lab, T) in by else None
                           for T in lengths} for lab in labels}
            summary[metric]["median_s"][mode] = table

            # Crossover: first measured T from which chunkwise-C is faster than parallel at every
            # larger length where both were measured.
            cross = {}
            if "parallel" in labels:
                for lab in labels:
                    if not lab.startswith("chunkwise"):
                        continue
                    both = [(T, table[lab][str(T)], table["parallel"][str(T)]) for T in lengths
                            if table[lab][str(T)] is not None and table["parallel"][str(T)] is not None]
                    first = None
                    for i, (T, _, _) in enumerate(both):
                        if all(c < p for _, c, p in both[i:]):
                            first = T
                            break
                    cross[lab] = {
                        "first_length_faster": first,
                        "speedup_at_lengths": {str(T): p / c for T, c, p in both},
                        "parallel_measured_up_to": max((T for T, _, _ in both), default=None),
                    }
            summary[metric]["crossover_vs_parallel"][mode] = cross

            # Scaling exponent d log t / d log T over T >= 1024 (or all lengths if fewer).
            exps = {}
            for lab in labels:
                pts = [(T, table[lab][str(T)]) for T in lengths if T >= 1024 and table[lab][str(T)]]
                if len(pts) < 2:
                    pts = [(T, table[lab][str(T)]) for T in lengths if table[lab][str(T)]]
                exps[lab] = {"exponent": loglog_slope(pts), "over_lengths": [T for T, _ in pts]}
            summary[metric]["scaling_exponent"][mode] = exps

            # Fastest chunk size per length, and overall by geometric mean of (time / best time).
            chunk_labs = [lab for lab in labels if lab.startswith("chunkwise")]
            best_per_T, ratios = {}, {lab: [] for lab in chunk_labs}
            for T in lengths:
                vals = {lab: table[lab][str(T)] for lab in chunk_labs if table[lab][str(T)]}
                if len(vals) == len(chunk_labs) and vals:
                    best = min(vals.values())
                    best_per_T[str(T)] = min(vals, key=vals.get)
                    for lab, v in vals.items():
                        ratios[lab].append(v / best)
            geo = {lab: math.exp(sum(map(math.log, r)) / len(r)) for lab, r in ratios.items() if r}
            summary[metric]["best_chunk"][mode] = {
                "fastest_per_length": best_per_T,
                "geomean_slowdown_vs_fastest": geo,
                "overall": min(geo, key=geo.get) if geo else None,
            }

    summary["contended"] = [
        {"label": c["label"], "T": c["T"], "mode": m, "other_busy_cores": r["cpu"]["other_busy_cores"]}
        for c in cases for m, r in c["modes"].items() if r.get("status") == "ok" and r.get("contended")
    ]
    summary["skipped"] = [
        {"label": c["label"], "T": c["T"], "mode": m, "reason": r.get("reason")}
        for c in cases for m, r in c["modes"].items() if r.get("status") != "ok"
    ]
    if decode.get("status") == "ok":
        pts = decode["points"]
        meds = [pt["per_token"]["median_s"] for pt in pts]
        summary["decode"] = {
            "per_token_median_s": {str(pt["position"]): pt["per_token"]["median_s"] for pt in pts},
            "per_token_cpu_median_s": {str(pt["position"]): pt["per_token_cpu_time"]["median_s"] for pt in pts},
            "cpu_max_over_min": (max(pt["per_token_cpu_time"]["median_s"] for pt in pts)
                                 / min(pt["per_token_cpu_time"]["median_s"] for pt in pts)),
            "max_over_min": max(meds) / min(meds),
            "last_over_first": meds[-1] / meds[0],
            "slope_exponent": loglog_slope([(pt["position"], m) for pt, m in zip(pts, meds)]),
            "flat_within_25pct": max(meds) / min(meds) < 1.25,
            "max_other_busy_cores": max((pt["cpu"].get("other_busy_cores") or 0.0) for pt in pts),
        }
    return summary


def print_tables(summary: Dict[str, Any]) -> None:
    for metric, mode in ((m, mo) for m in METRICS for mo in MODES):
        table = summary[metric]["median_s"][mode]
        lengths = list(next(iter(table.values())).keys()) if table else []
        log(f"\n== median {mode} {metric} time ==")
        log(f"{'form':>14} " + " ".join(f"{T:>10}" for T in lengths))
        for lab, row in table.items():
            log(f"{lab:>14} " + " ".join(f"{fmt_seconds(row[T]) if row[T] else 'skip':>10}" for T in lengths))
    if "decode" in summary:
        d = summary["decode"]
        log("\n== recurrent decode, per token ==")
        for P, t in d["per_token_median_s"].items():
            log(f"  after {P:>6} tokens: {fmt_seconds(t)}")
        log(f"  max/min = {d['max_over_min']:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        p = json.loads(args.worker)
        emit_worker_result(WORKERS[p["kind"]](p))
        return 0

    import torch  # the parent only needs it for the default thread count and machine info

    threads = args.threads or torch.get_num_threads()
    args.contention_limit = contention_limit(threads, args.quiet_threshold)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    B, H, Dk, Dv = args.batch, args.heads, args.dk, args.dv
    specs = []
    for f in forms:
        if f == "chunkwise":
            specs += [("chunkwise", c) for c in args.chunk_sizes]
        elif f in ("parallel", "recurrent"):
            specs.append((f, None))
        else:
            raise SystemExit(f"unknown form {f!r}")

    t_start = time.perf_counter()
    result: Dict[str, Any] = run_header("retention", argv if argv is not None else sys.argv)
    result["machine"] = machine_info(torch_threads=threads)
    result["code"] = {
        "file": str(RETENTION_FILE.relative_to(REPO)),
        "sha256_at_start": file_sha256(RETENTION_FILE),
        **git_state(["models/retention.py", "bench/retention.py", "bench/common.py", "eval/measure.py"]),
    }
    result["config"] = {
        "B": B, "H": H, "Dk": Dk, "Dv": Dv, "dtype": "float32", "gamma": "paper_decay(H) = 1 - 2^(-5-h)",
        "lengths": args.lengths, "forms": forms, "chunk_sizes": args.chunk_sizes,
        "repeats": args.repeats, "min_repeats": args.min_repeats, "warmup": args.warmup,
        "max_seconds_per_case": args.max_seconds_per_case, "max_bytes": args.max_bytes,
        "threads": threads, "seed": args.seed, "memory": not args.no_memory,
        "decode_positions": args.decode_positions, "decode_steps": args.decode_steps,
        "decode_repeats": args.decode_repeats, "wait_quiet": args.wait_quiet,
        "quiet_threshold": args.quiet_threshold,
        "contention_limit_cores": args.contention_limit, "max_wait_total": args.max_wait_total,
        "retry_contended": args.retry_contended,
        "max_total_seconds": args.max_total_seconds, "mmap_variant": args.mmap_variant,
    }
    result["method"] = {
        "fwd": "forward under torch.no_grad()",
        "fwd_bwd": "forward with q,k,v requiring grad + output.backward(fixed random grad); grads cleared (untimed) "
                   "before each run",
        "timing": "fresh subprocess per (form, chunk, T); warm-up runs excluded; median of timed runs; gc disabled "
                  "during a run; wall time at the top level (median_s, ...), process CPU time of the same runs "
                  "under cpu_time",
        "memory": "fresh subprocess per (form, chunk, T, mode): PeakRSS, the RSS high-water mark during the op minus "
                  "RSS just before it (inputs already allocated, tiny warm-up done); 'resolved': false means only an "
                  "upper bound is known",
        "skips": "estimated peak > max_bytes -> not run; predicted or warm-up-observed time not fitting min_repeats "
                 "runs in max_seconds_per_case -> not timed; larger lengths of a form skipped for the same reason are "
                 "not run",
        "decode": "no_grad recurrent steps of one token each ([B,1,H,D]), chained over decode_steps tokens, starting "
                  "from the state after `position` tokens (computed with the chunkwise form); per-token = sample / "
                  "steps",
        "contention": "cpu.other_busy_cores = cores kept busy by other processes during the case (from /proc/stat); "
                      "contended = other processes busy on more than contention_limit_cores = usable cpus - threads + "
                      "quiet_threshold cores (they left fewer free cores than our threads); "
                      "before each case the bench waits up to wait_quiet s for contention to end, and "
                      "re-times a contended case up to retry_contended times, keeping the least contended attempt "
                      "(all attempts are under cases[].attempts); 'contended': true marks what stayed contended",
    }

    payload_base = {"B": B, "H": H, "Dk": Dk, "Dv": Dv, "threads": threads, "seed": args.seed}

    log(f"[retention bench] B={B} H={H} Dk={Dk} Dv={Dv} threads={threads} lengths={args.lengths}")
    check = spawn(__file__, "check", {**payload_base, "chunks": args.chunk_sizes}, timeout_s=300)
    result["correctness_check"] = check
    log(f"correctness check (fp64, T=300, vs parallel): {check.get('status')}")

    cases: List[Dict[str, Any]] = []
    waits: List[float] = []  # seconds spent waiting for the machine to go quiet
    last_ok: Dict[tuple, List[tuple]] = {}  # (label, mode) -> [(T, median), ...]
    stopped: Dict[tuple, str] = {}  # (label, mode) -> reason a smaller length was skipped
    for T in sorted(args.lengths):
        for form, chunk in specs:
            label = form_label(form, chunk)
            case: Dict[str, Any] = {"form": form, "chunk_size": chunk, "label": label, "T": T, "modes": {},
                                    "memory": {}}
            to_run = []
            for mode in MODES:
                est = estimate_peak_bytes(form, chunk, T, B, H, Dk, Dv, mode)
                rec: Dict[str, Any] = {"estimated_peak_bytes": est}
                reason = skip_reason(form, chunk, T, est, stopped.get((label, mode)), last_ok.get((label, mode)),
                                     args, rec)
                if reason:
                    rec.update(status="skipped", reason=reason)
                if rec.get("status") == "skipped":
                    if not rec["reason"].startswith("chunk_size"):
                        stopped.setdefault((label, mode), f"T={T}: {rec['reason']}")
                else:
                    to_run.append(mode)
                case["modes"][mode] = rec

            if to_run:
                payload = {**payload_base, "form": form, "chunk": chunk, "T": T, "repeats": args.repeats,
                           "min_repeats": args.min_repeats, "warmup": args.warmup,
                           "budget_s": args.max_seconds_per_case}
                best, attempts = time_modes(__file__, payload, to_run, args, t_start, waits, f"T={T} {label}")
                case["attempts"] = attempts
                for mode in to_run:
                    r = best[mode]
                    case["modes"][mode].update(r)
                    if r["status"] == "ok":
                        last_ok.setdefault((label, mode), []).append((T, r["median_s"]))
                    else:
                        stopped.setdefault((label, mode), f"T={T}: {r.get('reason')}")

            for mode in MODES:
                r = case["modes"][mode]
                skip = memory_skip(r, args)
                if skip:
                    case["memory"][mode] = skip
                    continue
                mem_payload = {**payload_base, "form": form, "chunk": chunk, "T": T, "mode": mode}
                mem = spawn(__file__, "mem", mem_payload, timeout_s=args.max_seconds_per_case * 2 + 60)
                mem["estimated_peak_bytes"] = r["estimated_peak_bytes"]
                if args.mmap_variant == "all" or (args.mmap_variant == "recurrent" and form == "recurrent"):
                    # Same op with glibc's mmap threshold fixed at 128 KiB (no dynamic raise): large
                    # blocks then go straight back to the OS, so RSS tracks live tensors more closely.
                    mem["fixed_mmap_threshold_128k"] = spawn(
                        __file__, "mem", mem_payload, timeout_s=args.max_seconds_per_case * 2 + 60,
                        extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})
                case["memory"][mode] = mem

            msg = []
            for mode in MODES:
                r, m = case["modes"][mode], case["memory"][mode]
                if r.get("status") == "ok":
                    pk = m.get("peak_extra_bytes")
                    mem_s = fmt_bytes(pk) if pk is not None else (
                        f"<= {fmt_bytes(m['upper_bound_bytes'])}" if m.get("upper_bound_bytes") is not None else "-")
                    ob = r.get("cpu", {}).get("other_busy_cores")
                    msg.append(f"{mode} {fmt_seconds(r['median_s'])} [cpu {fmt_seconds(r['cpu_time']['median_s'])}] "
                               f"(n={r['n']}, peak +{mem_s}, "
                               f"others busy {ob if ob is None else round(ob, 2)})")
                else:
                    msg.append(f"{mode} SKIP ({r.get('reason')})")
            log(f"T={T:>6} {label:>14}: " + "; ".join(msg) + f"   [{time.perf_counter() - t_start:.0f} s]")
            cases.append(case)

    if "recurrent" in forms and args.decode_positions:
        log("decode per-token timing ...")
        quiet = wait_quiet(args, t_start, waits)
        decode = spawn(__file__, "decode", {**payload_base, "positions": sorted(args.decode_positions),
                                            "steps": args.decode_steps, "repeats": args.decode_repeats,
                                            "warmup": args.warmup}, timeout_s=1200)
        decode["quiet_wait"] = quiet
    else:
        decode = {"status": "skipped", "reason": "recurrent form not selected or no --decode-positions"}

    result["cases"] = cases
    result["decode"] = decode
    result["summary"] = summarise(cases, decode, args)
    result["code"]["sha256_at_end"] = file_sha256(RETENTION_FILE)
    result["code"]["changed_during_run"] = result["code"]["sha256_at_end"] != result["code"]["sha256_at_start"]
    result["total_wall_s"] = time.perf_counter() - t_start
    result["total_waited_for_quiet_s"] = sum(waits)

    print_tables(result["summary"])
    emit_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
