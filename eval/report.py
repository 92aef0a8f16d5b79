"""report.md (side-by-side tables with ratios) and PNG plots from a results dict."""

from pathlib import Path
from typing import List

from retconvert.eval.lm_tasks import CHANCE, binomial_stderr
from retconvert.eval.measure import fmt_bytes


def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, tuple):  # (value, standard error)
        value, se = x
        return _fmt(value, digits) if se is None else f"{value:.3f} ± {se:.3f}"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _ratio(a, b) -> str:
    if isinstance(b, tuple) and b[1] is not None and abs(b[0]) < 2 * b[1]:
        return "-"  # the denominator is within two standard errors of zero (a teacher near chance)
    a, b = (x[0] if isinstance(x, tuple) else x for x in (a, b))
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.3g}x"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _table(models, rows, fmt=_fmt) -> List[str]:
    """rows: [(label, fn(model entry) -> value)]; one column per model, then each other model's ratio
    to the teacher (the first)."""
    head = ["metric"] + [f"{m['role']}: {m['label']}" for m in models] + \
           [f"ratio {m['label']} / teacher" for m in models[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, fn in rows:
        values = [fn(m) for m in models]
        if all(v is None for v in values):
            continue
        cells = [label] + [fmt(v) for v in values] + [_ratio(v, values[0]) for v in values[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def _points(m, suite, part, key="points"):
    return _get(m, "results", suite, part, key) or []


def _find(points, **match):
    for p in points:
        if all(p.get(k) == v for k, v in match.items()):
            return p
    return None


def write_report(results: dict, plots: List[str]) -> str:
    models, settings, machine = results["models"], results["settings"], results["machine"]
    out = ["# retconvert eval report", ""]
    out += ["| model | role | parameters | architecture | max context (tokens) | kind |", "|---|---|---|---|---|---|"]
    for m in models:
        out.append(f"| {m['name']} | {m['role']} | {m['params']:,} | {m['architecture']} | "
                   f"{m['max_context_tokens'] or '-'} | {m['kind']} |")
    out += ["", f"Machine: {machine.get('cpu') or '?'} ({machine.get('cpu_count')} cores"
            + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + f"), device `{machine['device']}`, "
            f"torch {machine['torch']}, transformers {machine['transformers']}, lm-eval {machine.get('lm_eval')}; "
            f"{machine['date_utc']}.",
            "Ratios are model / teacher (below 1 means the model uses less, or scores lower); a baseline row, "
            "if any, is the teacher restricted to a window (`--window-baseline`).", ""]

    # Quality
    q_rows = []
    for name in ("c4", "wikitext2"):
        q_rows.append((f"perplexity {name}", lambda m, n=name: _get(m, "results", "quality", "perplexity", n, "ppl")))
    tasks = []
    for m in models:
        for t in (_get(m, "results", "quality", "zero_shot") or {}):
            if t not in tasks:
                tasks.append(t)
    def paired_difference(m, teacher, t):  # (mean of student - teacher per example, its standard error)
        a, b = (_get(x, "results", "quality", "zero_shot", t) or {} for x in (m, teacher))
        if m is teacher or not a.get("correct") or a.get("doc_ids") != b.get("doc_ids") \
                or len(a["correct"]) != len(b.get("correct") or []):
            return None  # only answers to the same documents pair
        a, b = a["correct"], b["correct"]
        d = [x - y for x, y in zip(a, b)]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
        return mean, (var / len(d)) ** 0.5

    def accuracy(m, t, metric, minus=0.0):  # (accuracy - minus, its binomial standard error), or None
        r = _get(m, "results", "quality", "zero_shot", t) or {}
        return None if r.get(metric) is None else (r[metric] - minus, binomial_stderr(r[metric], r.get("n", 0)))

    for t in tasks:
        for metric in ("acc", "acc_norm"):
            q_rows.append((f"{t} {metric}", lambda m, t=t, k=metric: accuracy(m, t, k)))
        if t in CHANCE:  # its ratio column: the share of the teacher's margin above chance
            q_rows.append((f"{t} acc - chance ({CHANCE[t]:g})",
                           lambda m, t=t: accuracy(m, t, "acc", minus=CHANCE[t])))
        q_rows.append((f"{t} acc - teacher's, paired", lambda m, t=t: paired_difference(m, models[0], t)))
        q_rows.append((f"{t} perplexity", lambda m, t=t: _get(m, "results", "quality", "zero_shot", t, "perplexity")))
    table = _table(models, q_rows)
    if table:
        out += ["## Quality", ""] + table
        tok = _get(models[0], "results", "quality", "perplexity", "c4")
        if tok:
            out.append(f"\nPerplexity: sliding window {tok['window']} tokens, stride {tok['stride']}; "
                       f"{tok['tokens']:,} tokens scored on C4 ({tok['source']}).")
        n = {t: _get(models[0], "results", "quality", "zero_shot", t, "n") for t in tasks}
        if tasks:
            out.append("Zero-shot (lm-eval, 0-shot): examples per task " +
                       ", ".join(f"{t} {v}" for t, v in n.items()) + "; accuracies ± their binomial standard "
                       "error, sqrt(p (1 - p) / n) (every model answers the same examples, so a difference "
                       "between two of them is more certain than their two errors suggest: the `acc - "
                       "teacher's, paired` rows give that difference, per example, ± its standard error). The "
                       "ratio of an `acc - chance` row is the share of the teacher's margin above chance.")
        out.append("")

    # Long range
    lengths = sorted({p["context_tokens"] for m in models for p in _points(m, "longrange", "passkey")})
    rows = [(f"passkey accuracy, {L} tokens", lambda m, L=L: _get(_find(_points(m, "longrange", "passkey"),
                                                                        context_tokens=L), "accuracy"))
            for L in lengths]
    buckets = []
    for m in models:
        for b in _get(m, "results", "longrange", "position_loss", "buckets") or []:
            if (b["start_position"], b["end_position"]) not in buckets:
                buckets.append((b["start_position"], b["end_position"]))
    for lo, hi in buckets:
        rows.append((f"NLL positions {lo}-{hi - 1} (nats)", lambda m, lo=lo: _get(_find(
            _get(m, "results", "longrange", "position_loss", "buckets") or [], start_position=lo), "nll")))
    table = _table(models, rows)
    if table:
        out += ["## Long-range memory", ""] + table + [
            "", "Passkey: a 5-digit key in filler text, question at the end, greedy answer must contain it.", ""]

    # Speed
    rows = []
    for b in settings.get("batch_sizes", []):
        for L in settings.get("contexts", []):
            rows.append((f"decode latency ms, batch {b}, context {L}", lambda m, b=b, L=L: _get(
                _find(_points(m, "speed", "decode"), context_tokens=L, batch_size=b), "latency_ms")))
    for b in settings.get("batch_sizes", []):
        for L in settings.get("contexts", []):
            rows.append((f"decode tokens/s, batch {b}, context {L}", lambda m, b=b, L=L: _get(
                _find(_points(m, "speed", "decode"), context_tokens=L, batch_size=b), "tokens_per_s")))
    if any(_points(m, "speed", "decode_packed") for m in models):
        for b in settings.get("batch_sizes", []):
            for L in settings.get("contexts", []):
                rows.append((f"decode latency ms, packed decoder, batch {b}, context {L}", lambda m, b=b, L=L: _get(
                    _find(_points(m, "speed", "decode_packed"), context_tokens=L, batch_size=b), "latency_ms")))
    for part, extra in (("generate", ""), ("generate_packed", ", packed decoder")):
        if any(_points(m, "speed", part) for m in models):
            for L in settings.get("contexts", []):
                rows.append((f"generate() ms per new token{extra}, context {L}", lambda m, L=L, part=part: _get(
                    _find(_points(m, "speed", part), context_tokens=L), "per_token_ms")))
    modes = []
    for m in models:
        for p in _points(m, "speed", "prefill"):
            if p["mode"] not in modes:
                modes.append(p["mode"])
    for L in settings.get("contexts", []):
        for mode in modes:
            rows.append((f"prefill tokens/s, {mode}, {L} tokens", lambda m, L=L, mode=mode: _get(
                _find(_points(m, "speed", "prefill"), context_tokens=L, mode=mode), "tokens_per_s")))
    table = _table(models, rows)
    if table:
        out += ["## Speed", ""] + table + [
            "", "Decode: teacher with its KV cache, RetNet students recurrent (transformers' call, and the packed "
                "decoder of models/decoding_retnet.py); median per step, models taking turns in blocks of steps. "
                "generate(): greedy, batch 1, as users call it; per new token: the median gap between generated "
                "tokens. Prefill modes: attention (teacher), parallel and chunkwise retention (students).", ""]

    # Memory
    rows = []
    for L in settings.get("contexts", []):
        rows.append((f"cache bytes, context {L}", lambda m, L=L: _get(
            _find(_get(m, "results", "memory", "points") or [], context_tokens=L), "cache_bytes")))
    for L in settings.get("contexts", []):
        rows.append((f"peak RSS bytes, context {L}", lambda m, L=L: _get(
            _find(_get(m, "results", "memory", "points") or [], context_tokens=L), "peak_rss_bytes")))
        rows.append((f"peak GPU bytes, context {L}", lambda m, L=L: _get(
            _find(_get(m, "results", "memory", "points") or [], context_tokens=L), "peak_gpu_allocated_bytes")))
    table = _table(models, rows, fmt=lambda v: fmt_bytes(v) if v is not None else "-")
    if table:
        out += ["## Memory", ""] + table + ["", "Cache: KV tensors (teacher) vs RetNetState (student), batch 1. "
                                            "Peak RSS includes the weights.", ""]

    # Energy
    rows = [("J/token (measured)", lambda m: _get(m, "results", "energy", "joules_per_token")),
            ("J/token (ESTIMATE: time x assumed power)",
             lambda m: _get(m, "results", "energy", "estimated_joules_per_token")),
            ("average W (measured)", lambda m: _get(m, "results", "energy", "average_watts"))]
    table = _table(models, rows)
    if table:
        e = _get(models[0], "results", "energy") or {}
        out += ["## Energy", ""] + table + [""]
        if e.get("status") == "measured":
            out.append(f"Counter: {e['counter']} ({e['scope']}); {e['generated_tokens']} tokens after a "
                       f"{e['context_tokens']}-token prompt, median of {e['repeats']} runs.\n")
        else:
            out.append(f"**Not measured**: {e.get('reason_not_measured', '')}. {e.get('method', '')}.\n")

    if results["skipped"]:
        out += ["## Skipped", "", "| suite | model | reason |", "|---|---|---|"]
        for s in results["skipped"]:
            out.append(f"| {s['suite']} | {s['model'] or 'all'} | {s['reason']} |")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def write_plots(results: dict, folder: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    def label(m, extra=""):
        return f"{m['role']}: {m['label']}" + (f" ({extra})" if extra else "")

    # Decode latency vs context, one panel per batch size.
    batch_sizes = sorted({p["batch_size"] for m in models for p in _points(m, "speed", "decode")})
    if batch_sizes:
        fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4), squeeze=False)
        for ax, b in zip(axes[0], batch_sizes):
            for m in models:
                for part, extra in (("decode", ""), ("decode_packed", "packed decoder")):
                    pts = [p for p in _points(m, "speed", part) if p["batch_size"] == b]
                    if pts:
                        ax.plot([p["context_tokens"] for p in pts], [p["latency_ms"] for p in pts], "o-",
                                label=label(m, extra))
            _axes(ax, f"decode latency, batch {b}", "context (tokens)", "ms per step")
        save(fig, "latency_vs_context.png")

    prefill = [(m, p) for m in models for p in _points(m, "speed", "prefill")]
    if prefill:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in models:
            for mode in dict.fromkeys(p["mode"] for p in _points(m, "speed", "prefill")):
                pts = [p for p in _points(m, "speed", "prefill") if p["mode"] == mode]
                ax.plot([p["context_tokens"] for p in pts], [p["tokens_per_s"] for p in pts], "o-",
                        label=label(m, mode))
        _axes(ax, "prefill throughput, batch 1", "prompt length (tokens)", "tokens / s")
        save(fig, "prefill_vs_length.png")

    mem = [m for m in models if _get(m, "results", "memory", "points")]
    if mem:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for m in mem:
            pts = m["results"]["memory"]["points"]
            axes[0].plot([p["context_tokens"] for p in pts], [p["cache_bytes"] / 2 ** 20 for p in pts], "o-",
                         label=label(m))
            rss = [p for p in pts if "peak_rss_bytes" in p]
            if rss:
                axes[1].plot([p["context_tokens"] for p in rss], [p["peak_rss_bytes"] / 2 ** 20 for p in rss], "o-",
                             label=label(m))
        _axes(axes[0], "decoding cache (KV vs recurrent state)", "context (tokens)", "MiB")
        _axes(axes[1], "process peak RSS", "context (tokens)", "MiB")
        save(fig, "memory_vs_context.png")

    pk = [m for m in models if _points(m, "longrange", "passkey")]
    if pk:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in pk:
            pts = _points(m, "longrange", "passkey")
            ax.plot([p["distance_tokens"] for p in pts], [p["accuracy"] for p in pts], "o-", label=label(m))
        _axes(ax, "passkey retrieval", "distance from key to question (tokens)", "accuracy", ylim=(-0.05, 1.05))
        save(fig, "passkey_accuracy.png")

    pl = [m for m in models if _get(m, "results", "longrange", "position_loss", "buckets")]
    if pl:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in pl:
            b = m["results"]["longrange"]["position_loss"]["buckets"]
            ax.plot([max(1, (x["start_position"] + x["end_position"]) / 2) for x in b], [x["nll"] for x in b], "o-",
                    label=label(m))
        _axes(ax, "loss per position (held-out C4)", "position (tokens)", "mean NLL (nats)", logy=False)
        save(fig, "position_loss.png")
    return written


def _axes(ax, title, xlabel, ylabel, ylim=None, logy=True):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    if logy and ylim is None:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
