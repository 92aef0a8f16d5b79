"""Per-run measurements and the report of a RetNet-vs-Transformer study (`retconvert sweep` with a
`study:` section, distill/sweep.py).

`measure` evaluates one trained model folder with the eval suite's library functions (held-out
perplexity, per-position loss, decode latency and cache memory versus context, the energy
estimate, zero-shot tasks); `write_report` turns the sweep's rows into `report.md` and plots:
tables with mean and spread over seeds, loss versus training time and decode latency versus
context for both architectures, and the original study's findings checked one by one.
"""

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

from retconvert.errors import RetconvertError
from retconvert.eval.lm_tasks import CHANCE, binomial_stderr

# The original study's findings (issue 17), each checked by `findings`.
STUDY_CLAIMS = {
    "train_time": "RetNet trains in about 80% of the Transformer's time",
    "loss": "average loss 1.37 (Transformer) vs 7.86 (RetNet) over 72 models each",
    "best": "best RetNet: embedding 1280, FFN 2048, 4 heads at sequence length 256; "
            "best Transformer: 8 heads at sequence length 512",
    "decode_flat": "RetNet decode time flat in the context (within 5%), Transformer's growing",
    "long_range": "weaker long-range dependency for RetNet",
}


@dataclass
class StudySettings:
    """What is measured after each run (`study.measure` in the sweep YAML)."""

    contexts: List[int] = field(default_factory=lambda: [16, 64, 256, 1024])  # decode and memory, tokens
    decode_steps: int = 16
    decode_warmup: int = 2
    ppl_tokens: int = 8192  # per perplexity set (held-out C4, WikiText-2)
    ppl_batch_size: int = 8
    position_docs: int = 8  # rows of held-out C4 for the per-position loss (each the run's seq_len)
    energy_context: int = 256
    energy_steps: int = 32
    energy_repeats: int = 3
    assumed_watts: float = 15.0  # the estimate's power when no counter is readable (not a measurement)
    zero_shot_tasks: List[str] = field(default_factory=lambda: ["piqa", "arc_easy", "winogrande"])
    zero_shot_limit: Optional[int] = 200  # examples per task
    zero_shot_points: List[str] = field(default_factory=lambda: ["center"])  # grid points that run them; [] none

    @classmethod
    def from_dict(cls, data: Optional[dict], where: str = "study.measure") -> "StudySettings":
        data = data or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RetconvertError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        settings = cls(**data)
        if any(not isinstance(c, int) or c <= 0 for c in settings.contexts):
            raise RetconvertError(f"{where}.contexts must be positive integers (tokens), e.g. [16, 256]")
        for name in ("decode_steps", "ppl_tokens", "ppl_batch_size", "position_docs", "energy_context",
                     "energy_steps", "energy_repeats"):
            if not isinstance(getattr(settings, name), int) or getattr(settings, name) <= 0:
                raise RetconvertError(f"{where}.{name} must be a positive integer")
        if not settings.assumed_watts or settings.assumed_watts <= 0:
            raise RetconvertError(f"{where}.assumed_watts must be positive (watts)")
        unknown_tasks = [t for t in settings.zero_shot_tasks if t not in CHANCE]
        if unknown_tasks:
            raise RetconvertError(f"{where}.zero_shot_tasks: no chance level known for {unknown_tasks[0]}; "
                                  f"use {', '.join(CHANCE)}")
        return settings


# --------------------------------------------------------------------------------------------
# Measuring one trained model
# --------------------------------------------------------------------------------------------


def measure(folder: Path, settings: StudySettings, seq_len: int, zero_shot: bool, log=print) -> dict:
    """Everything the study records about the model saved in `folder` (a `final/` export).

    Returns {"params", "params_embedding", "ppl_c4", "ppl_wikitext2", "position_loss", "decode",
    "memory", "energy", "zero_shot"?}; latencies in ms, memory in bytes, energy in J/token.
    """
    from retconvert.eval.common import free_memory
    from retconvert.eval.models import load_model
    from retconvert.eval.quality import perplexities
    from retconvert.eval.longrange import position_loss

    m = load_model(str(folder), "student")
    embedding = m.model.get_input_embeddings().weight.numel()
    out = {"params": m.params, "params_embedding": embedding, "params_non_embedding": m.params - embedding}
    ppl = perplexities(m, settings.ppl_tokens, seq_len, seq_len // 2, settings.ppl_batch_size, log=log)
    out.update({f"ppl_{k}": v["ppl"] for k, v in ppl.items()})
    out["position_loss"] = position_loss(m, seq_len, settings.position_docs, log=log)["buckets"]
    if settings.contexts:
        out.update(_speed(m, settings))
    if zero_shot and settings.zero_shot_tasks:
        out["zero_shot"] = _zero_shot(m, settings, log)
    free_memory(m.device)
    return out


def _speed(m, settings: StudySettings) -> dict:
    """Decode latency and cache memory versus context, and the decode energy (eval/speed.py)."""
    from retconvert.eval.energy import find_meter
    from retconvert.eval.speed import decode_curve, energy_run, memory_curve

    dec = decode_curve([m], settings.contexts, [1], settings.decode_steps, settings.decode_warmup)
    decode = {"module": [{"context_tokens": p["context_tokens"], "latency_ms": p["latency_ms"]}
                         for p in dec["curves"][m.name]]}
    if m.name in dec["packed"]:
        decode["packed"] = [{"context_tokens": p["context_tokens"], "latency_ms": p["latency_ms"]}
                            for p in dec["packed"][m.name]]
    mem = memory_curve([m], settings.contexts)
    memory = [{"context_tokens": p["context_tokens"], "cache_bytes": p["cache_bytes"]} for p in mem["curves"][m.name]]
    meter, about = find_meter(m.device)
    energy = energy_run([m], meter, settings.energy_context, 1, settings.energy_steps, settings.energy_repeats,
                        settings.assumed_watts)[m.name]
    if meter is None:
        energy["reason_not_measured"] = about
    return {"decode": decode, "memory": memory, "energy": energy}


def _zero_shot(m, settings: StudySettings, log) -> Dict[str, dict]:
    """{task: {"acc", "n", "chance", "z"}}: z is (acc - chance) / its binomial standard error."""
    from retconvert.eval.lm_tasks import task_setup, zero_shot
    from retconvert.paths import shared_data_dir

    data = shared_data_dir() if shared_data_dir().is_dir() else None
    with task_setup(settings.zero_shot_tasks, data) as setup:
        res = zero_shot(m.model, m.tokenizer, settings.zero_shot_tasks, setup, limit=settings.zero_shot_limit,
                        max_length=m.max_context, log=log)
    out = {}
    for task, r in res.items():
        chance, n = CHANCE[task], max(r["n"], 1)
        out[task] = {"acc": r["acc"], "n": r["n"], "chance": chance,
                     "z": (r["acc"] - chance) / binomial_stderr(chance, n)}
    return out


def loss_curve(metrics_file: Path, train_s: float) -> List[List[float]]:
    """[[training seconds, tokens seen, loss], ...] from a run's metrics.jsonl `train` records.

    The records' `elapsed_s` counts from the run's start (setup included); the last record
    closes the training loop, which took `train_s`, so t = train_s - (last elapsed - elapsed)."""
    from retconvert.distill.metrics import read_metrics

    recs = read_metrics(metrics_file)
    if not recs:
        return []
    end = recs[-1]["elapsed_s"]
    return [[round(max(train_s - (end - r["elapsed_s"]), 0.0), 3), r["tokens_seen"], r["loss"]] for r in recs]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

SHORT = {"stage2.lr": "lr", "model.scratch.hidden_size": "embedding", "model.scratch.intermediate_size": "ffn",
         "model.scratch.num_heads": "heads", "data.seq_len": "seq_len"}


def _mean_sd(values: List[float]) -> tuple:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _fmt(mean, sd, n, digits=3) -> str:
    """"mean ± sd"; digits=None: whole numbers with thousands separators."""
    if mean is None:
        return "-"
    text = f"{mean:,.0f} ± {sd:,.0f}" if digits is None else f"{mean:.{digits}g} ± {sd:.2g}"
    return text + ("" if n > 1 else " (1 seed)")


def latency_at(row: dict, engine: str, context: int) -> Optional[float]:
    for p in (row.get("decode") or {}).get(engine, []):
        if p["context_tokens"] == context:
            return p["latency_ms"]
    return None


def fast_tokens_per_s(row: dict, quantile: float = 0.9) -> Optional[float]:
    """Training throughput with contention from other processes mostly excluded: the `quantile`
    of the tokens/s over the intervals between a run's loss records (tokens per wall second)."""
    curve = row.get("loss_curve") or []
    rates = sorted((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(curve, curve[1:]) if b[0] > a[0])
    if not rates:
        return None
    return rates[min(len(rates) - 1, int(quantile * len(rates)))]


def decode_growth(row: dict, engine: str = "module") -> Optional[float]:
    """Relative change of decode latency from the shortest to the longest context measured."""
    pts = (row.get("decode") or {}).get(engine) or []
    if len(pts) < 2:
        return None
    pts = sorted(pts, key=lambda p: p["context_tokens"])
    return pts[-1]["latency_ms"] / pts[0]["latency_ms"] - 1


def late_gain(row: dict) -> Optional[float]:
    """Loss at positions 16-31 minus loss in the last position bucket (nats): how much a model
    gains from the context it has read; larger means it uses longer-range dependencies."""
    buckets = row.get("position_loss") or []
    early = next((b["nll"] for b in buckets if b["start_position"] == 16), None)
    if early is None or len(buckets) < 2:
        return None
    return early - buckets[-1]["nll"]


def groups(rows: List[dict]) -> Dict[tuple, List[dict]]:
    """Rows by (point, arch, equal_params), seeds together, in the sweep's order."""
    out = defaultdict(list)
    for r in rows:
        out[(r["point"], r["arch"], bool(r.get("equal_params")))].append(r)
    return out


def metric(rows: List[dict], key) -> tuple:
    return _mean_sd([key(r) if callable(key) else r.get(key) for r in rows])


def findings(rows: List[dict], contexts: List[int]) -> List[dict]:
    """Each of the original study's findings against these rows: {"claim", "here", "verdict"}."""
    by_arch = {a: [r for r in rows if r["arch"] == a and not r.get("equal_params")] for a in ("retnet", "llama")}
    ret, tra = by_arch["retnet"], by_arch["llama"]
    out = []
    if not ret or not tra:
        return out
    pairs = _pairs(rows)

    wall = _mean_sd([p["retnet"]["train_s"] / p["llama"]["train_s"] for p in pairs])
    fast = _mean_sd([fast_tokens_per_s(p["llama"]) / fast_tokens_per_s(p["retnet"]) for p in pairs
                     if fast_tokens_per_s(p["llama"]) and fast_tokens_per_s(p["retnet"])])
    ratio = fast if fast[0] is not None else wall
    sign = _sign(ratio, 1.0)
    margin = 2 * ratio[1] / math.sqrt(ratio[2]) if ratio[2] > 1 else math.inf
    verdict = ("holds (RetNet faster)" if sign < 0 else "does not hold (RetNet slower)" if sign > 0 else
               "does not hold (no clear difference; 0.8 lies outside the 2-standard-error range)"
               if ratio[0] - margin > 0.8 else "inconclusive")
    out.append({"claim": STUDY_CLAIMS["train_time"], "verdict": verdict,
                "here": f"RetNet / Transformer training time on the same tokens, paired by point and seed "
                        f"(mean ± sd over {ratio[2]} pairs): {fast[0] or math.nan:.2f} ± {fast[1] or 0:.2f} from "
                        f"each run's least-contended throughput (90th percentile over its logging intervals); "
                        f"{wall[0]:.2f} ± {wall[1]:.2f} from whole wall times"})

    lr_, lt_ = metric(ret, "final_loss_avg"), metric(tra, "final_loss_avg")
    gap = _mean_sd([p["retnet"]["final_loss_avg"] - p["llama"]["final_loss_avg"] for p in pairs])
    g, gsd, gn = gap
    verdict = {1: "holds in direction (Transformer lower)", -1: "does not hold (RetNet lower)",
               0: "no clear gap"}[_sign(gap)]
    verdict += "; the size of the study's gap (6.5 nats) is not reproduced" if abs(g) < 3 else ""
    out.append({"claim": STUDY_CLAIMS["loss"], "verdict": verdict,
                "here": f"average final training loss RetNet {lr_[0]:.3f}, Transformer {lt_[0]:.3f} "
                        f"({len(ret)} and {len(tra)} runs); paired gap RetNet - Transformer "
                        f"{g:+.3f} ± {gsd:.3f} nats"})

    best = {}
    for arch, rs in by_arch.items():
        g_ = groups(rs)
        key = min(g_, key=lambda k: metric(g_[k], "ppl_c4")[0])
        best[arch] = (key[0], metric(g_[key], "ppl_c4"))
    out.append({"claim": STUDY_CLAIMS["best"], "verdict": "not comparable at this scale (grid values differ); "
                "best points listed",
                "here": "; ".join(f"best {'RetNet' if a == 'retnet' else 'Transformer'} by held-out C4 perplexity: "
                                  f"{p} ({s[0]:.1f})" for a, (p, s) in best.items())})

    lo, hi = min(contexts), max(contexts)

    def growth(rs, engine="module"):  # mean latency at the longest context over that at the shortest
        a, b = metric(rs, lambda r: latency_at(r, engine, lo))[0], metric(rs, lambda r: latency_at(r, engine, hi))[0]
        return None if a is None or b is None else b / a - 1

    rg, tg, pg = growth(ret), growth(tra), growth(ret, "packed")
    flat = rg is not None and abs(rg) <= 0.05
    grows = tg is not None and tg > 0.05
    out.append({"claim": STUDY_CLAIMS["decode_flat"],
                "verdict": "holds" if flat and grows else
                ("partly (RetNet flat, Transformer not growing)" if flat else
                 "partly (Transformer growing, RetNet not flat)" if grows else "does not hold"),
                "here": f"mean decode latency at {hi} over that at {lo} tokens of context, all runs: RetNet "
                        f"{_pct(rg)} (per run {_pct(metric(ret, decode_growth))}), its packed decoder {_pct(pg)}, "
                        f"Transformer {_pct(tg)} (per run {_pct(metric(tra, decode_growth))})"})

    lg = [late_gain(p["retnet"]) - late_gain(p["llama"]) for p in pairs
          if late_gain(p["retnet"]) is not None and late_gain(p["llama"]) is not None]
    diff = _mean_sd(lg)
    rgain, tgain = metric(ret, late_gain), metric(tra, late_gain)
    verdict = ("inconclusive" if diff[0] is None else
               {-1: "holds (RetNet gains less from context)", 1: "does not hold (RetNet gains more)",
                0: "no clear difference"}[_sign(diff)])
    out.append({"claim": STUDY_CLAIMS["long_range"], "verdict": verdict,
                "here": f"loss drop from positions 16-31 to the last positions of a training-length row "
                        f"(held-out C4): RetNet {_num(rgain)} nats, Transformer {_num(tgain)} nats; paired "
                        f"difference {_num(diff)} over {diff[2]} pairs"})
    return out


def _sign(stat, against: float = 0.0) -> int:
    """+1 / -1 when a mean over >= 2 values is more than 2 standard errors above / below
    `against`, else 0."""
    m, sd, n = stat
    if m is None or n < 2:
        return 0
    margin = 2 * sd / math.sqrt(n)
    return 1 if m - margin > against else -1 if m + margin < against else 0


def _pct(stat) -> str:
    """"+x.x%" of a value, or "+x.x% ± y.y" of a (mean, sd, n)."""
    if not isinstance(stat, tuple):
        return "-" if stat is None else f"{100 * stat:+.1f}%"
    m, sd, n = stat
    return "-" if m is None else f"{100 * m:+.1f}% ± {100 * sd:.1f}"


def _num(stat) -> str:
    m, sd, n = stat
    return "-" if m is None else f"{m:+.3f} ± {sd:.3f}"


def _pairs(rows: List[dict]) -> List[Dict[str, dict]]:
    """{"retnet": row, "llama": row} for each (point, seed) trained as both (equal-params rows apart)."""
    by = defaultdict(dict)
    for r in rows:
        if not r.get("equal_params"):
            by[(r["point"], r["seed"])][r["arch"]] = r
    return [p for p in by.values() if len(p) == 2]


ARCH = {"retnet": "RetNet", "llama": "Transformer", "llama-equal": "Transformer (equal params)"}


def summary_table(rows: List[dict]) -> str:
    """Mean ± sd over seeds per (point, architecture)."""
    cols = [("params", "params", None), ("tokens", "tokens", None), ("final loss", "final_loss_avg", 4),
            ("C4 ppl", "ppl_c4", 4), ("WikiText-2 ppl", "ppl_wikitext2", 4), ("train s", "train_s", 3),
            ("train tok/s", "train_tokens_per_s", 3), ("p90 tok/s", fast_tokens_per_s, 3)]
    head = "| point | arch | seeds | " + " | ".join(c[0] for c in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for (point, arch, equal), rs in groups(rows).items():
        name = ARCH[arch] + (" (equal params)" if equal else "")
        cells = [_fmt(*metric(rs, key), digits=d) for _, key, d in cols]
        lines.append(f"| {point} | {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def equal_params_table(rows: List[dict]) -> str:
    """The centre's RetNet against both Transformers, and the paired loss gaps per seed."""
    center = [r for r in rows if r["point"] == "center"]
    kinds = {"RetNet": [r for r in center if r["arch"] == "retnet"],
             "Transformer": [r for r in center if r["arch"] == "llama" and not r.get("equal_params")],
             "Transformer, equal params": [r for r in center if r.get("equal_params")]}
    if not all(kinds.values()):
        return "No equal-parameter pairing in these runs.\n"
    lines = ["| model | ffn | params | final loss | C4 ppl | train s |", "|---|---|---|---|---|---|"]
    for name, rs in kinds.items():
        lines.append(f"| {name} | {rs[0]['model.scratch.intermediate_size']} | {_fmt(*metric(rs, 'params'), None)} | "
                     f"{_fmt(*metric(rs, 'final_loss_avg'))} | {_fmt(*metric(rs, 'ppl_c4'))} | "
                     f"{_fmt(*metric(rs, 'train_s'))} |")
    by_seed = {r["seed"]: r for r in kinds["RetNet"]}
    gaps = {name: [by_seed[r["seed"]]["final_loss_avg"] - r["final_loss_avg"] for r in rs if r["seed"] in by_seed]
            for name, rs in kinds.items() if name != "RetNet"}
    lines += ["", "Paired by seed, RetNet loss minus Transformer loss: " + "; ".join(
        f"{name} {_num(_mean_sd(g))} nats ({len(g)} seeds)" for name, g in gaps.items()) + "."]
    return "\n".join(lines) + "\n"


def speed_table(rows: List[dict], contexts: List[int]) -> str:
    """Decode latency (ms/token, batch 1) and cache bytes per context, mean ± sd over the rows of
    each architecture (equal-parameter rows left out)."""
    rows = [r for r in rows if not r.get("equal_params")]
    lines = ["| arch | engine | " + " | ".join(f"{c} tok: ms" for c in contexts) + " | "
             + " | ".join(f"{c} tok: cache bytes" for c in contexts) + " |", "|" + "---|" * (2 + 2 * len(contexts))]
    for arch in ("retnet", "llama"):
        rs = [r for r in rows if r["arch"] == arch and r.get("decode")]
        for engine in ("module", "packed") if arch == "retnet" else ("module",):
            lat = [_fmt(*metric(rs, lambda r: latency_at(r, engine, c))) for c in contexts]
            mem = [_fmt(*metric(rs, lambda r: _cache(r, c)), None) if engine == "module" else "" for c in contexts]
            lines.append(f"| {ARCH[arch]} | {engine} | " + " | ".join(lat) + " | " + " | ".join(mem) + " |")
    return "\n".join(lines) + "\n"


def _cache(row: dict, context: int) -> Optional[float]:
    return next((p["cache_bytes"] for p in row.get("memory") or [] if p["context_tokens"] == context), None)


def energy_table(rows: List[dict]) -> str:
    lines = ["| arch | decode J/token (ESTIMATE) | training J (ESTIMATE) | basis |", "|---|---|---|---|"]
    for arch in ("retnet", "llama"):
        rs = [r for r in rows if r["arch"] == arch and r.get("energy")]
        if not rs:
            continue
        e = rs[0]["energy"]
        basis = (f"measured, {e['counter']}" if e.get("status") == "measured" else e.get("method", ""))
        lines.append(f"| {ARCH[arch]} | {_fmt(*metric(rs, lambda r: _joules(r)))} | "
                     f"{_fmt(*metric(rs, 'train_energy_estimate_j'))} | {basis} |")
    return "\n".join(lines) + "\n"


def _joules(row) -> Optional[float]:
    e = row.get("energy") or {}
    return e.get("joules_per_token", e.get("estimated_joules_per_token"))


def zero_shot_table(rows: List[dict], z: float = 1.645) -> str:
    """Tasks where a group's mean accuracy is above chance (one-sided z over the pooled examples)."""
    lines = []
    for (point, arch, equal), rs in groups(rows).items():
        for task in sorted({t for r in rs for t in (r.get("zero_shot") or {})}):
            res = [r["zero_shot"][task] for r in rs if task in (r.get("zero_shot") or {})]
            n = sum(x["n"] for x in res)
            acc = sum(x["acc"] * x["n"] for x in res) / max(n, 1)
            chance = res[0]["chance"]
            score = (acc - chance) / math.sqrt(chance * (1 - chance) / max(n, 1))
            lines.append((point, arch + ("-equal" if equal else ""), task, acc, chance, n, score))
    if not lines:
        return "No zero-shot task was run.\n"
    above = [x for x in lines if x[6] > z]
    text = (f"Zero-shot tasks ({', '.join(sorted({x[2] for x in lines}))}) ran at "
            f"{', '.join(sorted({x[0] for x in lines}))}; a task is reported where accuracy over the pooled "
            f"seeds is above chance by a one-sided z > {z} (p < 0.05).\n\n")
    if not above:
        return text + ("None is above chance: " + "; ".join(f"{ARCH[a]} {t} {acc:.3f} (chance {c:.2f}, n={n})"
                                                         for _, a, t, acc, c, n, _ in lines) + ".\n")
    return text + "| point | arch | task | acc | chance | n | z |\n|---|---|---|---|---|---|---|\n" + "".join(
        f"| {p} | {ARCH[a]} | {t} | {acc:.3f} | {c:.2f} | {n} | {s:.1f} |\n" for p, a, t, acc, c, n, s in above)


def write_plots(rows: List[dict], folder: Path) -> List[str]:
    """loss_vs_time.png and decode_vs_context.png; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"retnet": "tab:blue", "llama": "tab:orange"}
    written = []
    center = [r for r in rows if r["point"] == "center" and r.get("loss_curve")]
    if center:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
        seen = set()
        for r in center:
            t, tokens, loss = zip(*r["loss_curve"])
            label = ARCH[r["arch"]] + (" (equal params)" if r.get("equal_params") else "")
            for ax, x in zip(axes, (t, tokens)):
                ax.plot(x, loss, color=colors[r["arch"]], ls="--" if r.get("equal_params") else "-", alpha=0.8,
                        label=None if label in seen else label)
            seen.add(label)
        axes[0].set(xlabel="training wall time (s, one niced thread on a shared machine)",
                    ylabel="training loss (nats/token)", title="Loss vs wall time, centre point, every seed")
        axes[1].set(xlabel="training tokens", title="Loss vs tokens, centre point, every seed")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(folder / "loss_vs_time.png", dpi=110)
        plt.close(fig)
        written.append("loss_vs_time.png")
    with_decode = [r for r in rows if r.get("decode") and r["point"] == "center" and not r.get("equal_params")]
    if with_decode:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for arch, engine, style in (("retnet", "module", "-"), ("retnet", "packed", ":"), ("llama", "module", "-")):
            rs = [r for r in with_decode if r["arch"] == arch and engine in r["decode"]]
            ctx = sorted({p["context_tokens"] for r in rs for p in r["decode"][engine]})
            if not ctx:
                continue
            stats = [metric(rs, lambda r, c=c: latency_at(r, engine, c)) for c in ctx]
            ax.errorbar(ctx, [s[0] for s in stats], yerr=[s[1] for s in stats], color=colors[arch], ls=style,
                        marker="o", capsize=3, label=ARCH[arch] + (" (packed decoder)" if engine == "packed" else ""))
        ax.set(xscale="log", xlabel="context (tokens in the state/cache)", ylabel="decode latency (ms/token, batch 1)",
               title="Decode latency vs context, centre point, mean ± sd over seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "decode_vs_context.png", dpi=110)
        plt.close(fig)
        written.append("decode_vs_context.png")
    return written


def write_report(rows: List[dict], folder: Path, spec: dict) -> Path:
    """report.md (and its plots) in `folder` from the sweep's rows; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise RetconvertError(f"no finished run in {folder}/results.json; nothing to report")
    study = spec.get("study") or {}
    settings = StudySettings.from_dict(study.get("measure"))
    plots = write_plots(rows, folder)
    seeds = sorted({r["seed"] for r in rows})
    points = list(dict.fromkeys(r["point"] for r in rows))
    planned = spec.get("_planned_runs")
    lines = [
        "# RetNet vs Transformer from scratch: the study at CPU scale",
        "",
        f"{len(rows)} runs" + (f" of {planned} planned" if planned else "") + f"; seeds {seeds}; "
        f"points: {', '.join(points)}. Machine: {rows[0].get('machine', '?')}. "
        f"Dates: {min(r['date_utc'] for r in rows)} to {max(r['date_utc'] for r in rows)}.",
        "",
        "## Design",
        "",
        _design(rows, {**study, "_grid": spec.get("grid")}),
        "",
        "## Findings of the original study, claim by claim",
        "",
        "| claim (original study) | here | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {f['claim']} | {f['here']} | {f['verdict']} |" for f in findings(rows, settings.contexts)]
    lines += ["", "Verdict rules: a paired mean counts as different from 0 (or a ratio from 1) when it is "
              "more than 2 standard errors away (at least 2 pairs); decode is flat when the change is within "
              "5%. Times are wall times of one niced thread on a shared, loaded machine: both architectures of "
              "a pair ran back to back, but contention varies from minute to minute.", "",
              "## Every point, mean ± sd over seeds", "",
              "`final loss` is the mean training loss over the last 10% of steps; perplexities are on "
              "held-out C4 and WikiText-2 (sliding window of the run's sequence length, stride half of it); "
              "`train s` is the training loop's wall time, `train tok/s` its throughput, `p90 tok/s` the 90th "
              "percentile of the throughput over its logging intervals (the least-contended speed: the "
              "machine is shared).", "",
              summary_table(rows), "## At equal parameter count", "",
              "The RetNet's retention adds a d x d output gate per layer, so at the same grid point it has "
              "more parameters than the Transformer; the equal-parameter Transformer widens its FFN to the "
              "RetNet's count (nearest FFN size, parameters counted on the built models).", "",
              equal_params_table(rows), "## Decode latency and state/cache memory versus context", "",
              "Batch 1, `retconvert.eval.speed.decode_curve` and `memory_curve`, at the centre point (mean ± "
              "sd over seeds; the decode verdict above uses every run); cache bytes are the RetNet recurrent "
              "state or the Transformer's KV cache after the prompt. `module` is a transformers forward per "
              "token with the cache; `packed` is the RetNet's packed decoder (models/decoding_retnet.py).", "",
              speed_table([r for r in rows if r["point"] == "center"], settings.contexts)]
    lines += [f"![decode latency vs context]({p})" for p in plots if p.startswith("decode")]
    lines += ["", "## Loss versus wall time", ""] + [f"![loss vs time]({p})" for p in plots if p.startswith("loss")]
    lines += ["", "## Energy (ESTIMATES)", "",
              "No energy counter is readable on this machine, so the eval suite's estimate is reported: elapsed "
              "time x an assumed power; it carries no information beyond the timings it is computed from.", "",
              energy_table(rows), "## Zero-shot tasks", "", zero_shot_table(rows)]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _design(rows: List[dict], study: dict) -> str:
    center = study.get("center") or {}
    parts = [f"{SHORT.get(k, k)} {v}" + (f" (centre {center[k]})" if k in center else "")
             for k, v in (study.get("_grid") or {}).items()]
    r0 = rows[0]
    return (f"Design: {study.get('design', 'product')}; every point trained as both architectures on the same "
            f"tokens (same seed, same data order), seeds {study.get('seeds')}. Dimensions: "
            + "; ".join(parts) + ". "
            f"{r0.get('num_layers', '?')} layers; {r0['tokens']:,} training tokens per run "
            f"({r0.get('tokens_per_step', '?')} per step). The RetNet's retention has q, k, v, an output gate "
            "and o (5 d^2 per layer against attention's 4 d^2), so at a point it has more parameters; the "
            "'equal params' Transformer at the centre has its FFN widened to the RetNet's parameter count.")
