"""A small grid sweep over the training recipe (from scratch or distillation), one table out.

    retconvert sweep configs/sweep/scratch-grid.yaml [key=value ...]
    python -m retconvert.distill.sweep configs/sweep/scratch-grid.yaml [key=value ...]   (the same)

The grid YAML names a base distillation config, optional overrides, an output folder and a
`grid` of dotted keys to lists of values; every combination runs in turn (one process,
plain PyTorch) and one row per run is recorded: the varied values, final training loss,
held-out perplexity, parameter count, wall time and throughput. The table is written as
`<out_dir>/results.json` and `<out_dir>/results.md` after every run (a killed sweep keeps
its finished rows).
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import yaml

from retconvert.distill.config import ConfigError, load_config, resolve_path
from retconvert.errors import RetconvertError

SWEEP_KEYS = ("base", "overrides", "out_dir", "grid")


def load_sweep(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a sweep file accepts {', '.join(SWEEP_KEYS)}")
    if not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise ConfigError(f"{path}: grid must map dotted keys to lists of values")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list")
    if not isinstance(spec.get("overrides", []), list):
        raise ConfigError(f"{path}: overrides must be a list of key=value strings")
    spec.setdefault("overrides", [])
    spec.setdefault("out_dir", "outputs/sweep")
    return spec


def combinations(grid: Dict[str, list]) -> List[Dict[str, object]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_configs(spec: dict, extra: List[str] = ()) -> list:
    """Every grid point as a validated DistillConfig (fails before anything runs)."""
    base = resolve_path(spec.get("base")) if spec.get("base") else None
    out = Path(spec["out_dir"])
    configs = []
    for i, point in enumerate(combinations(spec["grid"])):
        overrides = list(spec["overrides"]) + [f"{k}={json.dumps(v)}" for k, v in point.items()]
        overrides += list(extra) + [f"run.out_dir={out / f'run-{i:03d}'}"]
        configs.append((point, load_config(base, overrides)))
    return configs


def to_markdown(rows: List[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def sweep(spec: dict, extra: List[str] = (), log=print) -> List[dict]:
    from retconvert.distill.trainer import run

    configs = run_configs(spec, extra)
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (point, cfg) in enumerate(configs):
        log(f"sweep run {i + 1}/{len(configs)}: {point}")
        t0 = time.time()
        result = run(cfg, log=lambda *_: None)
        row = {"run": i, **point, "final_loss": result.get("final_loss"),
               **{f"ppl_{k}": v for k, v in (result.get("eval") or {}).items()},
               "params": result.get("params"), "wall_s": round(time.time() - t0, 2),
               "tokens_per_s": result.get("train_tokens_per_s")}
        rows.append(row)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        (out / "results.md").write_text(to_markdown(rows))
    return rows


def add_arguments(p: argparse.ArgumentParser):
    """This module's arguments (also those of `retconvert sweep`)."""
    p.add_argument("sweep", help="sweep YAML (configs/sweep/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")


def run_args(args) -> List[dict]:
    """Run the sweep the parsed arguments name and print its table (markdown)."""
    rows = sweep(load_sweep(args.sweep), args.overrides)
    print(to_markdown(rows))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="grid sweep over distill/train.py settings")
    add_arguments(p)
    try:
        run_args(p.parse_args(argv))
    except RetconvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
