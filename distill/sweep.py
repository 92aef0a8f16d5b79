"""A grid sweep over the training recipe (from scratch or distillation), resumable, one table out;
with a `study:` section, the RetNet-vs-Transformer study (issue 17) end to end.

    retconvert sweep configs/sweep/scratch-grid.yaml [key=value ...]
    retconvert sweep configs/sweep/study-cpu.yaml                 # the study, CPU scale
    retconvert sweep configs/sweep/study-cpu.yaml --report-only   # re-render its report
    python -m retconvert.distill.sweep ...                        # the same

The grid YAML names a base distillation config, optional overrides, an output folder and a
`grid` of dotted keys to lists of values. Plain sweeps run every combination in turn (one
process, plain PyTorch) and record one row per run: the varied values, final training loss,
held-out perplexity, parameter count, wall time and throughput.

A `study:` section turns the sweep into the study: each grid point is trained once per
architecture (`archs`, the values of model.scratch.arch) and per seed (`seeds`; the seed also
sets the data order, so both architectures see the same tokens), over the full product of the
grid or one dimension at a time around `center` (`design: one_at_a_time`); `equal_params` adds
a Transformer at the centre whose FFN is widened to the RetNet's parameter count;
`tokens_per_step` keeps the tokens per step fixed across sequence lengths; `tokenizer_vocab`
trains a byte-level BPE of that size on the training text first (tiny models are otherwise
all embedding). After training, each run is measured (eval/study.py `measure`) and the
report is written (`report.md`, plots) next to `results.json`.

Resumable: rows are written to `<out_dir>/results.json` (atomically) after every run; a rerun
skips every run whose row is there with the same settings and restarts the unfinished one.
"""

import argparse
import copy
import hashlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import yaml

from retconvert.cli import Parser, exit_code
from retconvert.distill.config import ConfigError, DistillConfig, load_config, resolve_path
from retconvert.errors import RetconvertError

SWEEP_KEYS = ("base", "overrides", "out_dir", "grid", "study")
STUDY_KEYS = ("archs", "seeds", "design", "center", "equal_params", "tokens_per_step", "tokenizer_vocab",
              "tokenizer_chars", "measure")
ARCH_KEY = "model.scratch.arch"
FFN_KEY = "model.scratch.intermediate_size"


@dataclass
class Run:
    index: int
    run_id: str  # unique and stable: point/arch/seed (study) or the grid values (plain sweep)
    point: str  # "center", "stage2.lr=0.001", ... (study) or the run id (plain)
    values: Dict[str, object]  # the grid values this run sets
    arch: Optional[str]
    seed: Optional[int]
    equal_params: bool
    cfg: DistillConfig


def load_sweep(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    return check_sweep(spec, str(path))


def check_sweep(spec: dict, where: str = "sweep") -> dict:
    """Validate a sweep spec (as loaded from YAML) and fill in defaults; ConfigError names the key."""
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a sweep file accepts {', '.join(SWEEP_KEYS)}")
    if not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise ConfigError(f"{where}: grid must map dotted keys to lists of values")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key} must be a non-empty list")
    if not isinstance(spec.get("overrides", []), list):
        raise ConfigError(f"{where}: overrides must be a list of key=value strings")
    spec.setdefault("overrides", [])
    spec.setdefault("out_dir", "outputs/sweep")
    if spec.get("study") is not None:
        _check_study(spec, where)
    return spec


def _check_study(spec: dict, where: str):
    study = spec["study"]
    if not isinstance(study, dict):
        raise ConfigError(f"{where}: study must be a mapping with keys {', '.join(STUDY_KEYS)}")
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key study.{unknown[0]}; known: {', '.join(STUDY_KEYS)}")
    study.setdefault("archs", ["retnet", "llama"])
    study.setdefault("seeds", [0])
    study.setdefault("design", "product")
    if ARCH_KEY in spec["grid"]:
        raise ConfigError(f"{where}: with a study section the architectures are study.archs; drop grid.{ARCH_KEY}")
    if not study["seeds"] or not all(isinstance(s, int) for s in study["seeds"]):
        raise ConfigError(f"{where}: study.seeds must be a non-empty list of integers")
    if len(set(study["seeds"])) != len(study["seeds"]):
        raise ConfigError(f"{where}: study.seeds has a repeated seed")
    if study["design"] not in ("product", "one_at_a_time"):
        raise ConfigError(f"{where}: study.design must be product or one_at_a_time (got {study['design']!r})")
    if study["design"] == "one_at_a_time":
        center = study.get("center")
        if not isinstance(center, dict) or set(center) != set(spec["grid"]):
            raise ConfigError(f"{where}: study.center must give one value for each grid key "
                              f"({', '.join(spec['grid'])})")
    if study.get("equal_params") and not {"retnet", "llama"} <= set(study["archs"]):
        raise ConfigError(f"{where}: study.equal_params needs both retnet and llama in study.archs")
    for key in ("tokens_per_step", "tokenizer_vocab", "tokenizer_chars"):
        value = study.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{where}: study.{key} must be a positive integer or null")
    from retconvert.eval.study import StudySettings

    settings = StudySettings.from_dict(study.get("measure"), "study.measure")
    names = [name for name, _ in study_points(spec)]
    for point in settings.zero_shot_points:
        if point not in names:
            raise ConfigError(f"{where}: study.measure.zero_shot_points: no point {point!r}; the points are "
                              f"{', '.join(names)}")


def combinations(grid: Dict[str, list]) -> List[Dict[str, object]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def study_points(spec: dict) -> List[tuple]:
    """(name, values) of each study point: the product, or the centre then one key changed at a time."""
    study, grid = spec["study"], spec["grid"]
    if study["design"] == "product":
        return [(",".join(f"{k}={v}" for k, v in p.items()), p) for p in combinations(grid)]
    center = dict(study["center"])
    points = [("center", center)]
    for key, values in grid.items():
        points += [(f"{key}={v}", {**center, key: v}) for v in values if v != center[key]]
    return points


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def run_configs(spec: dict, extra: List[str] = ()) -> List[Run]:
    """Every run of the sweep as a validated DistillConfig (fails before anything runs)."""
    base = resolve_path(spec.get("base")) if spec.get("base") else None
    out = Path(spec["out_dir"]).expanduser()
    if spec.get("study") is None:
        runs = []
        for i, point in enumerate(combinations(spec["grid"])):
            overrides = list(spec["overrides"]) + [f"{k}={json.dumps(v)}" for k, v in point.items()]
            overrides += list(extra) + [f"run.out_dir={out / f'run-{i:03d}'}", "run.overwrite=true"]
            run_id = ",".join(f"{k}={v}" for k, v in point.items())
            runs.append(Run(i, run_id, run_id, point, None, None, False, load_config(base, overrides)))
        return runs
    study = spec["study"]
    runs = []
    for seed in study["seeds"]:  # seeds outermost: a partial study covers every point
        for name, point in study_points(spec):
            for arch in study["archs"]:
                runs.append(_study_run(spec, base, out, extra, name, point, arch, seed, len(runs)))
            if study.get("equal_params") and name == "center":
                runs.append(_study_run(spec, base, out, extra, name, point, "llama", seed, len(runs),
                                       equal_params=True))
    return runs


def _study_run(spec, base, out, extra, name, point, arch, seed, index, equal_params=False) -> Run:
    study = spec["study"]
    run_id = f"{name}/{arch}{'-equal-params' if equal_params else ''}/seed{seed}"
    overrides = list(spec["overrides"]) + [f"{k}={json.dumps(v)}" for k, v in point.items()]
    overrides += [f"{ARCH_KEY}={arch}", f"run.seed={seed}"]
    if study.get("tokenizer_vocab"):
        overrides.append(f"model.tokenizer={out / 'tokenizer'}")
    overrides += list(extra) + [f"run.out_dir={out / 'runs' / _slug(run_id)}", "run.overwrite=true"]
    cfg = load_config(base, overrides)
    if study.get("tokens_per_step"):
        rows, left = divmod(study["tokens_per_step"], cfg.data.seq_len * cfg.stage2.grad_accum)
        if left or rows == 0:
            raise ConfigError(f"study.tokens_per_step={study['tokens_per_step']} is not a multiple of "
                              f"data.seq_len x stage2.grad_accum = {cfg.data.seq_len * cfg.stage2.grad_accum} "
                              f"at point {name}; pick a tokens_per_step every sequence length divides")
        cfg = load_config(base, overrides + [f"stage2.micro_batch_size={rows}"])
    return Run(index, run_id, name, point, arch, seed, equal_params, cfg)


def _leaves(data: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in data.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_sha(cfg) -> str:
    """A fingerprint of a run's settings (a DistillConfig or its to_dict()), to tell a finished row
    apart from one made with other settings. Only settings that differ from the defaults count
    (and never the output folder), so a field added to the schema later, at its default, leaves
    the fingerprints of finished runs as they were."""
    data = cfg.to_dict() if isinstance(cfg, DistillConfig) else cfg
    defaults = _leaves(DistillConfig().to_dict())
    kept = {k: v for k, v in _leaves(data).items()
            if k not in ("run.out_dir", "run.resume", "run.overwrite") and (k not in defaults or defaults[k] != v)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_markdown(rows: List[dict], hide=("run_id", "config_sha")) -> str:
    if not rows:
        return ""
    cols = [c for c in rows[0] if c not in hide]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def read_rows(out: Path) -> List[dict]:
    path = out / "results.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RetconvertError(f"{path} is not valid JSON ({e.msg}); move it away to start the sweep afresh") from None
    if not isinstance(rows, list):
        raise RetconvertError(f"{path} is not a list of rows; move it away to start the sweep afresh")
    return rows


def write_rows(out: Path, rows: List[dict]):
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, out / "results.json")


def finished(rows: List[dict], runs: List[Run], out: Path) -> Dict[str, dict]:
    """{run id: row} of the runs already done; RetconvertError if a row was made with other settings."""
    done = {r.get("run_id"): r for r in rows}
    for run in runs:
        row = done.get(run.run_id)
        if row is not None and row.get("config_sha") != config_sha(run.cfg):
            raise RetconvertError(f"{out}/results.json holds run {run.run_id} with other settings; use another "
                                  "out_dir, or move that results.json away to start afresh")
    return done


def sweep(spec: dict, extra: List[str] = (), log=print,
          on_run_done: Optional[Callable[[int], None]] = None) -> List[dict]:
    """Run every run not yet in `<out_dir>/results.json`; return all rows in the sweep's order.
    `on_run_done(n)`, if given, is called after the row of the n-th run (1-based) is written
    (default: the kill-and-resume test's hook, RETCONVERT_TEST_HANG_AFTER_RUN=n)."""
    from retconvert.distill.checkpoint import hang_hook
    from retconvert.distill.trainer import run as train

    on_run_done = on_run_done or hang_hook("RETCONVERT_TEST_HANG_AFTER_RUN")
    runs = run_configs(spec, extra)
    out = Path(spec["out_dir"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    done = finished(read_rows(out), runs, out)
    study = spec.get("study")
    if study and study.get("tokenizer_vocab"):
        study_tokenizer(runs[0].cfg, study, out / "tokenizer", log)
    equal_ffn = {}
    for run in runs:
        if run.run_id in done:
            log(f"sweep run {run.index + 1}/{len(runs)}: {run.run_id} finished before, skipped")
            continue
        log(f"sweep run {run.index + 1}/{len(runs)}: {run.run_id}")
        cfg = run.cfg
        if run.equal_params:
            if run.seed not in equal_ffn:  # the parameter count does not depend on the seed
                equal_ffn[run.seed] = equal_params_ffn(spec, run, runs)
            cfg = with_ffn(cfg, equal_ffn[run.seed])
        t0 = time.time()
        result = train(cfg, log=lambda *_: None)
        wall = round(time.time() - t0, 2)
        row = _study_row(run, cfg, result, wall, spec, log) if study else _plain_row(run, result, wall)
        row["config_sha"] = config_sha(run.cfg)
        done[run.run_id] = row
        write_rows(out, [done[r.run_id] for r in runs if r.run_id in done])
        if on_run_done is not None:
            on_run_done(run.index + 1)
    rows = [done[r.run_id] for r in runs]
    if study:
        from retconvert.eval.study import write_report

        write_report(rows, out, {**spec, "_planned_runs": len(runs)})
    else:
        (out / "results.md").write_text(to_markdown(rows))
    return rows


def with_ffn(cfg: DistillConfig, ffn: int, device: Optional[str] = None) -> DistillConfig:
    """A copy of `cfg` with model.scratch.intermediate_size = ffn (and run.device, if given)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.scratch.intermediate_size = ffn
    cfg.run.device = device or cfg.run.device
    return cfg


def _plain_row(run: Run, result: dict, wall: float) -> dict:
    return {"run": run.index, "run_id": run.run_id, **run.values, "final_loss": result.get("final_loss"),
            **{f"ppl_{k}": v for k, v in (result.get("eval") or {}).items()},
            "params": result.get("params"), "wall_s": wall, "tokens_per_s": result.get("train_tokens_per_s")}


def _study_row(run: Run, cfg: DistillConfig, result: dict, wall: float, spec: dict, log) -> dict:
    from retconvert.eval.measure import machine_info
    from retconvert.eval.study import StudySettings, loss_curve, measure

    study = spec["study"]
    settings = StudySettings.from_dict(study.get("measure"))
    out_dir = Path(cfg.run.out_dir).expanduser()
    tokens = cfg.stage2.steps * cfg.stage2.micro_batch_size * cfg.stage2.grad_accum * cfg.data.seq_len
    train_s = tokens / result["train_tokens_per_s"]
    curve = loss_curve(out_dir / "metrics.jsonl", train_s)
    tail = [loss for _, _, loss in curve[-max(1, len(curve) // 10):]]
    sc = cfg.model.scratch
    row = {"run": run.index, "run_id": run.run_id, "point": run.point, "arch": run.arch, "seed": run.seed,
           "equal_params": run.equal_params, **run.values, FFN_KEY: sc.intermediate_size,
           "num_layers": sc.num_layers, "steps": cfg.stage2.steps,
           "tokens_per_step": tokens // cfg.stage2.steps, "tokens": tokens,
           "final_loss": result["final_loss"], "final_loss_avg": sum(tail) / len(tail),
           "train_s": round(train_s, 3), "train_tokens_per_s": result["train_tokens_per_s"], "wall_s": wall}
    zero_shot = run.point in settings.zero_shot_points
    row.update(measure(out_dir / "final", settings, cfg.data.seq_len, zero_shot, log=lambda *_: None))
    e = row.get("energy") or {}
    row["train_energy_estimate_j"] = train_s * e["assumed_watts"] if e.get("status") == "estimate" else None
    row["loss_curve"] = curve
    info = machine_info(cfg.run.device)
    row["machine"] = f"{info['cpu']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}"
    row["date_utc"] = info["date_utc"]
    log(f"  {run.run_id}: loss {row['final_loss_avg']:.3f}, C4 ppl {row['ppl_c4']:.1f}, "
        f"{row['params']:,} params, {train_s:.1f} s")
    return row


def equal_params_ffn(spec: dict, run: Run, runs: List[Run]) -> int:
    """The Transformer FFN size whose parameter count is nearest the RetNet's at the same point
    (models built on the CPU from the configs: parameters are linear in the FFN size)."""
    from retconvert.distill.models import count_parameters, load_scratch_tokenizer, scratch_model

    retnet = next(r for r in runs if r.point == run.point and r.arch == "retnet" and r.seed == run.seed)
    tokenizer = load_scratch_tokenizer(run.cfg)

    def params(cfg: DistillConfig, ffn: int) -> int:
        return count_parameters(scratch_model(with_ffn(cfg, ffn, device="cpu"), tokenizer))

    f0 = run.cfg.model.scratch.intermediate_size
    target = params(retnet.cfg, retnet.cfg.model.scratch.intermediate_size)
    p0, p1 = params(run.cfg, f0), params(run.cfg, f0 + 1)
    return max(1, round(f0 + (target - p0) / (p1 - p0)))


def study_tokenizer(cfg: DistillConfig, study: dict, folder: Path, log=print):
    """A byte-level BPE of `study.tokenizer_vocab` tokens trained on the first
    `study.tokenizer_chars` characters of the training sources (interleaved as the runs read
    them), saved to `folder`; kept as is when it is already there with that size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from retconvert.data import iter_texts

    vocab = study["tokenizer_vocab"]
    if (folder / "tokenizer.json").is_file():
        size = len(PreTrainedTokenizerFast.from_pretrained(str(folder)))
        if size != vocab:
            raise RetconvertError(f"{folder} holds a {size}-token tokenizer, the study asks for {vocab}; "
                                  "use another out_dir or remove that folder")
        return
    budget = study.get("tokenizer_chars") or 2_000_000
    sources = [iter_texts(resolve_path(s), cfg.data.text_field) for s in cfg.data.train]

    def texts():
        used = 0
        for group in itertools.zip_longest(*sources):
            for t in group:
                if t is not None and used < budget:
                    used += len(t)
                    yield t
            if used >= budget:
                return

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos)
    tmp = folder.with_name(folder.name + ".tmp")
    fast.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    log(f"trained a {len(fast)}-token byte-level BPE on {budget:,} characters of the training text: {folder}")


def add_arguments(p: argparse.ArgumentParser):
    """This module's arguments (also those of `retconvert sweep`)."""
    p.add_argument("sweep", help="sweep YAML (configs/sweep/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    p.add_argument("--report-only", action="store_true",
                   help="a study: re-render report.md and the plots from results.json, run nothing")


def run_args(args) -> List[dict]:
    """Run the sweep the parsed arguments name and print its table (markdown)."""
    spec = load_sweep(args.sweep)
    if getattr(args, "report_only", False):
        if spec.get("study") is None:
            raise RetconvertError("--report-only is for a sweep file with a study section")
        from retconvert.eval.study import write_report

        out = Path(spec["out_dir"]).expanduser()
        runs = run_configs(spec, args.overrides)
        done = finished(read_rows(out), runs, out)
        rows = [done[r.run_id] for r in runs if r.run_id in done]
        print(f"wrote {write_report(rows, out, {**spec, '_planned_runs': len(runs)})} ({len(rows)} runs)")
        return rows
    rows = sweep(spec, args.overrides)
    if spec.get("study") is None:
        print(to_markdown(rows))
    else:
        print(f"wrote {Path(spec['out_dir']).expanduser()}/results.json and report.md ({len(rows)} runs)")
    return rows


def main(argv=None) -> int:
    p = Parser(prog="distill/sweep.py", description="grid sweep over distill/train.py settings")
    add_arguments(p)
    args = p.parse_args(argv)
    return exit_code(lambda: run_args(args))


if __name__ == "__main__":
    sys.exit(main())
