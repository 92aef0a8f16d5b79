#!/usr/bin/env python
"""generate() as users call it: a RetNet student against its teacher, and against its own
packed decoder, greedy, batch 1, one process.

At each prompt length the engines take turns every round (`eval.speed.generate_curve`, the
eval suite's own measurement): teacher `generate()` (KV cache), student `generate()` (recurrent
state; its one-token steps run in the packed decoder) and the student's packed decoder called
directly. Per point: the time of one call for --new-tokens tokens (prompt pass included) and
the median time per decoding step (the gap between two generated tokens, from a streamer).

Start-up: what the student's first generate() in a process pays to pack its decoder, timed
with the kernel choices cached on disk (the usual case) and with an empty kernel cache (the
first run on a machine).

  .venv/bin/python bench/generate.py --student outputs/smollm2-135m-retnet --out docs/bench/generate.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit_result, int_list, log, machine_info, run_header  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--student", help="a RetNet checkpoint folder (default: the teacher's weights mapped by the "
                                     "converter, uncalibrated: speed does not depend on the values)")
    p.add_argument("--contexts", type=int_list, default=[128, 256, 2048, 8150],
                   help="prompt lengths (8150: the longest that leaves room for 33 tokens in 8192 positions)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def startup(student) -> dict:
    """Seconds to build the generate() decoder in a new process: on a machine's first run (every
    kernel candidate timed), then with the choices read back from the disk cache (the usual case)."""
    from retconvert.models import decoding_retnet, kernels

    saved_env, saved = os.environ.get("RETCONVERT_KERNEL_CACHE"), dict(kernels._KERNEL_CACHE)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RETCONVERT_KERNEL_CACHE"] = os.path.join(tmp, "kernels.json")
        for name in ("pack_s_kernels_timed", "pack_s_kernels_from_disk"):
            kernels._KERNEL_CACHE.clear()  # as in a new process
            t0 = time.perf_counter()
            decoding_retnet.RetNetDecoder(student)
            seconds[name] = time.perf_counter() - t0
    if saved_env is None:
        os.environ.pop("RETCONVERT_KERNEL_CACHE")
    else:
        os.environ["RETCONVERT_KERNEL_CACHE"] = saved_env
    kernels._KERNEL_CACHE.clear()
    kernels._KERNEL_CACHE.update(saved)
    return seconds


def summarise(curve, teacher, student, new_tokens) -> dict:
    def points(engine, m):
        return {p["context_tokens"]: p for p in curve[engine].get(m.name, [])}

    t, s, d = points("generate", teacher), points("generate", student), points("packed", student)
    out = {"teacher_over_student_total": {L: t[L]["total_ms"] / s[L]["total_ms"] for L in s if L in t},
           "student_generate_over_packed_per_token": {L: s[L]["per_token_ms"] / d[L]["per_token_ms"]
                                                      for L in s if L in d}}
    lengths = sorted(s)
    if len(lengths) > 1:
        out["student_per_token_longest_over_shortest"] = (
            s[lengths[-1]]["per_token_ms"] / s[lengths[0]]["per_token_ms"])
        out["flatness_lengths"] = [lengths[0], lengths[-1]]
    out["new_tokens"] = new_tokens
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import retconvert  # noqa: F401  (registers the RetNet Auto classes)
    from retconvert.convert.student import ConvertOptions, build_student
    from retconvert.eval.models import EvalModel, load_model
    from retconvert.eval.speed import generate_curve

    result = {**run_header("generate"), "machine": machine_info(), "settings": vars(args)}
    teacher = load_model(args.teacher, "teacher")
    if args.student:
        student = load_model(args.student, "student", fallback_tokenizer=teacher.tokenizer)
    else:
        model = build_student(teacher.model, ConvertOptions()).eval()
        student = EvalModel("converter mapping (uncalibrated)", "student", model, teacher.tokenizer, "built")
    student.model.config.retention_mode = "chunkwise"
    result["startup"] = startup(student.model)
    log(f"start-up: {result['startup']}")
    curve = generate_curve([teacher, student], args.contexts, args.new_tokens, rounds=args.rounds)
    result["points"] = curve
    result["summary"] = summarise(curve, teacher, student, args.new_tokens)
    log(f"summary: {result['summary']}")
    emit_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
