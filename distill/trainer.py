"""The distillation recipe's logic: setup, stage 1 (attention transfer), stage 2 (logit
distillation, or next-token training from scratch), held-out perplexity, checkpoints, export.

`distill/train.py` is the readable driver; everything it calls lives here.
"""

import copy
import fnmatch
import json
import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from retconvert.distill.attention_transfer import (
    AttentionPath, TeacherTargets, attention_transfer_step, has_attention_path, layer_errors)
from retconvert.distill.checkpoint import CheckpointManager, hang_hook, save_student
from retconvert.distill.config import DistillConfig
from retconvert.distill.data import PackedStream, check_train_sources, eval_token_ids, make_labels
from retconvert.distill.engine import Distributed, TrainingDiverged, make_engine, train_step
from retconvert.distill.losses import DistillationLoss
from retconvert.distill.metrics import MetricsLogger, progress_bar
from retconvert.distill.models import (
    apply_length_caps,
    build_student,
    count_parameters,
    default_length_caps,
    load_scratch_tokenizer,
    load_teacher_model,
    trained_student,
    wrap_lora,
)
from retconvert.device import check_device
from retconvert.errors import RetconvertError


def converged(history, patience: int, min_improvement: float) -> bool:
    """True when the best of the last `patience` values is not `min_improvement` (relative)
    below the best before them; never with patience 0 or too short a history."""
    if patience <= 0 or len(history) <= patience:
        return False
    return min(history[-patience:]) > min(history[:-patience]) * (1 - min_improvement)


def freeze(model, patterns) -> int:
    """Stop training every parameter whose name matches one of the fnmatch `patterns`
    (`stage2.frozen`, e.g. "*layernorm.weight"); returns how many were frozen. A pattern that
    matches nothing is an error (a typo would silently train everything)."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise RetconvertError(f"stage2.frozen: {pattern!r} matches no parameter; names look like {names[1]!r}")
    frozen = [p for n, p in model.named_parameters() if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def hang_after_checkpoint_from_env() -> Optional[Callable[[int], None]]:
    """The kill-and-resume tests' hook: with RETCONVERT_TEST_HANG_AFTER_CHECKPOINT=N, stage 2
    waits after saving the checkpoint of step N, to be killed there (tests/test_distill.py,
    tests/test_correctness.py run train.py as a subprocess). None when the variable is unset."""
    return hang_hook("RETCONVERT_TEST_HANG_AFTER_CHECKPOINT")


class RunStopped(RetconvertError):
    """SIGTERM reached the run (a scheduler's or a session's end): it saved a checkpoint at the
    end of the step it was in and stopped; `--resume` continues from there."""


class Trainer:
    """The recipe's state and stages. `on_checkpoint(step)`, if given, is called after each
    stage-2 checkpoint is saved (default: the test hook of `hang_after_checkpoint_from_env`).
    A SIGTERM during a stage is a request to stop: the step in flight finishes, a checkpoint is
    saved (when checkpoints are on) and `RunStopped` is raised (`stop_on_sigterm`)."""

    def __init__(self, cfg: DistillConfig, log=print, on_checkpoint: Optional[Callable[[int], None]] = None):
        self.cfg = cfg
        self.on_checkpoint = on_checkpoint or hang_after_checkpoint_from_env()
        self.out_dir = Path(cfg.run.out_dir).expanduser()
        self.dist = Distributed(cfg)
        self._log = log
        self.t0 = time.time()
        self.result: Dict = {}
        self._stop_signal: Optional[int] = None  # set by the SIGTERM handler
        self._stopping = False  # agreed by every rank in _checkpoint_due

    @contextmanager
    def stop_on_sigterm(self):
        """While inside, SIGTERM only asks the stages to stop at the end of their step (the
        process's main thread only: elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self._stop_signal = signum

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _stop_if_asked(self, stage: str, step: int, saved: Optional[Path]):
        """Raise RunStopped once the ranks agreed to stop (after the checkpoint of `step`)."""
        if self._stopping:
            kept = f"checkpoint {saved} saved" if saved else "no checkpoint (run.checkpoint_every and " \
                "run.checkpoint_minutes are 0), so a resume starts over"
            raise RunStopped(f"stopped by SIGTERM after {stage} step {step}; {kept}; continue with --resume")

    def log(self, msg: str):
        if self.dist.is_main:
            self._log(msg)

    # ----------------------------------------------------------------------------------------
    # Setup
    # ----------------------------------------------------------------------------------------
    @classmethod
    def setup(cls, cfg: DistillConfig, log=print, on_checkpoint: Optional[Callable[[int], None]] = None) -> "Trainer":
        check_device(cfg.run.device, "run.device")
        self = cls(cfg, log, on_checkpoint)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        earlier = [self.out_dir / n for n in ("checkpoints", "checkpoints-stage1", "final", "metrics.jsonl",
                                              "stage1-student.pt")]
        replace = not cfg.run.resume and any(p.exists() for p in earlier)
        if replace and not cfg.run.overwrite:
            raise RetconvertError(f"{self.out_dir} holds an earlier run; pass --resume to continue it, "
                                  "run.overwrite=true to start afresh, or another run.out_dir")

        # Teacher, tokenizer and the data are checked before anything is written or removed.
        self.teacher = None
        if cfg.model.teacher is not None:
            self.teacher = load_teacher_model(cfg, log=self.log)
            self.tokenizer = self.teacher.tokenizer
            self.teacher.model.eval().requires_grad_(False)
        else:
            self.tokenizer = load_scratch_tokenizer(cfg)
        if self.tokenizer.eos_token_id is None:
            raise RetconvertError("the tokenizer has no EOS token; packing needs one to separate documents")
        check_train_sources(cfg.data.train, self.tokenizer, cfg.data.text_field)
        self.eval_ids = eval_token_ids(cfg.data.eval, self.tokenizer, cfg.data.eval_tokens, cfg.data.text_field)

        self.stage1_file, self.resume_from = self.out_dir / "stage1-student.pt", None
        if cfg.run.resume:  # its checkpoints decide what the student is built from
            self._open_out_dir(replace=False, earlier=earlier)
        stage1_saved = self.stage1_file.is_file() or (self.out_dir / "checkpoints-stage1" / "latest").is_file()
        weights_follow = self.resume_from is not None or (cfg.run.resume and cfg.stage1.steps > 0 and stage1_saved)
        self.student, self.origin = build_student(cfg, self.teacher, log=self.log, calibrate=not weights_follow,
                                                  tokenizer=self.tokenizer)
        self.student.float().to(cfg.run.device)
        if not cfg.run.resume:  # a new run writes out_dir only now: a bad option leaves nothing behind
            self._open_out_dir(replace=replace, earlier=earlier)
        self.params_total = count_parameters(self.student)
        self.log(f"student: {type(self.student).__name__}, {self.params_total / 1e6:.2f}M parameters")
        return self

    def _open_out_dir(self, replace: bool, earlier: list):
        """Remove an earlier run's files (`replace`), write config.json, open the metrics log and
        the stage-2 checkpoints; `resume_from`: the latest checkpoint with run.resume, else None."""
        cfg = self.cfg
        if replace:
            self.dist.barrier()
            if self.dist.is_main:
                for p in earlier + [self.out_dir / "tensorboard"]:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.dist.barrier()
        self.metrics = MetricsLogger(self.out_dir, self.dist.is_main, cfg.run.tensorboard, log=self.log)
        self.checkpoints = CheckpointManager(self.out_dir, self.dist, cfg.run.keep_checkpoints)
        self.resume_from = self.checkpoints.latest() if cfg.run.resume else None
        if cfg.run.resume and self.resume_from is None:
            self.log(f"resume: no checkpoint in {self.checkpoints.root}; starting from the beginning")

    # ----------------------------------------------------------------------------------------
    # Stage 1: attention transfer
    # ----------------------------------------------------------------------------------------
    def attention_transfer(self):
        """Stage 1: each layer's attention path learns the teacher's attention output on the
        teacher's own layer input (distill/attention_transfer.py), until `stage1.steps` or until
        the held-out per-layer error stops improving (`stage1.patience`). Resumable from
        `<out_dir>/checkpoints-stage1`; the result is kept in `stage1-student.pt`."""
        cfg, s1 = self.cfg, self.cfg.stage1
        if self.teacher is None or s1.steps == 0 or not has_attention_path(self.student):
            return
        if self.resume_from is not None:
            self.log("stage 1: skipped (resuming stage 2 from a checkpoint)")
            return
        if cfg.run.resume and self.stage1_file.is_file():
            self.student.load_state_dict(torch.load(self.stage1_file, weights_only=True))
            self.log(f"stage 1: loaded its result from {self.stage1_file}")
            return
        from retconvert.convert.families import family_for

        seed_everything(cfg.run.seed + 1)
        stream = PackedStream(cfg.data.train, self.tokenizer, s1.seq_len, seed=cfg.run.seed + 1,
                              shuffle_buffer=cfg.data.shuffle_buffer, text_field=cfg.data.text_field,
                              weights=cfg.data.train_weights)
        held_out = stream.next_rows(s1.eval_rows).to(cfg.run.device) if s1.eval_every > 0 else None  # never trained on
        path = AttentionPath(self.student, s1.train, s1.lr, s1.proj_lr, s1.lora_rank, s1.warmup_steps,
                             torch.Generator().manual_seed(cfg.run.seed + 1))
        self.log(f"stage 1: attention transfer ({s1.train}), {path.trainable / 1e6:.2f}M trainable parameters, "
                 f"{s1.micro_batch_size} x {s1.seq_len} tokens a step, at most {s1.steps} steps")
        manager = CheckpointManager(self.out_dir, self.dist, self.cfg.run.keep_checkpoints, name="checkpoints-stage1")
        state = {"step": 0, "history": [], "done": False}
        latest = manager.latest() if cfg.run.resume else None
        if latest is not None:
            state = manager.load(latest, path)
            stream.load_state_dict(state["data"])
            self.log(f"stage 1: resumed from {latest} at step {state['step']}")
        tokens_per_step = s1.micro_batch_size * s1.seq_len
        bar = progress_bar(s1.steps, state["step"], self.dist.is_main and cfg.run.progress,
                           "stage 1 (attention transfer)")
        self._last_checkpoint = time.time()
        autocast = (s1.dtype or cfg.run.dtype) == "bfloat16"
        with TeacherTargets(self.teacher.model, family_for(self.teacher.model.config)) as targets:
            if held_out is not None and state["step"] == 0:
                state["history"].append(self._stage1_eval(targets, held_out, 0, 0))
            step = state["step"]
            while not state["done"] and step < s1.steps:
                step, t_step = step + 1, time.time()
                ids = stream.next_rows(s1.micro_batch_size).to(cfg.run.device)
                try:
                    errors = attention_transfer_step(path, targets, ids, autocast=autocast)
                except TrainingDiverged as e:
                    raise TrainingDiverged(f"{e} at step {step}; lower stage1.lr (now {s1.lr}) "
                                           f"or stage1.proj_lr (now {s1.proj_lr})") from e
                mean = sum(errors) / len(errors)
                if step % s1.log_every == 0 or step == s1.steps or step == 1:
                    self.metrics.write({"event": "stage1", "step": step, "tokens": step * tokens_per_step,
                                        "loss": mean, "layer_rel_mse": [round(x, 6) for x in errors],
                                        "tokens_per_s": round(tokens_per_step / (time.time() - t_step), 1),
                                        "elapsed_s": round(time.time() - self.t0, 2)}, step)
                if s1.eval_every > 0 and step % s1.eval_every == 0:
                    state["history"].append(self._stage1_eval(targets, held_out, step, step * tokens_per_step))
                    state["done"] = converged(state["history"], s1.patience, s1.min_improvement)
                if bar is not None:
                    bar.set_postfix(rel_mse=f"{mean:.4f}")
                    bar.update(1)
                saved = None
                if self._checkpoint_due(step, now=state["done"] or step == s1.steps):
                    saved = manager.save(step, path, {**state, "step": step, "data": stream.state_dict()})
                self._stop_if_asked("stage 1", step, saved)
        if bar is not None:
            bar.close()
        self.student = path.finish()
        reason = "held-out error converged" if state["done"] else "step limit"
        self.log(f"stage 1: stopped at step {step} ({step * tokens_per_step:,} tokens, {reason}); "
                 f"held-out mean relative error {state['history'][-1] if state['history'] else float('nan'):.4f}")
        self.result["stage1_loss"] = state["history"][-1] if state["history"] else mean
        self.result["stage1_steps"] = step
        if self.dist.is_main and self._checkpoints_enabled():
            tmp = self.stage1_file.with_suffix(".tmp")
            torch.save(self.student.state_dict(), tmp)
            os.replace(tmp, self.stage1_file)
        self.dist.barrier()

    @torch.no_grad()
    def _stage1_eval(self, targets: TeacherTargets, ids: torch.Tensor, step: int, tokens: int) -> float:
        """Per-layer relative error on the held-out rows; logged as event `stage1_eval`; returns the mean."""
        errors = layer_errors(self.student, *targets(ids))
        mean = sum(errors) / len(errors)
        self.metrics.write({"event": "stage1_eval", "step": step, "tokens": tokens, "mean": mean,
                            "layer_rel_mse": [round(x, 6) for x in errors]}, step)
        self.log(f"stage 1, step {step} ({tokens:,} tokens): held-out mean relative error {mean:.4f}")
        return mean

    def _checkpoints_enabled(self) -> bool:
        return self.cfg.run.checkpoint_every > 0 or self.cfg.run.checkpoint_minutes > 0

    def _checkpoint_due(self, step: int, now: bool) -> bool:
        """Every `run.checkpoint_every` steps, every `run.checkpoint_minutes` of wall time, and
        whenever `now` (the end, a point of `run.eval_at_tokens`) or a SIGTERM came, when either
        is on. The ranks agree on both (their clocks and signals may not); a SIGTERM on any rank
        sets `_stopping` on all."""
        run = self.cfg.run
        due = now or (run.checkpoint_every > 0 and step % run.checkpoint_every == 0) \
            or (run.checkpoint_minutes > 0 and time.time() - self._last_checkpoint >= 60 * run.checkpoint_minutes)
        votes = self.dist.all_reduce_sum(torch.tensor([float(due), float(self._stop_signal is not None)]))
        self._stopping = bool(votes[1] > 0)
        due = self._checkpoints_enabled() and bool(votes[0] > 0 or self._stopping)
        if due:
            self._last_checkpoint = time.time()
        return due

    # ----------------------------------------------------------------------------------------
    # Stage 2: logit distillation (or from-scratch training)
    # ----------------------------------------------------------------------------------------
    def distill(self):
        cfg, s2, dist = self.cfg, self.cfg.stage2, self.dist
        seed_everything(cfg.run.seed + 2)  # independent of whether stage 1 ran in this process
        student = self.student
        student.train()
        if s2.gradient_checkpointing:
            if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
                student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s2.finetune == "lora":
            model = wrap_lora(student, cfg, log=self.log)
        else:
            model = student.requires_grad_(True)
        freeze(model, s2.frozen)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.log(f"stage 2: {s2.finetune} fine-tuning, {self.trainable / 1e6:.2f}M trainable parameters, "
                 f"{'DeepSpeed ' + str(cfg.run.deepspeed) if dist.use_deepspeed else 'plain PyTorch'}, "
                 f"world size {dist.world}")
        engine = make_engine(model, params, cfg, dist)
        self.engine = engine
        stream = PackedStream(cfg.data.train, self.tokenizer, cfg.data.seq_len, seed=cfg.run.seed,
                              shuffle_buffer=cfg.data.shuffle_buffer, text_field=cfg.data.text_field,
                              weights=cfg.data.train_weights)
        cache = None
        if s2.logit_cache and self.teacher is not None:
            from retconvert.distill.logit_cache import TopKLogitCache

            cache = TopKLogitCache.open(cfg, self.teacher, self.tokenizer, dist, log=self.log)
        self.tokens_per_step = s2.micro_batch_size * s2.grad_accum * dist.world * cfg.data.seq_len
        start = 0
        if self.resume_from is not None:
            state = self.checkpoints.load(self.resume_from, engine)
            stream.load_state_dict(state["data"])
            start = state["step"]
            self.log(f"resumed from {self.resume_from} at step {start}")
            self.metrics.write({"event": "resume", "step": start, "checkpoint": str(self.resume_from)}, None)
        elif self.eval_ids:
            self.evaluate(0, teacher_too=True)

        loss_fn = DistillationLoss(s2.temperature, s2.alpha, reduction="sum")
        micro, accum, world = s2.micro_batch_size, s2.grad_accum, dist.world
        global_rows = micro * accum * world
        eval_points = [t for t in cfg.run.eval_at_tokens if t > 0]  # 0 is the evaluation before step 1
        self._last_checkpoint = time.time()
        autocast = cfg.run.dtype == "bfloat16" and not dist.use_deepspeed
        teacher = self.teacher.model if self.teacher is not None else None
        bar = progress_bar(s2.steps, start, dist.is_main and cfg.run.progress,
                           "stage 2 (distillation)" if self.teacher is not None else "training")
        last_loss = float("nan")
        tokens_seen = 0
        t_start = time.time()
        try:
            for step in range(start + 1, s2.steps + 1):
                t_step = time.time()
                first_row = stream.rows_served
                rows = stream.next_rows(global_rows)
                labels = make_labels(rows, self.tokenizer.eos_token_id, None, cfg.data.mask_doc_boundaries)
                try:
                    sums, n_global = train_step(engine, loss_fn, rows, labels, dist, micro=micro, accum=accum,
                                                device=cfg.run.device, teacher=teacher, cache=cache,
                                                first_row=first_row, autocast=autocast)
                except TrainingDiverged as e:
                    raise TrainingDiverged(
                        f"stage 2 loss is not finite (nan/inf) at step {step}; stopped without saving. "
                        f"The last good checkpoint is {self.checkpoints.latest() or 'none'}; resume from it "
                        f"(run.resume=true) with a lower stage2.lr (now {s2.lr}) or stage2.clip") from e
                last_loss = float(sums[0])
                tokens_seen += global_rows * cfg.data.seq_len
                tokens_before, tokens_after = (step - 1) * self.tokens_per_step, step * self.tokens_per_step
                dt = time.time() - t_step
                tok_s = global_rows * cfg.data.seq_len / max(dt, 1e-9)
                if step % cfg.run.log_every == 0 or step == s2.steps:
                    self.metrics.write({"event": "train", "step": step, "loss": last_loss, "kl": float(sums[1]),
                                        "ce": float(sums[2]), "lr": engine.lr, "grad_norm": engine.last_grad_norm,
                                        "grad_top": engine.last_top_grads,
                                        "tokens": n_global, "tokens_seen": tokens_after,
                                        "tokens_per_s": round(tok_s, 1),
                                        "elapsed_s": round(time.time() - self.t0, 2)}, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:.0f}")
                    bar.update(1)
                # a curve point (run.eval_at_tokens) is evaluated and checkpointed, so the weights it
                # measured can be exported (distill/export.py) and run through the eval suite
                curve_point = any(tokens_before < t <= tokens_after for t in eval_points)
                if step != s2.steps and ((cfg.run.eval_every > 0 and step % cfg.run.eval_every == 0) or curve_point):
                    self.evaluate(step)
                saved = None
                if self._checkpoint_due(step, now=step == s2.steps or curve_point):
                    saved = self.checkpoints.save(step, engine, {"step": step, "data": stream.state_dict()})
                    if self.on_checkpoint is not None:
                        self.on_checkpoint(step)
                self._stop_if_asked("stage 2", step, saved)
        finally:
            if bar is not None:
                bar.close()
        wall = time.time() - t_start
        self.result.update(final_loss=last_loss, steps=s2.steps, wall_s=round(time.time() - self.t0, 2),
                           train_tokens_per_s=round(tokens_seen / max(wall, 1e-9), 1),
                           params=self.params_total, trainable_params=self.trainable)
        if self.eval_ids:
            self.result["eval"] = self.evaluate(s2.steps)

    @torch.no_grad()
    def evaluate(self, step: int, teacher_too: bool = False) -> Dict[str, float]:
        """Held-out perplexity of the student (and once of the teacher) on every eval source."""
        from retconvert.eval.perplexity import perplexity

        d = self.cfg.data
        module = self.engine.module if hasattr(self, "engine") else self.student
        was_training = module.training
        module.eval()
        out = {}
        for name, ids in self.eval_ids.items():
            window = min(d.eval_window, len(ids))
            stride = min(d.eval_stride, window)
            out[name] = perplexity(module, ids, window=window, stride=stride, batch_size=d.eval_batch_size).ppl
            if teacher_too and self.teacher is not None:
                out[f"teacher_{name}"] = perplexity(self.teacher.model, ids, window=window, stride=stride,
                                                    batch_size=d.eval_batch_size).ppl
        if was_training:
            module.train()
        seen = {"tokens_seen": step * self.tokens_per_step} if hasattr(self, "tokens_per_step") else {}
        self.metrics.write({"event": "eval", "step": step, **seen, **{f"ppl_{k}": v for k, v in out.items()}}, step)
        self.log(f"step {step}: held-out perplexity " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
        return out

    # ----------------------------------------------------------------------------------------
    # Export
    # ----------------------------------------------------------------------------------------
    def export(self) -> Optional[Path]:
        """The final student (LoRA merged) in the converter's checkpoint format, at <out_dir>/final."""
        cfg = self.cfg
        if not cfg.run.save_final:
            return None
        state = self.engine.full_state_dict() if hasattr(self, "engine") else self.student.state_dict()
        out = self.out_dir / "final"
        if self.dist.is_main:
            model = trained_student(type(self.student)(copy.deepcopy(self.student.config)), cfg, state,
                                    lora=cfg.stage2.finetune == "lora" and hasattr(self, "engine"))
            caps = apply_length_caps(model, default_length_caps(cfg, model))
            from retconvert.provenance import distillation_record

            info = distillation_record(cfg, self.result, origin=self.origin, world_size=self.dist.world,
                                       set_at_export=caps)
            gen = getattr(self.teacher.model, "generation_config", None) if self.teacher is not None else None
            save_student(model, self.tokenizer, out, info, generation_config=gen, name=self.out_dir.name)
            self.log(f"wrote {out}")
        self.dist.barrier()
        self.result["final"] = str(out)
        return out

    def cleanup(self):
        if hasattr(self, "metrics"):
            self.metrics.close()
        self.dist.close()


def run(cfg: DistillConfig, log=print, on_checkpoint: Optional[Callable[[int], None]] = None) -> Dict:
    """The whole recipe in one call, in stage order (distill/train.py, the sweep and the tests)."""
    trainer = Trainer.setup(cfg, log=log, on_checkpoint=on_checkpoint)
    try:
        with trainer.stop_on_sigterm():  # SIGTERM: checkpoint at the end of the step, then RunStopped
            trainer.attention_transfer()
            trainer.distill()
        trainer.export()
        return trainer.result
    finally:
        trainer.cleanup()
