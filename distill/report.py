"""Markdown tables from a run's `metrics.jsonl`: stage 1's held-out per-layer error versus tokens,
held-out perplexity (and its ratio to the teacher's) versus stage-2 tokens, and throughput.

    python -m retconvert.distill.report ~/runs/smollm2-pure            # or the metrics.jsonl itself
    python -m retconvert.distill.report docs/runs/smollm2-pure/metrics.jsonl --columns 8
    python -m retconvert.distill.report ~/runs/smollm2-pure ~/runs/smollm2-w64 --plot curve.png

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


def _name(run: str) -> str:
    """A run's label: its folder's name (the folder above a metrics.jsonl)."""
    path = Path(run).expanduser()
    return (path.parent if path.name == "metrics.jsonl" else path).name


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


def held_out(records: List[dict]) -> tuple:
    """The `eval` records in step order, and the teacher's perplexity per eval set {set: ppl}."""
    evals = sorted((r for r in records if r["event"] == "eval"), key=lambda r: r["step"])
    teacher = {k[len("ppl_teacher_"):]: v for r in evals for k, v in r.items() if k.startswith("ppl_teacher_")}
    return evals, teacher


def curve_table(records: List[dict]) -> str:
    evals, teacher = held_out(records)
    if not evals:
        return "(no held-out evaluations)"
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


def curve_points(records: List[dict]) -> Dict[str, List[tuple]]:
    """Held-out perplexity over the teacher's per eval set: {set: [(stage-2 tokens, ratio), ...]},
    in step order; sets whose teacher perplexity was not logged are left out."""
    evals, teacher = held_out(records)
    points: Dict[str, List[tuple]] = {}
    for r in evals:
        for s, t in teacher.items():
            if r.get(f"ppl_{s}") is not None:
                points.setdefault(s, []).append((r.get("tokens_seen", 0), r[f"ppl_{s}"] / t))
    return points


def plot_curves(runs: Dict[str, List[dict]], path: Path) -> None:
    """One panel per held-out set: perplexity / teacher's vs stage-2 tokens, a line per run
    (`runs`: label -> records). Raises SystemExit when no run has a held-out evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: curve_points(records) for label, records in runs.items()}
    sets = sorted({s for c in curves.values() for s in c})
    if not sets:
        raise SystemExit("error: no held-out evaluation with the teacher's perplexity in these runs; "
                         "set run.eval_at_tokens (or run.eval_every) and rerun")
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for label, c in curves.items():
            if s in c:
                x, y = zip(*c[s])
                ax.plot([t / 1e6 for t in x], y, marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{s}: perplexity / teacher's", xlabel="stage-2 tokens (millions)", ylabel="ratio")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("run", nargs="+", help="a run folder (run.out_dir) or its metrics.jsonl; the tables are "
                   "the first run's, --plot draws every run given")
    p.add_argument("--columns", type=int, default=8, help="stage-1 evaluations shown (evenly spaced)")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write a PNG of held-out perplexity / teacher's vs stage-2 tokens, a line per run")
    p.add_argument("--label", action="append", default=None,
                   help="the plot's name for each run, in order (default: the run folder's name)")
    args = p.parse_args(argv)
    if args.label is not None and len(args.label) != len(args.run):
        p.error(f"{len(args.label)} --label for {len(args.run)} runs; give one per run or none")
    runs = {(args.label[i] if args.label else _name(r)): load(r) for i, r in enumerate(args.run)}
    if len(runs) != len(args.run):
        p.error("two runs share a name; name them with --label")
    if args.plot is not None:
        plot_curves(runs, args.plot)
    records = next(iter(runs.values()))
    print("### Stage 1: held-out relative error per layer vs tokens\n")
    print(stage1_table(records, max(2, args.columns)) + "\n")
    print("### Held-out perplexity vs stage-2 tokens\n")
    print(curve_table(records) + "\n")
    print("### Throughput\n")
    print(throughput(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
