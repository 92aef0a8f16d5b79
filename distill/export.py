"""Export a distillation run's checkpoint as a student folder, while the run goes on or after it stopped.

    python -m retconvert.distill.export ~/runs/smollm2-w64 --out ~/runs/smollm2-w64-latest
    python -m retconvert.distill.export ~/runs/smollm2-w64 --checkpoint step-00000150 --out DIR
    python -m retconvert.distill.export ~/runs/smollm2-w64 --checkpoint stage1 --out DIR   # stage 1's result
    python -m retconvert.distill.export ~/runs/smollm2-w64 --out DIR --max-sink-distance 4096   # other caps
    python -m retconvert.distill.export ~/runs/smollm2-w64 --out DIR --no-length-caps             # none
    python -m retconvert.distill.export ~/runs/smollm2-w64 --out DIR --full-attention-layers 14,17  # a hybrid

The folder is what the run writes at its end (`<out_dir>/final`, `Trainer.export`): the
converter's checkpoint format, loadable with AutoModelForCausalLM, with the run's distillation
record cut at the checkpoint (`stages[-1].steps` is the checkpoint's step, and `checkpoint`
names it). The run folder is only read (its config.json and one complete checkpoint), so a
running job is not disturbed. Weights are read with `weights_only=True` (DeepSpeed checkpoints
with DeepSpeed's own fp32 consolidation). A converted student gets the length caps its run's
`final/` gets (run.length_caps): `RetNetConfig.max_sink_distance` and `max_retention_span` at the
training rows' length, how a student trained on rows of N tokens keeps its quality past N
(docs/RESULTS.md); `--max-sink-distance N` / `--max-retention-span N` set others, and
`--no-length-caps` none. `--full-attention-layers` makes those layers full softmax attention
(their retention window widened to max_position_embeddings; `widen_layers`), a hybrid that
keeps a KV cache in them. The weights stay the checkpoint's; caps and windows are recorded in
`distillation.json` as set at export.
"""

import dataclasses
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from retconvert.cli import Parser, exit_code, int_list
from retconvert.distill.checkpoint import latest_checkpoint, save_student
from retconvert.distill.config import DistillConfig, config_from_dict
from retconvert.distill.models import (
    apply_length_caps,
    build_student,
    check_length_caps,
    check_widening,
    default_length_caps,
    load_scratch_tokenizer,
    load_teacher_model,
    trained_student,
    widen_layers,
)
from retconvert.errors import RetconvertError
from retconvert.paths import check_output_dir


def run_config(run_dir: Path) -> DistillConfig:
    """The DistillConfig a run recorded in `<run_dir>/config.json` (the one its last start used)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise RetconvertError(f"{run_dir} is not a distillation run folder (no config.json); pass the run's "
                              "run.out_dir")
    return config_from_dict(json.loads(path.read_text()), source=str(path))


def find_checkpoint(run_dir: Path, name: Optional[str]) -> Path:
    """`<run_dir>/checkpoints/<name>` (default: the one `latest` names), complete; or, for
    name "stage1", stage 1's saved result `<run_dir>/stage1-student.pt`."""
    if name == "stage1":
        path = run_dir / "stage1-student.pt"
        if not path.is_file():
            raise RetconvertError(f"{path} not found: stage 1 has not finished in this run")
        return path
    root = run_dir / "checkpoints"
    if name is None:
        latest = latest_checkpoint(root)
        if latest is None:
            hint = "; --checkpoint stage1 exports stage 1's result" if (run_dir / "stage1-student.pt").is_file() else ""
            raise RetconvertError(f"{root} holds no stage-2 checkpoint yet{hint}")
        return latest
    path = root / name
    if not (path / "COMPLETE").is_file():
        found = ", ".join(sorted(p.name for p in root.glob("step-*") if (p / "COMPLETE").is_file())) or "none"
        raise RetconvertError(f"{path} is not a complete checkpoint; complete ones: {found}")
    return path


def checkpoint_weights(path: Path) -> dict:
    """The student's state dict in a stage-2 checkpoint (plain `model.pt`, or DeepSpeed's shards
    consolidated to fp32), or in stage 1's `stage1-student.pt`."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if (path / "model.pt").is_file():
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")


def export_checkpoint(run_dir, out, checkpoint: Optional[str] = None, force: bool = False, log=print,
                      caps: Optional[Dict[str, int]] = None, full_attention_layers: Sequence[int] = (),
                      full_attention_window: Optional[int] = None) -> Path:
    """Write the student of `run_dir`'s checkpoint (see `find_checkpoint`) to the folder `out`,
    with length caps ({LENGTH_CAPS field: tokens}; distill/models.py) set in its config: the
    run's defaults (`default_length_caps`), each replaced by a value in `caps`; `caps={}` sets
    none. `full_attention_layers` (indices) become full softmax attention over
    `full_attention_window` tokens (`widen_layers`: a hybrid). RetconvertError for a folder that
    is not a run, a missing or incomplete checkpoint, an `out` that exists (`force` replaces an
    earlier export of this tool), a cap or a layer out of range, or either on a model without
    retention."""
    run_dir = Path(run_dir).expanduser()
    cfg = run_config(run_dir)
    explicit = check_length_caps(caps or {})  # before anything loads
    check_widening(full_attention_layers, full_attention_window)
    path = find_checkpoint(run_dir, checkpoint)
    out = Path(out).expanduser()
    check_output_dir(out, force, ours=lambda p: (p / "distillation.json").is_file(),
                     kind="an earlier exported or final student (distillation.json)")
    stage1 = path.is_file()
    step = 0 if stage1 else json.loads((path / "COMPLETE").read_text())["step"]
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device="cpu"))
    teacher = load_teacher_model(cfg, log=log) if cfg.model.teacher is not None else None
    tokenizer = teacher.tokenizer if teacher is not None else load_scratch_tokenizer(cfg)
    student, origin = build_student(cfg, teacher, log=log, calibrate=False, tokenizer=tokenizer)
    student = trained_student(student, cfg, checkpoint_weights(path),
                              lora=cfg.stage2.finetune == "lora" and not stage1, log=log)
    defaults = {} if caps == {} else default_length_caps(cfg, student, stage=1 if stage1 else 2)
    caps = apply_length_caps(student, {**defaults, **explicit})
    if caps:
        log(f"length caps {caps} (defaults: run.length_caps; --no-length-caps sets none)")
    widened = widen_layers(student, list(full_attention_layers), full_attention_window)
    if widened:
        log(f"full attention in layers {', '.join(map(str, full_attention_layers))} "
            f"(windows now {widened['retention_window']})")

    from retconvert.provenance import distillation_record

    world = 1 if stage1 else max(1, len(list(path.glob("trainer-rank*.pt"))))
    cut = dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, steps=step))
    info = distillation_record(cut, {}, origin=origin, world_size=world,
                               set_at_export={**caps, **widened})
    info["checkpoint"] = {"name": path.name, "step": step, "stage": 1 if stage1 else 2,
                          "stage2_steps_planned": cfg.stage2.steps}
    gen = getattr(teacher.model, "generation_config", None) if teacher is not None else None
    save_student(student, tokenizer, out, info, generation_config=gen, name=f"{run_dir.name}-{path.stem}")
    log(f"wrote {out} (from {path}, stage {info['checkpoint']['stage']}, step {step})")
    return out


def main(argv=None) -> int:
    p = Parser(prog="python -m retconvert.distill.export", description=__doc__.split("\n")[0])
    p.add_argument("run", help="the run's folder (its run.out_dir)")
    p.add_argument("--out", required=True, help="folder to write the student to")
    p.add_argument("--checkpoint", default=None,
                   help="a stage-2 checkpoint's name (step-00000150; default: the latest) or 'stage1'")
    p.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    p.add_argument("--max-sink-distance", type=int, default=None, metavar="N",
                   help="queries past position N score the attention sink as from N (default, for a converted "
                        "student: the training rows' length; see RetNetConfig.max_sink_distance)")
    p.add_argument("--max-retention-span", type=int, default=None, metavar="N",
                   help="cap every retention head's memory at N tokens (default, for a converted student: the "
                        "training rows' length; see RetNetConfig.max_retention_span)")
    p.add_argument("--no-length-caps", action="store_true", help="set neither cap (run.length_caps: false)")
    p.add_argument("--full-attention-layers", type=int_list, default=[], metavar="I,J,...",
                   help="make these layers (0-based) full softmax attention: a hybrid with a KV cache in them "
                        "(docs/RESULTS.md: the teacher's retrieval layers)")
    p.add_argument("--full-attention-window", type=int, default=None, metavar="N",
                   help="their window in tokens (default: max_position_embeddings)")
    args = p.parse_args(argv)
    caps = {"max_sink_distance": args.max_sink_distance, "max_retention_span": args.max_retention_span}

    def export():
        if args.no_length_caps and any(v is not None for v in caps.values()):
            raise RetconvertError("--no-length-caps sets no cap; leave out --max-sink-distance / --max-retention-span")
        chosen = {} if args.no_length_caps else caps
        return export_checkpoint(args.run, args.out, args.checkpoint, args.force, caps=chosen,
                                 full_attention_layers=args.full_attention_layers,
                                 full_attention_window=args.full_attention_window)

    return exit_code(export)


if __name__ == "__main__":
    sys.exit(main())
