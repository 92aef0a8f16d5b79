"""Decay cap: do a student's slowest-decaying heads cost it the contexts beyond its training rows?

A retention head with decay gamma remembers about 1 / (1 - gamma) tokens. Trained on rows of
2,048 tokens, a student whose heads remember 10,000+ tokens never saw those states fill up; past
its training length they keep growing, and the loss there rises (the windowed student at 1M
stage-2 tokens: 1.26x the teacher's loss at 4k-8k tokens against 1.05x to 4k). This benchmark
caps every head's memory at C tokens (gamma <= 1 - 1/C, no other weight touched) and measures
the eval suite's per-position loss (`retconvert.eval.longrange.position_loss`) on the same
held-out C4 rows for each cap, beside the teacher's.

    .venv/bin/python bench/decay_cap.py --student ~/runs/exports/w64-latest \\
        --caps 8192,4096,2048,1024 --out docs/bench/decay_cap.json

Not a test: it loads the real SmolLM2 teacher and a trained student (minutes on one core).
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, int_list, log, machine_info, run_header  # noqa: E402

from retconvert.eval.longrange import position_loss  # noqa: E402
from retconvert.eval.models import load_model  # noqa: E402


def memory_tokens(decay_logit: torch.Tensor) -> torch.Tensor:
    """1 / (1 - gamma) per head, gamma = sigmoid(decay_logit): the tokens a head remembers."""
    return 1.0 + torch.exp(decay_logit.float())


def cap_decays(model, cap: int) -> int:
    """Clamp every retention layer's decay so no head remembers more than `cap` tokens
    (decay_logit <= log(cap - 1)); returns how many heads changed."""
    limit = math.log(cap - 1)
    changed = 0
    with torch.no_grad():
        for layer in model.model.layers:
            logit = layer.retention.decay_logit
            changed += int((logit > limit).sum())
            logit.clamp_(max=limit)
    return changed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--student", required=True, help="a RetNet student folder")
    ap.add_argument("--caps", type=int_list, default=[8192, 4096, 2048, 1024],
                    help="memory caps in tokens, each > 2 (the student as trained is always measured first)")
    ap.add_argument("--position-length", type=int, default=8192, help="row length of the per-position loss")
    ap.add_argument("--position-docs", type=int, default=2, help="rows of held-out C4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if min(args.caps) <= 2:
        raise SystemExit(f"--caps {args.caps}: every cap must be more than 2 tokens")
    torch.set_num_threads(args.threads)
    result: Dict = run_header("decay_cap", sys.argv)
    result["machine"] = machine_info("cpu", torch_threads=args.threads)
    result["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    teacher = load_model(args.teacher, "teacher")
    t0 = time.perf_counter()
    result["teacher"] = position_loss(teacher, args.position_length, args.position_docs, log=log)
    result["teacher"]["seconds"] = round(time.perf_counter() - t0, 1)
    del teacher

    student = load_model(args.student, "student")
    if not getattr(student.model.config, "model_type", "") == "retnet":
        raise SystemExit(f"{args.student} is not a RetNet student; give a folder written by retconvert")
    heads = torch.cat([memory_tokens(layer.retention.decay_logit) for layer in student.model.model.layers])
    result["student"] = {"path": args.student,
                         "head_memory_tokens_quantiles": {q: round(float(heads.quantile(q)), 1)
                                                          for q in (0.5, 0.9, 0.99, 1.0)},
                         "heads": len(heads)}
    cases = []
    for cap in [None] + sorted(args.caps, reverse=True):  # tighter caps in turn: each clamp includes the last
        changed = cap_decays(student.model, cap) if cap else 0
        t0 = time.perf_counter()
        loss = position_loss(student, args.position_length, args.position_docs, log=log)
        cases.append({"cap_tokens": cap, "heads_over_cap": changed if cap else None,
                      "heads_capped_total": int((heads > cap).sum()) if cap else 0,
                      "position_loss": loss, "seconds": round(time.perf_counter() - t0, 1)})
        ratios = " ".join(f"{b['start_position']}-{b['end_position']}:{b['nll'] / t['nll']:.3f}"
                          for b, t in zip(loss["buckets"], result["teacher"]["buckets"]))
        log(f"cap {cap or 'none'} ({cases[-1]['heads_capped_total']} heads capped): loss / teacher's {ratios}")
    result["cases"] = cases
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
