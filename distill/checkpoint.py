"""Training checkpoints, written atomically, and the final student export.

Layout under `<out_dir>/checkpoints/`:

    step-00000050/        one complete checkpoint
        model.pt, optimizer.pt, scheduler.pt      (plain PyTorch)  or  deepspeed/...  (DeepSpeed)
        trainer-rank<r>.pt                        step, data position, RNG states of rank r
        COMPLETE                                  written last
    latest                                        the name of the newest complete checkpoint

A checkpoint is first written to `.tmp-step-...` (all ranks write into the same folder),
then renamed by rank 0 and `latest` is replaced atomically, so a kill at any moment leaves
the previous checkpoint intact. Only the `keep` newest are kept. Stage 1 keeps its own in
`<out_dir>/checkpoints-stage1/`, same layout (its model, Adam and warmup scheduler).
"""

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from retconvert.errors import RetconvertError
from retconvert.paths import atomic_output_dir


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The complete checkpoint `<root>/latest` names; None without one (reads only)."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "COMPLETE").is_file():
        raise RetconvertError(f"{pointer} names {path.name}, which is incomplete; delete {pointer} to restart")
    return path


class CheckpointManager:
    """Atomic checkpoints under `<out_dir>/<name>/` (stage 2: "checkpoints", stage 1: "checkpoints-stage1")."""

    def __init__(self, out_dir: Path, dist, keep: int = 2, name: str = "checkpoints"):
        self.root = Path(out_dir) / name
        self.dist = dist
        self.keep = max(1, keep)
        if dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.root)

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        name = f"step-{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        engine.save(tmp, self.dist.is_main)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer-rank{self.dist.rank}.pt")
        self.dist.barrier()
        if self.dist.is_main:
            (tmp / "COMPLETE").write_text(json.dumps({"step": step}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / ".latest.tmp"
            pointer_tmp.write_text(name)
            os.replace(pointer_tmp, self.root / "latest")
            done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
            for old in done[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return final

    def load(self, path: Path, engine) -> dict:
        """Restore engine state; returns this rank's trainer state (RNG already restored)."""
        mine = path / f"trainer-rank{self.dist.rank}.pt"
        if not mine.is_file():
            raise RetconvertError(f"{path} has no state for rank {self.dist.rank}; resume with the same "
                                  "number of processes as the interrupted run")
        engine.load(path)
        state = torch.load(mine, weights_only=False)
        set_rng_state(state["rng"])
        return state


def hang_hook(variable: str) -> Optional[Callable[[int], None]]:
    """The kill-and-resume tests' hook, read once when a run is set up: with the environment
    variable `variable` set to N, the returned callback, called with N, waits an hour there for
    the test to kill the process (tests/test_sweep.py). None when `variable` is unset."""
    hang_at = os.environ.get(variable)
    if hang_at is None:
        return None

    def hang(count: int):
        if str(count) == hang_at:
            time.sleep(3600)

    return hang


def save_student(model, tokenizer, out: Path, info: dict, generation_config=None, name: Optional[str] = None):
    """The final student, loadable with AutoModelForCausalLM (trust_remote_code or retconvert imported),
    with its distillation record `info` (config.json and distillation.json) and its model card
    (`retconvert.hub.write_card`) titled `name` (default: the folder's name)."""
    import retconvert  # noqa: F401  (registers RetNet for auto_map, so save_pretrained writes it and the code)
    from retconvert.hub import write_card

    with atomic_output_dir(out, force=True, ours=lambda p: (p / "distillation.json").is_file(),
                           kind="an earlier final model (distillation.json)") as tmp:  # a Llama baseline too
        model.config.distillation = info
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        (tmp / "distillation.json").write_text(json.dumps(info, indent=2, default=str))
        write_card(tmp, name or Path(out).name)
    return out
