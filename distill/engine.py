"""The optimisation backend: plain PyTorch (one process) or DeepSpeed ZeRO (any launcher).

Process model:
  * no launcher (RANK unset) and `run.deepspeed: null`: one process, plain PyTorch
    (AdamW + warmup/cosine LambdaLR, gradient accumulation and clipping done here);
  * `run.deepspeed: <json>`: DeepSpeed. Under `deepspeed` or `torchrun` the launcher's
    RANK/WORLD_SIZE are used; without a launcher a one-process gloo group is created
    (MASTER_ADDR 127.0.0.1, a free port), so a ZeRO config also runs as a plain `python`.
    The JSON holds the ZeRO settings; batch size, accumulation, clipping and bf16 are filled
    from the YAML (keys set to "auto" or absent in the JSON).
  * a multi-process launch without `run.deepspeed` is an error (there is no DDP path).

Loss scaling contract: the trainer calls `backward(loss)` with `loss` = (this rank's summed
token losses of one micro-batch) / (scored tokens of the whole global batch). Summed over
micro-batches and ranks that is the global mean, whatever the micro-batch / accumulation /
world-size split. DeepSpeed divides by the accumulation steps and averages over ranks, so
the DeepSpeed engine multiplies by both first.
"""

import json
import math
import os
import socket
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from retconvert.distill.config import DistillConfig, resolve_path
from retconvert.errors import RetconvertError


class TrainingDiverged(RetconvertError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Distributed:
    """Rank / world size and collective helpers (no-ops in a single plain process)."""

    def __init__(self, cfg: DistillConfig):
        launched = "RANK" in os.environ
        self.use_deepspeed = cfg.run.deepspeed is not None
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not self.use_deepspeed and self.world > 1:
            raise RetconvertError(f"launched with {self.world} processes but run.deepspeed is null; "
                                  "set run.deepspeed=configs/deepspeed/zero1.json (or 2, 3)")
        self.initialized = False
        if str(cfg.run.device) == "cuda" and torch.cuda.is_available():  # one GPU per local rank
            cfg.run.device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.local_rank)
        if self.use_deepspeed:
            if not launched:
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
            import deepspeed

            backend = "gloo" if cfg.run.device == "cpu" else None
            deepspeed.init_distributed(dist_backend=backend)
            self.initialized = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.initialized:
            torch.distributed.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized and self.world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t

    def close(self):
        if self.initialized and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            self.initialized = False


def adamw(params, s2) -> torch.optim.AdamW:
    """Stage 2's AdamW. `stage2.fused_adamw` (default) takes torch's fused kernel where every
    parameter is a float tensor on CPU or CUDA: the same update up to rounding, ~6x less time in
    the step on this project's CPU (docs/RESULTS.md); else torch's default implementation."""
    params = list(params)
    fused = s2.fused_adamw and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=s2.lr, betas=tuple(s2.betas), weight_decay=s2.weight_decay,
                             fused=fused or None)


def keep_fused_setting(optimizer):
    """After `load_state_dict`: torch copies each saved param group's settings back, `fused`
    included, so a checkpoint written under the other `stage2.fused_adamw` would switch this run's
    kernel. Puts the constructed setting (`defaults["fused"]`) back in every group and, when fused,
    the step counts where the fused kernel reads them (float32 on the parameter's device).
    Unwraps DeepSpeed's ZeRO optimizers (`.optimizer`); leaves other optimizers alone."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.AdamW):
        return
    fused = optimizer.defaults.get("fused")
    for group in optimizer.param_groups:
        group["fused"] = fused
        if fused:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)


class PlainEngine:
    """AdamW + LambdaLR in one process; `step()` after the last micro-batch of an update."""

    TOP_GRADS = 3  # parameters named in `last_top_grads`

    def __init__(self, model, params: List[torch.nn.Parameter], cfg: DistillConfig):
        s2 = cfg.stage2
        self.module = model
        self.params = params
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = [names.get(id(p), "?") for p in params]
        self.last_top_grads: List[tuple] = []
        self.clip = s2.clip
        self.optimizer = adamw(params, s2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(s2.warmup_steps, s2.steps, s2.min_lr_ratio))
        self.last_grad_norm = float("nan")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor):
        loss.backward()

    def micro_step(self):
        pass

    def step(self):
        """Clip, step AdamW and the schedule, zero the gradients. Records the global gradient
        norm before clipping (`last_grad_norm`) and the parameters with the largest gradient
        norms (`last_top_grads`, (name, norm) pairs), which name the source of a spike."""
        names, grads = zip(*[(n, p.grad) for n, p in zip(self.names, self.params) if p.grad is not None])
        norms = torch.stack([g.norm(dtype=torch.float32) for g in grads])  # (P,)
        total = norms.norm()
        self.last_grad_norm = float(total)
        top = norms.topk(min(self.TOP_GRADS, len(norms)))
        self.last_top_grads = [(names[i], round(float(v), 4)) for v, i in zip(top.values, top.indices)]
        if self.clip > 0:  # as torch.nn.utils.clip_grad_norm_, without computing the norms twice
            coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def loss_scale(self, accum: int, world: int) -> float:
        return 1.0

    # Checkpoint state -----------------------------------------------------------------------
    def save(self, folder: Path, is_main: bool):
        if is_main:
            torch.save(self.module.state_dict(), folder / "model.pt")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load(self, folder: Path):
        self.module.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        keep_fused_setting(self.optimizer)
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


def deepspeed_config(cfg: DistillConfig, world: int) -> dict:
    path = Path(resolve_path(cfg.run.deepspeed))
    if not path.is_file():
        raise RetconvertError(f"run.deepspeed: {path} not found; see configs/deepspeed/")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RetconvertError(f"{path} is not valid JSON ({e.msg})") from None
    s2 = cfg.stage2
    fill = {
        "train_micro_batch_size_per_gpu": s2.micro_batch_size,
        "gradient_accumulation_steps": s2.grad_accum,
        "train_batch_size": s2.micro_batch_size * s2.grad_accum * world,
        "gradient_clipping": s2.clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise RetconvertError(f"{path}: {key}={ds[key]} disagrees with the YAML ({value}); set it to \"auto\"")
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = cfg.run.dtype == "bfloat16"
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedEngine:
    """deepspeed.initialize around our AdamW and LambdaLR; DeepSpeed owns accumulation and clipping."""

    def __init__(self, model, params: List[torch.nn.Parameter], cfg: DistillConfig, world: int):
        import deepspeed

        s2 = cfg.stage2
        ds_cfg = deepspeed_config(cfg, world)
        offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"
        if offload and torch.cuda.is_available():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=s2.lr, betas=tuple(s2.betas), weight_decay=s2.weight_decay,
                                         adamw_mode=True)
        else:
            optimizer = adamw(params, s2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s2.warmup_steps, s2.steps, s2.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
        self.module = self.engine.module
        self.zero_stage = self.engine.zero_optimization_stage()
        self.last_grad_norm = float("nan")
        self.last_top_grads: List[tuple] = []  # not available: DeepSpeed owns (and shards) the gradients

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def loss_scale(self, accum: int, world: int) -> float:
        return float(accum * world)

    def backward(self, loss):
        self.engine.backward(loss)

    def micro_step(self):
        self.engine.step()  # DeepSpeed steps the optimizer itself at the accumulation boundary

    def step(self):
        norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, is_main: bool):
        self.engine.save_checkpoint(str(folder), tag="deepspeed")

    def load(self, folder: Path):
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RetconvertError(f"could not load the DeepSpeed checkpoint in {folder}")
        keep_fused_setting(self.optimizer)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 weights on every rank (ZeRO-3 parameters gathered)."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3):
            return {k: v.detach().float().clone() for k, v in self.module.state_dict().items()}


def make_engine(model, params, cfg: DistillConfig, dist: Distributed):
    if dist.use_deepspeed:
        return DeepSpeedEngine(model, params, cfg, dist.world)
    return PlainEngine(model, params, cfg)


def train_step(engine, loss_fn, rows: torch.Tensor, labels: torch.Tensor, dist: Distributed, *, micro: int,
               accum: int, device, teacher=None, cache=None, first_row: int = 0, autocast: bool = False,
               teacher_autocast: Optional[bool] = None,
               mark: Optional[Callable[[str], None]] = None) -> Tuple[torch.Tensor, int]:
    """One optimizer step of stage 2 on one global batch: `accum` micro-steps, then `engine.step()`.

    rows, labels: [accum * world * micro, T] token ids and next-token labels (-100: not scored),
    the whole global batch (every rank holds it and takes its own rows). Each micro-step:
    the teacher's logits (a no-grad forward of `teacher`, or its top-k from the logit `cache`
    at row `first_row + lo`; neither when from scratch), the student's forward, `loss_fn`
    (DistillationLoss with reduction "sum"), a finite check agreed by the ranks, backward of
    loss / scored tokens of the global batch (the loss scaling contract above), `engine.micro_step()`.
    `autocast`: bf16 autocast for the student (and the teacher unless `teacher_autocast` says
    otherwise). `mark(phase)`, if given, is called as each phase ends ("teacher",
    "student_forward", "loss", "backward", then "optimizer"), for benchmarks.

    Returns the global batch's (loss, kl, ce) per scored token ([3] float64, summed over ranks)
    and its scored-token count. Raises TrainingDiverged before any backward of a non-finite loss.
    """
    mark = mark or (lambda phase: None)
    teacher_autocast = autocast if teacher_autocast is None else teacher_autocast
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    world, scale = dist.world, engine.loss_scale(accum, dist.world)
    n_global = int((labels[:, 1:] != -100).sum())
    sums = torch.zeros(3, dtype=torch.float64)  # loss, kl, ce (summed over tokens)
    for j in range(accum):
        lo = (j * world + dist.rank) * micro
        x = rows[lo:lo + micro].to(device)  # [micro, T]
        y = labels[lo:lo + micro].to(device)
        teacher_logits = teacher_topk = None
        if cache is not None:
            teacher_topk = cache.get(first_row + lo, x)
        elif teacher is not None:
            # bf16: the frozen teacher's matmuls too (its weights stay as loaded)
            with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=teacher_autocast):
                teacher_logits = teacher(input_ids=x, use_cache=False).logits  # [micro, T, V]
        mark("teacher")
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logits = engine(input_ids=x, use_cache=False).logits  # [micro, T, V]
        mark("student_forward")
        parts = loss_fn(logits, y, teacher_logits=teacher_logits, teacher_topk=teacher_topk)
        local = torch.stack([parts.loss.detach(), parts.kl.detach(), parts.ce.detach()]).double().cpu()
        bad = torch.tensor([0.0 if torch.isfinite(local).all() else 1.0])
        if float(dist.all_reduce_sum(bad)) > 0:
            raise TrainingDiverged("the loss is not finite (nan/inf)")
        sums += local
        mark("loss")
        engine.backward(parts.loss / max(n_global, 1) * scale)
        mark("backward")
        engine.micro_step()
    engine.step()
    mark("optimizer")
    return dist.all_reduce_sum(sums) / max(n_global, 1), n_global
