"""Markdown tables from a run's `metrics.jsonl`: stage 1's held-out per-layer error versus tokens,
held-out perplexity (and its ratio to the teacher's) versus stage-2 tokens, and throughput.

    python -m retconvert.distill.report ~/runs/smollm2-pure            # or the metrics.jsonl itself
    python -m retconvert.distill.report docs/runs/smollm2-pure/metrics.jsonl --columns 8

After a resume a step may be logged twice; the later record wins (as in `metrics.jsonl`'s contract).
"""

import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

from retconvert.cli import Parser


def load(path) -> List[dict]:
    """The records of `path` (a run folder or its metrics.jsonl), later duplicates of a step winning."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass a run folder or its metrics.jsonl")
    latest: Dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r.get("event"), r.get("step"))] = r
    return list(latest.values())


def _pick(rows: List[dict], n: int) -> List[dict]:
    """At most n rows, evenly spaced, always the first and the last."""
    if len(rows) <= n:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in idx]


def stage1_table(records: List[dict], columns: int = 8) -> str:
    evals = sorted((r for r in records if r["event"] == "stage1_eval"), key=lambda r: r["step"])
    if not evals:
        return "(no stage-1 evaluations)"
    shown = _pick(evals, columns)
    head = "| layer | " + " | ".join(f"{r['tokens']:,}" for r in shown) + " |"
    lines = [head, "|---:|" + "---:|" * len(shown)]
    for i in range(len(shown[0]["layer_rel_mse"])):
        lines.append(f"| {i} | " + " | ".join(f"{r['layer_rel_mse'][i]:.3f}" for r in shown) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{r['mean']:.3f}**" for r in shown) + " |")
    return "\n".join(lines)


def curve_table(records: List[dict]) -> str:
    evals = sorted((r for r in records if r["event"] == "eval"), key=lambda r: r["step"])
    if not evals:
        return "(no held-out evaluations)"
    teacher = {k[len("ppl_teacher_"):]: v for r in evals for k, v in r.items() if k.startswith("ppl_teacher_")}
    sets = [k[len("ppl_"):] for k in evals[0] if k.startswith("ppl_") and not k.startswith("ppl_teacher_")]
    lines = ["| step | stage-2 tokens | " + " | ".join(f"{s} ppl (x teacher)" for s in sets) + " |",
             "|---:|---:|" + "---:|" * len(sets)]
    if teacher:
        lines.append("| teacher | | " + " | ".join(f"{teacher.get(s, float('nan')):.2f}" for s in sets) + " |")
    for r in evals:
        cells = []
        for s in sets:
            v, t = r.get(f"ppl_{s}"), teacher.get(s)
            cells.append("" if v is None else f"{v:.2f}" + (f" ({v / t:.2f}x)" if t else ""))
        lines.append(f"| {r['step']} | {r.get('tokens_seen', 0):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput(records: List[dict]) -> str:
    out = []
    for event, name in (("stage1", "stage 1"), ("train", "stage 2")):
        rows = [r for r in records if r["event"] == event and r.get("tokens_per_s")]
        if rows:
            tps = [r["tokens_per_s"] for r in rows]
            out.append(f"- {name}: {len(rows)} logged steps, median {statistics.median(tps):.1f} tokens/s "
                       f"(min {min(tps):.1f}, max {max(tps):.1f}), last step {max(r['step'] for r in rows)}")
    spikes = [r for r in records if r["event"] == "train" and r.get("grad_norm") is not None]
    if spikes:
        worst = max(spikes, key=lambda r: r["grad_norm"])
        norms = [r["grad_norm"] for r in spikes]
        out.append(f"- stage 2 gradient norm before clipping: median {statistics.median(norms):.2f}, "
                   f"max {worst['grad_norm']:.2f} at step {worst['step']}"
                   + (f" (largest: {worst['grad_top']})" if worst.get("grad_top") else ""))
    return "\n".join(out) or "(no training records)"


def main(argv=None) -> int:
    p = Parser(prog="python -m retconvert.distill.report", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run folder (run.out_dir) or its metrics.jsonl")
    p.add_argument("--columns", type=int, default=8, help="stage-1 evaluations shown (evenly spaced)")
    args = p.parse_args(argv)
    records = load(args.run)
    print("### Stage 1: held-out relative error per layer vs tokens\n")
    print(stage1_table(records, max(2, args.columns)) + "\n")
    print("### Held-out perplexity vs stage-2 tokens\n")
    print(curve_table(records) + "\n")
    print("### Throughput\n")
    print(throughput(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
