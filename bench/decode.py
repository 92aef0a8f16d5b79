#!/usr/bin/env python
"""Decoding speed of a teacher and its RetNet student, against the memory-bandwidth bound.

At each context length P (the number of tokens already consumed) and batch size, the
variants below take turns in blocks of steps (eval/measure.py take_turns), --rounds times (so a slow phase of a shared
machine hits all of them alike); the first steps of every block are warm-up and excluded,
and the median per-token latency over the other steps is reported. Blocks, not single
steps: numpy's OpenBLAS and torch's OpenMP keep their worker threads spinning for a while
after each call, so a variant that ran just before another slows it down; the warm-up
steps of a block absorb that. The variants:

  teacher              transformers' own path: model(input_ids=token, past_key_values=cache),
                       DynamicCache holding P keys/values per layer (what HF generate() runs)
                       (eval/speed.py ModuleDecoding, as the eval suite's decode curve)
  student/module       the same call on the RetNet (its RetNetState makes each step recurrent)
  student/decoder-fp32 models/decoding_retnet.py: packed weights, static shapes, fp32
                       (eval/speed.py PackedDecoding: one decoder per batch size)
  student/decoder-bf16 ... with bfloat16 weights (half the bytes; state and norms stay fp32)
  student/decoder-fp16 ... with float16 weights

Batch 1 starts from a real prefill of P random tokens. Larger batches copy the batch-1
cache/state B times (the timing of a step does not depend on what the cache holds); a
point whose cache would exceed --max-cache-bytes is skipped with its size as the reason.

The bound: time to stream the weights once per token. Memory bandwidth on a shared virtual
machine drifts by 2x within minutes, so the bound is not one number from the start of the
run: memory probes take turns with the decoders at every batch-1 point, in the same rounds,
and each fraction of the bound is a ratio of medians from those rounds. The probes, each
moving as many bytes as the fp32 decoder's weights, in huge pages like the decoder's:

  memory/copy          a copy of weight_bytes / 2 into another buffer: bytes read + written
                       = weight_bytes (the STREAM convention; the issue's "large tensor copy")
  memory/read          the faster of a read-only pass by torch's sum (all threads) and by
                       OpenBLAS's matrix-vector product over a (576, N) matrix (the fastest
                       streaming we have found on this machine: a decoder cannot stream
                       its weights faster than this)

The student is the converter's weight mapping of the teacher (`--student DIR` loads a
trained checkpoint instead): speed does not depend on the values of the weights.

  .venv/bin/python bench/decode.py --out docs/bench/decode.json
  .venv/bin/python bench/decode.py --contexts 128,1024 --batches 1 --quick   # a minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import int_list, log, machine_info, run_header, take_turns, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--student",
                   help="a RetNet checkpoint folder (default: the teacher's weights mapped by the converter)")
    p.add_argument("--contexts", type=int_list, default=[128, 1024, 4096, 8192])
    p.add_argument("--batches", type=int_list, default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=3, help="blocks per point and variant")
    p.add_argument("--block-steps", type=int, default=8, help="timed steps per block")
    p.add_argument("--block-warmup", type=int, default=2, help="untimed steps at the start of each block")
    p.add_argument("--settle-s", type=float, default=0.3,
                   help="pause between blocks, so the previous variant's BLAS/OpenMP threads stop spinning")
    p.add_argument("--variants", default="teacher,student/module,student/decoder-fp32,student/decoder-bf16,"
                                         "student/decoder-fp16")
    p.add_argument("--module-batches", type=int_list, default=[1],
                   help="batch sizes at which the (slow) student module path is also timed")
    p.add_argument("--max-cache-bytes", type=float, default=6e9, help="skip points whose KV cache exceeds this")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="fewer steps: a smoke run")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def probe_steps(nbytes: int) -> dict:
    """The memory probes' ways of streaming `nbytes`, as steps for take_turns: {way: fn}. A
    probe's time is its fastest way's median (PROBES); see the module docstring."""
    import numpy as np
    import torch

    from retconvert.models.kernels import HugePageArena

    arena = HugePageArena()
    n = nbytes // 8  # copy: two buffers of nbytes / 2 in fp32
    src, dst = arena.empty((n,), torch.float32), arena.empty((n,), torch.float32)
    src.fill_(1.0), dst.fill_(0.0)
    w = arena.empty((576, nbytes // 4 // 576), torch.float32)
    w.fill_(1.0)
    x, w_np = np.ones((1, 576), np.float32), w.numpy()
    return {"memory/copy": lambda: dst.copy_(src), "memory/read:sum": lambda: w.sum(),
            "memory/read:gemv": lambda: x @ w_np}


PROBES = {"memory/copy": ("memory/copy",), "memory/read": ("memory/read:sum", "memory/read:gemv")}


def packed_weight_bytes(student, dtype) -> int:
    """Bytes of the packed decoder's weights in `dtype` (read once per token), from a decoder of
    its own: the variants build theirs for the batch sizes they time."""
    from retconvert.eval.speed import PackedDecoding

    return PackedDecoding(student, dtype).decoder_for(1).weight_bytes()


def kv_cache_bytes(cfg, batch: int, context: int) -> int:
    """Keys and values of a Llama-style teacher: 2 x layers x kv_heads x head_dim x tokens x 4 B."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * batch * 4


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.block_steps, args.block_warmup = 1, 4, 1
    from transformers import AutoModelForCausalLM

    import retconvert  # noqa: F401  (registers the RetNet Auto classes)
    from retconvert.convert.student import ConvertOptions, build_student
    from retconvert.convert.sources import load_teacher
    from retconvert.eval.speed import ModuleDecoding, PackedDecoding

    result = {**run_header("decode"), "machine": machine_info(), "settings": vars(args)}

    teacher = load_teacher(args.teacher).model
    if args.student:
        student = AutoModelForCausalLM.from_pretrained(args.student).eval()
        result["student"] = {"source": args.student}
    else:
        student = build_student(teacher, ConvertOptions()).eval()
        result["student"] = {"source": "converter weight mapping of the teacher, uncalibrated (speed only)",
                             "options": vars(ConvertOptions())}
    student.config.retention_mode = "chunkwise"
    wanted = args.variants.split(",")
    variants = {}  # name -> its decoding (start, step, stop)
    if "teacher" in wanted:
        variants["teacher"] = ModuleDecoding(teacher)
    if "student/module" in wanted:
        variants["student/module"] = ModuleDecoding(student)
    weight_bytes = {"teacher": sum(p.numel() * p.element_size() for p in teacher.parameters()),
                    "student/module": sum(p.numel() * p.element_size() for p in student.parameters())}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        name = f"student/decoder-{dtype_name}"
        if name in wanted:
            variants[name] = PackedDecoding(student, dtype)
            weight_bytes[name] = packed_weight_bytes(student, dtype)
    result["weight_bytes"] = weight_bytes
    probe_bytes = weight_bytes.get("student/decoder-fp32") or packed_weight_bytes(student, torch.float32)
    probes = probe_steps(probe_bytes)
    result["parameters"] = {"teacher": sum(p.numel() for p in teacher.parameters()),
                            "student": sum(p.numel() for p in student.parameters())}

    points, skipped = [], []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for context in args.contexts:
            ids = torch.randint(0, teacher.config.vocab_size, (1, context), generator=g)
            bases = {}  # one prefill per model; the decoders continue from the student's
            for name, model in (("teacher", teacher), ("student", student)):
                log(f"prefill {context} tokens: {name}")
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                bases[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            for batch in args.batches:
                active = []
                for name, v in variants.items():
                    if name == "student/module" and batch not in args.module_batches:
                        continue
                    kv_bytes = kv_cache_bytes(teacher.config, batch, context)
                    if name == "teacher" and kv_bytes > args.max_cache_bytes:
                        skipped.append({"variant": name, "context": context, "batch": batch,
                                        "reason": f"KV cache {kv_bytes / 1e9:.1f} GB "
                                                  f"> --max-cache-bytes {args.max_cache_bytes / 1e9:.1f} GB"})
                        continue
                    v.start(*bases[name.split("/")[0]], batch)
                    active.append(name)
                steps = {**(probes if batch == 1 else {}), **{name: variants[name].step for name in active}}
                times = take_turns(steps, [args.block_steps] * args.rounds, args.block_warmup, args.settle_s)
                for name in active:
                    variants[name].stop()
                names = (list(PROBES) if batch == 1 else []) + active
                for name in names:
                    # a probe's time: its fastest way of streaming
                    way = min(PROBES.get(name, (name,)), key=lambda w: statistics.median(times[w]))
                    t = statistics.median(times[way])
                    points.append({"variant": name, "context": context, "batch": batch, "latency_ms": t * 1e3,
                                   "tokens_per_s": batch / t, "steps": len(times[way]),
                                   "all_ms": [x * 1e3 for x in times[way]]})
                log(f"  context {context} batch {batch}: " + ", ".join(
                    f"{p['variant']} {p['latency_ms']:.1f} ms" for p in points[-len(names):]))
            del bases
        result["flatness_interleaved"] = flatness(args, teacher, student, variants)
    result["points"], result["skipped"] = points, skipped
    result["decoder_kernels"] = {name: {str(b): sorted({f"{tuple(m.w.shape)}: {m.kernel}" for m in d._matrices()})
                                        for b, d in v.decoders.items()}
                                 for name, v in variants.items() if isinstance(v, PackedDecoding)}
    result["probe_bytes"] = probe_bytes
    result["summary"] = summarise(points, probe_bytes, weight_bytes, args)
    print_summary(result["summary"])
    if args.out:
        write_json(args.out, result)
        log(f"wrote {args.out}")
    return 0


def flatness(args, teacher, student, variants) -> dict:
    """Batch-1 latency at the shortest and longest context, measured in the same loop: each
    student variant alternates blocks between a state after `lo` and one after `hi` tokens,
    so the ratio hi/lo is free of the drift between points measured minutes apart."""
    import torch

    lo, hi = min(args.contexts), max(args.contexts)
    g = torch.Generator().manual_seed(1)
    starts = {}
    for length in (lo, hi):
        out = student(input_ids=torch.randint(0, student.config.vocab_size, (1, length), generator=g),
                      use_cache=True, logits_to_keep=1)
        starts[length] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    result = {}
    for name, v in variants.items():
        if name == "teacher":
            continue
        times = take_turns({lo: v.step, hi: v.step}, [args.block_steps] * args.rounds, args.block_warmup,
                           args.settle_s, starts={n: (lambda n=n: v.start(*starts[n], 1)) for n in (lo, hi)})
        v.stop()
        a, b = statistics.median(times[lo]), statistics.median(times[hi])
        result[name] = {f"latency_ms_{lo}": a * 1e3, f"latency_ms_{hi}": b * 1e3, f"ratio_{hi}_over_{lo}": b / a}
        log(f"  flatness {name}: {a * 1e3:.1f} ms at {lo}, {b * 1e3:.1f} ms at {hi} ({b / a:.3f})")
    return result


def summarise(points, probe_bytes, weight_bytes, args) -> dict:
    """Ratios the issue asks for, all from this run; each bound from the probes of the same point."""
    at = {(p["variant"], p["context"], p["batch"]): p["latency_ms"] for p in points}
    lo, hi = min(args.contexts), max(args.contexts)
    out = {"flatness": {}, "vs_teacher": {}, "bound": {}, "batched_tokens_per_s": {}}
    for name in sorted({p["variant"] for p in points} - {"memory/copy", "memory/read"}):
        if (name, lo, 1) in at and (name, hi, 1) in at:
            out["flatness"][name] = {f"latency_{hi}_over_{lo}": at[(name, hi, 1)] / at[(name, lo, 1)]}
        for ctx in args.contexts:
            if name != "teacher" and ("teacher", ctx, 1) in at and (name, ctx, 1) in at:
                out["vs_teacher"].setdefault(name, {})[str(ctx)] = at[("teacher", ctx, 1)] / at[(name, ctx, 1)]
        scale = weight_bytes[name] / probe_bytes  # bf16 weights: half the bytes, half the bound
        for ctx in args.contexts:
            if (name, ctx, 1) not in at or ("memory/copy", ctx, 1) not in at:
                continue
            copy_ms, read_ms = at[("memory/copy", ctx, 1)] * scale, at[("memory/read", ctx, 1)] * scale
            out["bound"].setdefault(name, {})[str(ctx)] = {
                "latency_ms": at[(name, ctx, 1)], "bound_ms_copy": copy_ms, "bound_ms_read": read_ms,
                "fraction_of_copy_bound": copy_ms / at[(name, ctx, 1)],
                "fraction_of_read_bound": read_ms / at[(name, ctx, 1)],
                "copy_GBps": weight_bytes[name] / copy_ms / 1e6, "read_GBps": weight_bytes[name] / read_ms / 1e6}
    for p in points:
        out["batched_tokens_per_s"].setdefault(p["variant"], {}).setdefault(str(p["batch"]), {})[str(p["context"])] = \
            round(p["tokens_per_s"], 1)
    return out


def print_summary(s):
    for name, per_ctx in s["bound"].items():
        log(f"{name:24s} fraction of the bound (copy / read): " + ", ".join(
            f"{c}: {v['fraction_of_copy_bound']:.2f} / {v['fraction_of_read_bound']:.2f}" for c, v in per_ctx.items()))
    for name, v in s["vs_teacher"].items():
        log(f"{name:24s} speed-up vs teacher: " + ", ".join(f"{c}: {r:.2f}x" for c, r in v.items()))
    for name, v in s["flatness"].items():
        log(f"{name:24s} " + ", ".join(f"{k} = {r:.3f}" for k, r in v.items()))


if __name__ == "__main__":
    sys.exit(main())
