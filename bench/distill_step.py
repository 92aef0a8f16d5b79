#!/usr/bin/env python
"""Cost of one stage-2 distillation step relative to a plain fine-tuning step of the teacher.

Requirement (performance issue): "Distillation throughput: tokens/s of a stage-2 step versus a
plain fine-tuning step of the teacher on the same batch: the overhead of the frozen teacher
should stay under 1.5x."

On one batch of --batch x --seq-len tokens it times, in fp32 on CPU:

  A  teacher_finetune   plain fine-tuning of the teacher: forward with labels (the model's own
                        cross-entropy), backward, optimizer step (AdamW + clipping + LR schedule
                        of the distillation config, via the recipe's PlainEngine), zero_grad;
  B  distill            one stage-2 step: the recipe's `train_step` (distill/engine.py), which
                        Trainer.distill calls: frozen teacher forward under no_grad, student forward,
                        DistillationLoss (sum, temperature and alpha from the config),
                        backward of loss / scored tokens, PlainEngine step;
  B' distill_cached     the same with the teacher's top-k logits read from the recipe's logit
                        cache (distill/logit_cache.py, filled before timing, so every timed
                        step is a cache hit): no teacher forward, top-k + remainder KL;
  C  student_only       the student alone: forward, DistillationLoss without a teacher (the
                        recipe's next-token CE path), backward, step;
  T  teacher_forward    the teacher's no-grad forward alone (the part of B that A lacks);
  Ab teacher_finetune_bf16  A under bf16 autocast (fp32 master weights, as train_step runs the
                        student): how close plain torch training of this model comes to the bf16
                        matmul peak on this machine, the reference for a stage-2 step's fraction.

The headline ratios are B / A (target < 1.5), B / C and T / B.

Method
  * Models: the teacher from `load_teacher` (via the recipe's `load_teacher_model`), the student
    from the recipe's `build_student(..., calibrate=False)`: the converter's weight mapping
    with the config's `model.convert` options (the ConvertOptions defaults, chunkwise retention,
    chunk 64) and calibration skipped. Calibration only changes parameter values, never the
    amount of work, so the timings are those of the calibrated student.
  * One model object per role: A trains the teacher, B / T use it frozen (eval, no grad); B, B'
    and C train the same student. Weights drift a little over the steps; the cost does not.
  * Cases alternate step by step (one step of every case per round, the order rotated every
    round), so slow phases of a shared machine hit all of them alike; --warmup rounds are
    untimed, then --repeats rounds are timed. Every run's wall and process CPU time are kept;
    medians are the headline. Each step records how many cores other processes kept busy.
  * One step = one micro-batch and one optimizer step (grad_accum 1): the real run (grad_accum
    2) spends a little less optimizer time per token, for every case alike.

Usage
  .venv/bin/python bench/distill_step.py --out docs/bench/distill_step.json
  .venv/bin/python bench/distill_step.py --teacher /tmp/tiny-teacher --repeats 2 --data random

The JSON goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    REPO,
    CpuMonitor,
    contention_limit,
    emit_result,
    file_sha256,
    fmt_seconds,
    git_state,
    log,
    machine_info,
    maxrss_bytes,
    fmt_bytes,
    other_busy_cores,
    run_header,
    summarize,
    time_callable,
    usable_cpus,
    wait_for_quiet,
)

DEFAULT_CONFIG = "configs/distill/smollm2-135m.yaml"
CASES = ("teacher_finetune", "teacher_finetune_bf16", "distill", "distill_cached", "student_only", "teacher_forward",
         "distill_bf16", "distill_bf16_teacher", "stage1", "stage1_bf16")
PHASES = ("teacher", "student_forward", "loss", "backward", "optimizer")  # of a distill step, in order
LABELS = {
    "teacher_finetune": "A  teacher fine-tuning step (fwd + CE + bwd + AdamW)",
    "teacher_finetune_bf16": "Ab A under bf16 autocast (fp32 master weights): torch's own ceiling here",
    "distill": "B  distillation step (teacher no-grad fwd + student fwd + KD loss + bwd + AdamW)",
    "distill_cached": "B' distillation step, teacher top-k from the logit cache",
    "student_only": "C  student step alone (fwd + CE + bwd + AdamW)",
    "teacher_forward": "T  teacher forward, no grad",
    "distill_bf16": "B  with the student under bf16 autocast (fp32 master weights), whatever run.dtype says",
    "distill_bf16_teacher": "B  with the student and the teacher's forward under bf16 autocast",
    "stage1": "S1 attention-transfer step (the config's stage1.train) on the same tokens: one teacher pass for "
              "all layer inputs/outputs, every layer's attention path fwd + bwd, Adam (on a copy of the student)",
    "stage1_bf16": "S1 with the teacher's pass and the retention modules under bf16 autocast (run.dtype=bfloat16)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="distillation config giving the loss, optimizer and conversion settings (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for distill/train.py (e.g. model.convert.chunk_size=128); repeatable")
    p.add_argument("--teacher", default=None,
                   help="teacher source for load_teacher (built-in name, folder, GGUF, Hub ID); default: the config's")
    p.add_argument("--batch", type=int, default=None,
                   help="rows per step (default: the config's stage2.micro_batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the config's data.seq_len)")
    p.add_argument("--data", choices=("config", "random"), default="config",
                   help="config: the first packed rows of the config's training text (labels masked at document "
                        "boundaries, as in training); random: uniform random token ids, every label scored")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (one step of every case per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--top-k", type=int, default=None,
                   help="logit-cache k for distill_cached (default: the config's stage2.logit_cache_top_k)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: the config's run.threads, "
                                                          "else the torch default)")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before timing, wait at most this many seconds for other processes to go idle")
    p.add_argument("--quiet-threshold", type=float, default=0.3,
                   help="tolerance (cores) above `usable cpus - threads` before a step counts as contended")
    p.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the frozen teacher's weights for B and T (cast after the student is built from it; "
                        "as model.teacher_dtype with a converted model.student)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    t_start = time.perf_counter()

    import torch

    from retconvert.distill.config import load_config
    from retconvert.distill.data import PackedStream, make_labels
    from retconvert.distill.engine import Distributed, PlainEngine, TrainingDiverged, train_step
    from retconvert.distill.losses import DistillationLoss
    from retconvert.distill.models import build_student, count_parameters, load_teacher_model, wrap_lora

    overrides = list(args.overrides)
    if args.teacher is not None:
        overrides.append(f"model.teacher={args.teacher}")
    if args.batch is not None:
        overrides.append(f"stage2.micro_batch_size={args.batch}")
    if args.seq_len is not None:
        overrides.append(f"data.seq_len={args.seq_len}")
    cfg = load_config(REPO / args.config if not os.path.isabs(args.config) else args.config, overrides)
    cfg.run.device = "cpu"
    if cfg.model.teacher is None:
        raise SystemExit("the config has no teacher (model.teacher: null); pass --teacher")
    if cfg.run.deepspeed is not None:
        log("note: run.deepspeed is ignored; this benchmark times the plain PyTorch engine")
        cfg.run.deepspeed = None
    s2 = cfg.stage2
    B, T = s2.micro_batch_size, cfg.data.seq_len

    threads = args.threads or cfg.run.threads
    if threads > 0:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    limit = contention_limit(threads, args.quiet_threshold)
    torch.manual_seed(args.seed)

    files = ["bench/distill_step.py", "bench/common.py", "distill/trainer.py", "distill/losses.py",
             "distill/engine.py", "distill/logit_cache.py", "models/retention.py"]
    result: Dict[str, Any] = run_header("distill_step", argv if argv is not None else sys.argv)
    result["machine"] = machine_info(torch_threads=threads)
    result["code"] = {"sha256_at_start": {f: file_sha256(REPO / f) for f in files}, **git_state(files)}

    # ---------------------------------------------------------------------------------------
    # Models: the recipe's own loaders (Trainer.setup)
    # ---------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    teacher = load_teacher_model(cfg, log=log)
    teacher.model.float()
    log(f"teacher loaded in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    student, origin = build_student(cfg, teacher, log=log, calibrate=False)
    student.float()
    log(f"student built in {time.perf_counter() - t0:.1f} s (weight mapping only, calibration skipped)")
    tokenizer = teacher.tokenizer
    tmodel = teacher.model
    if args.teacher_dtype != "float32":
        if any(c.startswith("teacher_finetune") for c in cases):
            raise SystemExit("--teacher-dtype bfloat16 times a bf16 teacher; leave teacher_finetune* out of --cases")
        tmodel.to(getattr(torch, args.teacher_dtype))

    # The batch
    if args.data == "config":
        stream = PackedStream(cfg.data.train, tokenizer, T, seed=cfg.run.seed, shuffle_buffer=0,
                              text_field=cfg.data.text_field, weights=cfg.data.train_weights)
        x = stream.next_rows(B)
        y = make_labels(x, tokenizer.eos_token_id, None, cfg.data.mask_doc_boundaries)
        data_info = {"kind": "config", "sources": list(stream.specs),
                     "note": "the first packed rows of data.train in file order (no shuffle buffer), "
                             "labels from make_labels as in training"}
    else:
        vocab = int(tmodel.config.vocab_size)
        x = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(args.seed))
        y = x.clone()
        data_info = {"kind": "random", "note": f"uniform random token ids in [0, {vocab}); every next token scored"}
    n_scored = int((y[:, 1:] != -100).sum())
    data_info.update(batch=B, seq_len=T, tokens=B * T, scored_tokens=n_scored)

    # ---------------------------------------------------------------------------------------
    # Engines: the recipe's PlainEngine (AdamW, clipping, warmup/cosine LR) for every trainee
    # ---------------------------------------------------------------------------------------
    dist = Distributed(cfg)  # one plain process
    # Trainer.distill: full fine-tuning (or LoRA), optional gradient checkpointing
    student.train()
    if s2.gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    smodel = wrap_lora(student, cfg) if s2.finetune == "lora" else student.requires_grad_(True)
    s_params = [p for p in smodel.parameters() if p.requires_grad]
    s_engine = PlainEngine(smodel, s_params, cfg)
    t_params = list(tmodel.parameters())
    for p in t_params:
        p.requires_grad_(True)
    t_engine = PlainEngine(tmodel, t_params, cfg)  # the teacher fine-tuned with the same optimizer settings

    loss_fn = DistillationLoss(s2.temperature, s2.alpha, reduction="sum")  # Trainer.distill, same arguments
    autocast = cfg.run.dtype == "bfloat16"

    # Logit cache for B': the recipe's TopKLogitCache in a temporary folder, filled before timing
    cache = None
    cache_dir = None
    cache_info: Dict[str, Any] = {}
    if "distill_cached" in cases:
        from retconvert.distill.logit_cache import TopKLogitCache

        cache_dir = tempfile.TemporaryDirectory(prefix="distill-step-cache-")
        ccfg = copy.deepcopy(cfg)
        ccfg.stage2.logit_cache_dir = cache_dir.name
        ccfg.stage2.steps, ccfg.stage2.grad_accum = 1, 1  # capacity: this batch's rows
        if args.top_k is not None:
            ccfg.stage2.logit_cache_top_k = args.top_k
        t0 = time.perf_counter()
        tmodel.eval().requires_grad_(False)
        cache = TopKLogitCache.open(ccfg, teacher, tokenizer, dist, log=log)
        cache.get(0, x)  # miss: runs the teacher and writes the rows; every later get() is a hit
        cache_info = {"top_k": ccfg.stage2.logit_cache_top_k, "temperature": s2.temperature,
                      "open_and_fill_s": round(time.perf_counter() - t0, 2),
                      "note": "timed steps read the batch's rows from the on-disk memmaps (page cache); "
                              "the fill (teacher forward + top-k) is not timed"}
        log(f"logit cache filled in {cache_info['open_and_fill_s']:.1f} s (top-{cache_info['top_k']})")

    def teacher_frozen():
        # Trainer.setup: self.teacher.model.eval().requires_grad_(False)
        tmodel.eval().requires_grad_(False)

    def teacher_trainable():
        tmodel.train().requires_grad_(True)

    last_loss: Dict[str, float] = {}
    last_phases: Dict[str, Dict[str, float]] = {}  # seconds per phase of the last distill step
    last_grad_norm: Dict[str, float] = {}

    def check(name: str, value: torch.Tensor):
        v = float(value.detach())
        last_loss[name] = v
        if not math.isfinite(v):
            raise SystemExit(f"{name}: loss is {v}; the benchmark's weights diverged")

    # A: plain fine-tuning of the teacher (fp32, or under bf16 autocast as train_step runs it)
    def make_teacher_finetune(name: str, bf16: bool = False) -> Callable[[], None]:
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = t_engine(input_ids=x, labels=y, use_cache=False)
            check(name, out.loss)
            t_engine.backward(out.loss)
            t_engine.step()  # clip, AdamW step, scheduler step, zero_grad(set_to_none=True)

        return step

    # B / B' / C: one stage-2 step, the recipe's own `train_step` (distill/engine.py, called by
    # Trainer.distill) with accum = world = 1 on this batch; the data stream, metrics and
    # checkpoints are left out. Its `mark` hook gives the phase boundaries.
    def make_distill_step(name: str, use_teacher: bool = True, use_cache: bool = False,
                          student_bf16: bool = autocast, teacher_bf16: bool = False) -> Callable[[], None]:

        def step():
            clock = [(time.perf_counter(), time.process_time())]  # phase boundaries (CPU ops are synchronous)
            try:
                sums, _ = train_step(s_engine, loss_fn, x, y, dist, micro=B, accum=1, device="cpu",
                                     teacher=tmodel if use_teacher and not use_cache else None,
                                     cache=cache if use_cache else None, autocast=student_bf16,
                                     teacher_autocast=teacher_bf16,
                                     mark=lambda phase: clock.append((time.perf_counter(), time.process_time())))
            except TrainingDiverged:
                raise SystemExit(f"{name}: loss is not finite; the benchmark's weights diverged") from None
            last_loss[name] = float(sums[0])
            if use_teacher:
                last_phases[name] = {m: dict(zip(PHASES, (b[i] - a[i] for a, b in zip(clock, clock[1:]))))
                                     for i, m in enumerate(("wall", "cpu"))}
                last_grad_norm[name] = s_engine.last_grad_norm

        return step

    # C: the student alone, the recipe's no-teacher path (DistillationLoss -> CE only)
    step_student_only = make_distill_step("student_only", use_teacher=False)

    # T: the frozen teacher's forward, as in B
    def step_teacher_forward():
        with torch.no_grad():
            tmodel(input_ids=x, use_cache=False).logits

    # S1: one stage-1 step as Trainer.attention_transfer does it, on its own copy of the student
    # (AttentionPath freezes everything but the attention path and may insert adapters)
    s1_path = None
    if "stage1" in cases or "stage1_bf16" in cases:
        from retconvert.convert.families import family_for
        from retconvert.distill.attention_transfer import AttentionPath, TeacherTargets, attention_transfer_step

        s1 = cfg.stage1
        s1_path = AttentionPath(copy.deepcopy(student), s1.train, s1.lr, s1.proj_lr, s1.lora_rank, s1.warmup_steps,
                                torch.Generator().manual_seed(args.seed))
        s1_family = family_for(tmodel.config)

    def make_stage1_step(autocast: bool = False):
        def step():
            with TeacherTargets(tmodel, s1_family) as targets:
                attention_transfer_step(s1_path, targets, x, autocast=autocast)

        return step

    steps = {
        "stage1": (make_stage1_step(), teacher_frozen),
        "stage1_bf16": (make_stage1_step(autocast=True), teacher_frozen),
        "teacher_finetune": (make_teacher_finetune("teacher_finetune"), teacher_trainable),
        "teacher_finetune_bf16": (make_teacher_finetune("teacher_finetune_bf16", bf16=True), teacher_trainable),
        "distill": (make_distill_step("distill"), teacher_frozen),
        "distill_cached": (make_distill_step("distill_cached", use_cache=True), teacher_frozen),
        "distill_bf16": (make_distill_step("distill_bf16", student_bf16=True), teacher_frozen),
        "distill_bf16_teacher": (make_distill_step("distill_bf16_teacher", student_bf16=True, teacher_bf16=True),
                                 teacher_frozen),
        "student_only": (step_student_only, teacher_frozen),
        "teacher_forward": (step_teacher_forward, teacher_frozen),
    }

    params = {
        "teacher": count_parameters(tmodel),
        "student": count_parameters(student),
        "student_trainable": sum(p.numel() for p in s_params),
        "teacher_trainable_in_finetune": sum(p.numel() for p in t_params),
    }
    log(f"teacher {params['teacher'] / 1e6:.2f}M parameters, student {params['student'] / 1e6:.2f}M "
        f"({params['student_trainable'] / 1e6:.2f}M trainable); batch {B} x {T} ({args.data} data)")

    result["config"] = {
        "distill_config": args.config, "overrides": overrides, "teacher": cfg.model.teacher,
        "teacher_base_model": teacher.base_model, "dtype": "float32", "autocast_bf16": autocast,
        "teacher_dtype": args.teacher_dtype,
        "batch": B, "seq_len": T, "tokens_per_step": B * T, "data": data_info,
        "cases": cases, "repeats": args.repeats, "warmup_rounds": args.warmup, "threads": threads,
        "seed": args.seed, "contention_limit_cores": limit,
        "loss": {"class": "retconvert.distill.losses.DistillationLoss", "temperature": s2.temperature,
                 "alpha": s2.alpha, "reduction": "sum, divided by the scored tokens as in the trainer"},
        "optimizer": {"engine": "retconvert.distill.engine.PlainEngine (AdamW + LambdaLR warmup/cosine)",
                      "lr": s2.lr, "betas": s2.betas, "weight_decay": s2.weight_decay, "clip": s2.clip,
                      "grad_accum": 1, "note": "one micro-batch and one optimizer step per timed step"},
        "finetune": s2.finetune, "gradient_checkpointing": s2.gradient_checkpointing,
        "student": {
            "class": type(student).__name__,
            "retention_mode": student.config.retention_mode,
            "chunk_size": student.config.chunk_size,
            "convert_options": asdict(cfg.model.convert),
            "convert_options_are_defaults": _options_are_defaults(cfg.model.convert),
            "calibration": "skipped (distill.models.build_student(calibrate=False)): it only changes parameter "
                           "values, not the work per step",
        },
        "logit_cache": cache_info or None,
    }
    result["params"] = params
    result["labels"] = {c: LABELS[c] for c in cases}
    result["method"] = (
        "Cases alternate step by step: every round runs one step of each case, the order rotated each round; "
        f"{args.warmup} untimed round(s), then {args.repeats} timed rounds. Each step is timed by common.time_callable "
        "(GC off, wall and process CPU time); the per-case mode switch of the teacher (train + requires_grad for A, "
        "eval + frozen otherwise) is done untimed before the step. Medians are the headline; all runs are kept. "
        "Every step records the cores other processes kept busy (CpuMonitor)."
    )

    if args.wait_quiet > 0:
        q = wait_for_quiet(args.wait_quiet, limit)
        result["wait_for_quiet"] = q
        log(f"waited {q['waited_s']:.0f} s for a quiet machine (quiet: {q['quiet']}, "
            f"other busy cores {q['other_busy_cores']})")
    busy = other_busy_cores(1.0)
    result["other_busy_cores_before_timing"] = busy
    if busy is not None and threads > 1 and busy > limit:
        # OpenMP workers spin-wait for a descheduled sibling: with more torch threads than idle
        # cores every step gets slower, and unevenly so (bench/README.md, "Threads").
        log(f"warning: other processes keep {busy:.1f} of {usable_cpus()} cores busy and torch uses {threads} threads; "
            "the timings will be inflated and noisy: wait for an idle machine or pass --threads 1")

    # ---------------------------------------------------------------------------------------
    # Timing: alternate the cases step by step
    # ---------------------------------------------------------------------------------------
    runs: Dict[str, List[Dict[str, Any]]] = {c: [] for c in cases}
    rounds = args.warmup + args.repeats
    for r in range(rounds):
        timed = r >= args.warmup
        k = r % len(cases)
        order = cases[k:] + cases[:k]
        for c in order:
            fn, setup = steps[c]
            setup()
            with CpuMonitor() as mon:
                t = time_callable(fn, repeats=1, warmup=0)
            rec = {"round": r, "wall_s": t["median_s"], "cpu_s": t["cpu_time"]["median_s"],
                   "other_busy_cores": mon.result.get("other_busy_cores"), "loss": last_loss.get(c)}
            if c in last_phases:
                rec["phases_s"] = last_phases.pop(c)
                rec["grad_norm"] = last_grad_norm.pop(c)
            if timed:
                runs[c].append(rec)
            others = rec["other_busy_cores"]
            log(f"{'round' if timed else 'warm-up'} {r + 1 - args.warmup if timed else r + 1}: {c:17s} "
                f"{fmt_seconds(rec['wall_s']):>9s} wall, {fmt_seconds(rec['cpu_s']):>9s} cpu, "
                f"others {others if others is None else round(others, 2)} cores"
                + ("; cpu s by phase " + " ".join(f"{ph} {v:.2f}" for ph, v in rec["phases_s"]["cpu"].items())
                   if "phases_s" in rec else ""))

    # ---------------------------------------------------------------------------------------
    # Summary
    # ---------------------------------------------------------------------------------------
    tokens = B * T
    per_case: Dict[str, Any] = {}
    for c in cases:
        wall = summarize([x_["wall_s"] for x_ in runs[c]])
        cpu = summarize([x_["cpu_s"] for x_ in runs[c]])
        busy = [x_["other_busy_cores"] for x_ in runs[c] if x_["other_busy_cores"] is not None]
        per_case[c] = {
            "label": LABELS[c],
            "wall": wall, "cpu": cpu,
            "tokens_per_s_wall": tokens / wall["median_s"] if wall.get("median_s") else None,
            "tokens_per_s_cpu": tokens / cpu["median_s"] if cpu.get("median_s") else None,
            "other_busy_cores_median": summarize(busy).get("median_s") if busy else None,
            "contended_steps": sum(b > limit for b in busy),
            "runs": runs[c],
        }
        if runs[c] and "phases_s" in runs[c][0]:
            per_case[c]["phases_median_s"] = {
                m: {ph: summarize([x_["phases_s"][m][ph] for x_ in runs[c]])["median_s"] for ph in PHASES}
                for m in ("wall", "cpu")}

    def ratio(a: str, b: str, metric: str):
        if a not in per_case or b not in per_case:
            return None
        num, den = per_case[a][metric].get("median_s"), per_case[b][metric].get("median_s")
        return num / den if num and den else None

    ratios: Dict[str, Any] = {}
    for metric in ("wall", "cpu"):
        ratios[metric] = {
            "distill_over_teacher_finetune": ratio("distill", "teacher_finetune", metric),
            "distill_cached_over_teacher_finetune": ratio("distill_cached", "teacher_finetune", metric),
            "distill_bf16_teacher_over_teacher_finetune_bf16": ratio("distill_bf16_teacher", "teacher_finetune_bf16",
                                                                     metric),
            "distill_over_student_only": ratio("distill", "student_only", metric),
            "student_only_over_teacher_finetune": ratio("student_only", "teacher_finetune", metric),
            "teacher_forward_share_of_distill": ratio("teacher_forward", "distill", metric),
            "distill_cached_over_distill": ratio("distill_cached", "distill", metric),
            "distill_bf16_over_distill": ratio("distill_bf16", "distill", metric),
            "distill_bf16_teacher_over_distill": ratio("distill_bf16_teacher", "distill", metric),
            "stage1_over_distill": ratio("stage1", "distill", metric),
            "stage1_bf16_over_distill_bf16_teacher": ratio("stage1_bf16", "distill_bf16_teacher", metric),
            "stage1_bf16_over_stage1": ratio("stage1_bf16", "stage1", metric),
        }
    target = 1.5
    headline = ratios["wall"]["distill_over_teacher_finetune"]
    contended = {c: per_case[c]["contended_steps"] for c in cases if per_case[c]["contended_steps"]}
    result["summary"] = {
        "tokens_per_step": tokens,
        "median_s": {m: {c: per_case[c][m].get("median_s") for c in cases} for m in ("wall", "cpu")},
        "tokens_per_s": {m: {c: per_case[c][f"tokens_per_s_{m}"] for c in cases} for m in ("wall", "cpu")},
        "ratios": ratios,
        "target": {"requirement": "distillation step / teacher fine-tuning step < 1.5",
                   "limit": target, "ratio_wall": headline, "ratio_cpu": ratios["cpu"]["distill_over_teacher_finetune"],
                   "met_wall": headline < target if headline is not None else None,
                   "met_cpu": (ratios["cpu"]["distill_over_teacher_finetune"] < target
                               if ratios["cpu"]["distill_over_teacher_finetune"] is not None else None)},
        "contended": contended or None,
        "peak_rss_bytes": maxrss_bytes(),
    }
    result["cases"] = per_case
    peak = {dt: matmul_peak(dt) for dt in ("float32", "bfloat16")}
    flops_per_token = 6 * params["student_trainable"] + 2 * params["teacher"]
    case_flops = {c: (6 * params["teacher_trainable_in_finetune"] if c.startswith("teacher_finetune")
                      else flops_per_token) for c in per_case}
    result["matmul_peak"] = {
        **peak, "flops_per_token": flops_per_token,
        "flops_per_token_teacher_finetune": 6 * params["teacher_trainable_in_finetune"],
        "note": "2048x576 by 576x1536 matmul, this process's threads, measured after the steps; model FLOPs "
                "per distill token counted as 6 x trainable student parameters + 2 x teacher parameters, "
                "per teacher fine-tuning token as 6 x teacher parameters",
        "fraction_of_peak": {
            c: {m: {dt: per_case[c][f"tokens_per_s_{m}"] * case_flops[c] / (peak[dt][f"gflop_s_{m}"] * 1e9)
                    for dt in peak} for m in ("wall", "cpu")}
            for c in per_case if c.startswith(("distill", "teacher_finetune")) and per_case[c]["tokens_per_s_wall"]},
    }
    result["code"]["sha256_at_end"] = {f: file_sha256(REPO / f) for f in files}
    result["code"]["changed_during_run"] = result["code"]["sha256_at_end"] != result["code"]["sha256_at_start"]
    result["total_wall_s"] = time.perf_counter() - t_start
    if cache_dir is not None:
        cache_dir.cleanup()

    print_table(result)
    emit_result(result, args.out)
    return 0


def matmul_peak(dtype: str, m: int = 2048, k: int = 576, n: int = 1536, repeats: int = 20) -> Dict[str, Any]:
    """GFLOP/s of one (m x k) @ (k x n) matmul in `dtype` with the current torch threads (median)."""
    import torch

    a = torch.randn(m, k).to(getattr(torch, dtype))
    b = torch.randn(k, n).to(getattr(torch, dtype))
    t = time_callable(lambda: a @ b, repeats=repeats, warmup=3)
    flop = 2 * m * k * n
    return {"shape": [m, k, n], "median_s": t["median_s"], "cpu_median_s": t["cpu_time"]["median_s"],
            "gflop_s_wall": flop / t["median_s"] / 1e9, "gflop_s_cpu": flop / t["cpu_time"]["median_s"] / 1e9}


def _options_are_defaults(options) -> bool:
    """Whether the conversion options that shape the student (not calibration data) are ConvertOptions()'s."""
    from retconvert.convert.student import ConvertOptions

    skip = {"calib_data", "calib_tokens", "calib_seq_len"}
    default = asdict(ConvertOptions())
    return all(v == default[k] for k, v in asdict(options).items() if k not in skip)


def print_table(result: Dict[str, Any]) -> None:
    s = result["summary"]
    log("")
    log(f"{'case':18s} {'median wall':>12s} {'tok/s wall':>11s} {'median cpu':>12s} {'tok/s cpu':>10s}")
    for c, row in result["cases"].items():
        tw, tc = row["tokens_per_s_wall"], row["tokens_per_s_cpu"]
        log(f"{c:18s} {fmt_seconds(row['wall'].get('median_s')):>12s} {'n/a' if tw is None else f'{tw:.1f}':>11s} "
            f"{fmt_seconds(row['cpu'].get('median_s')):>12s} {'n/a' if tc is None else f'{tc:.1f}':>10s}")
    for metric in ("wall", "cpu"):
        got = [f"{k} {v:.3f}" for k, v in s["ratios"][metric].items() if v is not None]
        if got:
            log(f"ratios ({metric}): " + ", ".join(got))
    for c, row in result["cases"].items():
        for m, phases in row.get("phases_median_s", {}).items():
            total = sum(phases.values())
            log(f"{c} phases ({m}, median s, share): " + ", ".join(
                f"{ph} {v:.2f} ({v / total:.0%})" for ph, v in phases.items()))
    mp = result.get("matmul_peak", {})
    for dt in ("float32", "bfloat16"):
        if dt in mp:
            log(f"{dt} matmul peak {mp[dt]['gflop_s_wall']:.0f} GFLOP/s wall, "
                f"{mp[dt]['gflop_s_cpu']:.0f} per CPU second; "
                + ", ".join(f"{c} {f['wall'][dt]:.0%} (wall) {f['cpu'][dt]:.0%} (CPU)"
                            for c, f in mp["fraction_of_peak"].items()))
    t = s["target"]
    if t["ratio_wall"] is not None:
        log(f"target B/A < {t['limit']}: wall {t['ratio_wall']:.3f} (met: {t['met_wall']}), "
            f"cpu {t['ratio_cpu']:.3f} (met: {t['met_cpu']})")
    if s["contended"]:
        log(f"contended steps (others above {result['config']['contention_limit_cores']:.1f} cores): {s['contended']}")
    log(f"peak RSS {fmt_bytes(s['peak_rss_bytes'])}")


if __name__ == "__main__":
    sys.exit(main())
