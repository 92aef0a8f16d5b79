"""Past the training length: what the config's length caps buy a student beyond its training rows.

A student trained on rows of N tokens meets two things past N that training never showed it:
- the attention sink: its key sits at position 0, so a query at position n scores it through
  rotary angles of n (`RetNetConfig.max_sink_distance` D turns a query past D back to D for it);
- its slowest heads: a head with decay gamma remembers about 1 / (1 - gamma) tokens, and heads
  that remember more than N never saw their state fill up (`RetNetConfig.max_retention_span`
  S uses each decay as at most 1 - 1/S).
For each case (the student without caps first, whatever its config holds: an export sets both at
the training rows' length by default; then each set of caps) this benchmark measures the
eval suite's per-position loss (`retconvert.eval.longrange.position_loss`) on the same rows of
held-out C4, beside the teacher's. Nothing is retrained: the caps are config fields.

    .venv/bin/python bench/length_caps.py --student ~/runs/exports/w64-latest \\
        --cases sink=2048,span=2048,sink=2048+span=2048 --out docs/bench/length_caps_w64.json

Not a test: it loads the real SmolLM2 teacher and a trained student (minutes per case).
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_run_header, emit_result, log  # noqa: E402

from retconvert.eval.longrange import position_loss  # noqa: E402
from retconvert.eval.models import load_model  # noqa: E402

FIELDS = {"sink": "max_sink_distance", "span": "max_retention_span"}


def parse_cases(text: str) -> List[Dict[str, int]]:
    """'sink=2048,span=2048,sink=2048+span=1024' -> [{config field: tokens}, ...]."""
    cases = []
    for spec in text.split(","):
        case = {}
        for part in spec.split("+"):
            key, _, value = part.partition("=")
            if key not in FIELDS or not value.isdigit():
                raise argparse.ArgumentTypeError(f"bad case {spec!r}: use sink=N, span=N or both joined by '+'")
            case[FIELDS[key]] = int(value)
        cases.append(case)
    return cases


def head_memory_tokens(model) -> torch.Tensor:
    """1 / (1 - gamma) for every head of every layer, (L * H,): the tokens each head remembers."""
    return torch.cat([1.0 / (1.0 - layer.retention.gamma.double()) for layer in model.model.layers])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--student", required=True, help="a RetNet student folder")
    ap.add_argument("--cases", type=parse_cases, default=parse_cases("sink=2048,span=2048,sink=2048+span=2048"),
                    help="comma list of cap sets, each sink=N, span=N or both joined by '+' "
                         "(the student without caps is always measured first)")
    ap.add_argument("--position-length", type=int, default=8192, help="row length of the per-position loss")
    ap.add_argument("--position-docs", type=int, default=2, help="rows of held-out C4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result: Dict = cpu_run_header("length_caps", args)

    student = load_model(args.student, "student")
    config = student.model.config
    if getattr(config, "model_type", "") != "retnet":
        raise SystemExit(f"{args.student} is not a RetNet student; give a folder written by retconvert")
    original = {field: getattr(config, field) for field in FIELDS.values()}
    memory = head_memory_tokens(student.model)
    result["student"] = {"path": args.student, "heads": len(memory), "config": original,
                         "head_memory_tokens_quantiles": {q: round(float(memory.quantile(q)), 1)
                                                          for q in (0.5, 0.9, 0.99, 1.0)}}

    teacher = load_model(args.teacher, "teacher")
    t0 = time.perf_counter()
    result["teacher"] = position_loss(teacher, args.position_length, args.position_docs, log=log)
    result["teacher"]["seconds"] = round(time.perf_counter() - t0, 1)
    del teacher

    cases = []
    for caps in [{}] + args.cases:
        for field in FIELDS.values():  # a field not in the case is uncapped, not the stored value
            setattr(config, field, caps.get(field))
        config._validate()
        span = caps.get("max_retention_span")
        t0 = time.perf_counter()
        loss = position_loss(student, args.position_length, args.position_docs, log=log)
        cases.append({"caps": caps, "heads_over_span": int((memory > span).sum()) if span else 0,
                      "position_loss": loss, "seconds": round(time.perf_counter() - t0, 1)})
        ratios = " ".join(f"{b['start_position']}-{b['end_position']}:{b['nll'] / t['nll']:.3f}"
                          for b, t in zip(loss["buckets"], result["teacher"]["buckets"]))
        log(f"caps {caps or 'none'}: loss / teacher's {ratios}")
    for field, value in original.items():
        setattr(config, field, value)
    result["cases"] = cases
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
