#!/usr/bin/env python
"""Cost of padding-aware retention (issue 14, item 1), same process, interleaved.

For each case (form, T) it times, round-robin over --repeats rounds so that machine load
hits every variant alike:

  * baseline:  models/retention.py at git revision --baseline (default: the commit before
               the padding fix), no mask;
  * current:   models/retention.py as checked out, no mask (the fast path);
  * ones:      current, through `retention()` with an all-ones mask (what generate() passes);
  * padded:    current, with a mask that pads --pad-fraction of each row in runs inside it.

Forward passes under no_grad, and a forward+backward of the chunkwise form. Each timed run's
process CPU time and wall time are kept; with --threads 1 the CPU time is the figure least
disturbed by other processes, whose load is recorded per case (`cpu_monitor`). The JSON goes
to stdout (and to --out); progress to stderr.

Usage
  .venv/bin/python bench/padding.py --threads 1 --out docs/bench/padding.json
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, CpuMonitor, emit_result, log, machine_info, run_header, summarize  # noqa: E402

RETENTION_FILE = REPO / "models" / "retention.py"


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_baseline(revision: str):
    """models/retention.py as of `revision`, imported from a temporary copy."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:models/retention.py"], check=True,
                          capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    try:
        return load_module(f.name, "_retention_baseline")
    finally:
        os.unlink(f.name)


def padding_mask(B: int, T: int, fraction: float) -> torch.Tensor:
    """(B, T) ones with runs of 8 zeros spread evenly inside each row, about `fraction` of it."""
    mask = torch.ones(B, T, dtype=torch.long)
    runs = max(1, round(T * fraction / 8))
    for r in range(runs):
        start = (r + 1) * T // (runs + 1)
        mask[:, start:start + 8] = 0
    return mask


def variants(base, cur, form: str, chunk: int, mask):
    """name -> f(q, k, v, gamma) for the four variants of one form."""
    def form_of(module):
        if form == "chunkwise":
            return lambda *a, **kw: module.retention_chunkwise(*a, chunk_size=chunk, **kw)
        return getattr(module, f"retention_{form}")

    return {
        "baseline": lambda q, k, v, g: form_of(base)(q, k, v, g),
        "current": lambda q, k, v, g: form_of(cur)(q, k, v, g),
        "ones": lambda q, k, v, g: cur.retention(q, k, v, g, form, chunk_size=chunk,
                                                 token_mask=torch.ones_like(mask)),
        "padded": lambda q, k, v, g: form_of(cur)(q, k, v, g, token_mask=mask),
    }


def run_case(base, cur, form, T, backward, args):
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, T, args.heads, args.dk)
    q, k, v = (torch.randn(*shape, generator=g) * 0.3 for _ in range(3))
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(args.heads)])
    fns = variants(base, cur, form, args.chunk, padding_mask(args.batch, T, args.pad_fraction))
    if backward:
        q, k, v = (x.requires_grad_() for x in (q, k, v))

    def once(fn):
        if backward:
            o, _ = fn(q, k, v, gamma)
            o.sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v, gamma)

    for fn in fns.values():  # warm-up
        once(fn)
    cpu, wall = {n: [] for n in fns}, {n: [] for n in fns}
    with CpuMonitor() as monitor:  # cores other processes kept busy meanwhile
        for _ in range(args.repeats):
            for name, fn in fns.items():
                c0, w0 = time.process_time(), time.perf_counter()
                once(fn)
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    result = {"form": form, "T": T, "chunk_size": args.chunk if form == "chunkwise" else None,
              "pass": "fwd+bwd" if backward else "fwd", "cpu_monitor": monitor.result,
              "cpu": {n: summarize(t) for n, t in cpu.items()}, "wall": {n: summarize(t) for n, t in wall.items()}}
    med = {n: result["cpu"][n]["median_s"] for n in fns}
    result["cpu_ratio_to_baseline"] = {n: med[n] / med["baseline"] for n in fns}
    log(f"{form:9s} T={T:5d} {result['pass']:7s} cpu median ms: "
        + ", ".join(f"{n} {1e3 * m:.1f}" for n, m in med.items())
        + f" (other processes: {monitor.result.get('other_busy_cores', float('nan')):.1f} cores)")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="5a8ccd0~1", help="git revision of the unpatched retention.py")
    ap.add_argument("--parallel-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    ap.add_argument("--chunkwise-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9, help="default: SmolLM2-135M (9 query heads)")
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--pad-fraction", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, cur = load_baseline(args.baseline), load_module(RETENTION_FILE, "_retention_current")
    result = {**run_header("padding"), "machine": machine_info(torch_threads=torch.get_num_threads()),
              "args": vars(args), "cases": []}
    for T in args.parallel_lengths:
        result["cases"].append(run_case(base, cur, "parallel", T, False, args))
    for T in args.chunkwise_lengths:
        result["cases"].append(run_case(base, cur, "chunkwise", T, False, args))
    result["cases"].append(run_case(base, cur, "chunkwise", args.chunkwise_lengths[0], True, args))
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
