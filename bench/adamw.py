"""One AdamW step over the SmolLM2-135M student's parameters: torch's implementations side by side.

Stage 2 spends 0.5-1 CPU s of a 2,048-token step in AdamW (docs/RESULTS.md, phase tables).
This times `torch.optim.AdamW.step()` on fp32 parameters of the student's shapes (30 layers,
hidden 576, MLP 1536, 9 query / 3 key-value heads of 64, tied 49,152 x 576 embedding: 134.5M),
with the default (for-loop on CPU), `foreach=True` and `fused=True` implementations, alternating
round by round, medians of the process CPU time. `stage2.fused_adamw` (default on) picks fused.

    OMP_NUM_THREADS=1 .venv/bin/python bench/adamw.py --out docs/bench/adamw.json
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, log, machine_info, run_header, summarize  # noqa: E402

KINDS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def student_shapes(layers=30, hidden=576, mlp=1536, kv=192, vocab=49152):
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
                 (mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]  # gate, up, down, 2 norms
    return [(vocab, hidden)] + per_layer * layers + [(hidden,)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run_header("adamw", sys.argv)
    result["machine"] = machine_info("cpu", torch_threads=args.threads)
    g = torch.Generator().manual_seed(0)
    opts = {}
    for kind, kw in KINDS.items():  # one parameter set each: the updates differ only by rounding
        params = [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in student_shapes()]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opts[kind] = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), **kw)
        opts[kind].step()  # warm-up: allocates the state
    n = sum(p.numel() for p in opts["default"].param_groups[0]["params"])
    times = {k: [] for k in KINDS}
    for r in range(args.rounds):
        for kind in list(KINDS)[r % 3:] + list(KINDS)[:r % 3]:
            t0 = time.process_time()
            opts[kind].step()
            times[kind].append(time.process_time() - t0)
    result["parameters"] = n
    result["cpu_s"] = {k: summarize(v) for k, v in times.items()}
    med = {k: result["cpu_s"][k]["median_s"] for k in KINDS}
    result["fused_speedup_over_default"] = med["default"] / med["fused"]
    for k in KINDS:
        log(f"{k:8s} {med[k]:.3f} CPU s per step ({n / 1e6:.1f}M parameters)")
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
