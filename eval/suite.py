"""`retconvert eval`: run the suites on a teacher and its students, write results.json, report.md, plots.

    settings = EvalSettings(suites=["quality", "speed"], limit=100)
    run_eval(["smollm2-135m", "outputs/smollm2-135m-retnet"], Path("report"), settings)

The first model is the teacher; ratios in the report are student / teacher. A suite that
cannot run is listed under "skipped" with its reason; no figure is ever made up.
"""

import copy
import json
import math
import traceback
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from retconvert.device import check_device
from retconvert.errors import RetconvertError
from retconvert.eval.common import free_memory, log
from retconvert.eval.measure import machine_info
from retconvert.eval.lm_tasks import DEFAULT_TASKS, check_tasks
from retconvert.paths import atomic_output_dir, check_output_dir, display_path, shared_data_dir

PASSKEY_NEW_TOKENS = 10
SUITES = ("quality", "longrange", "speed", "memory", "energy")
DEFAULT_CONTEXTS = tuple(2 ** i for i in range(7, 14))  # 128 ... 8192


@dataclass
class EvalSettings:
    suites: List[str] = field(default_factory=lambda: list(SUITES))
    limit: Optional[int] = None  # zero-shot examples per task; also documents per perplexity set
    max_context: Optional[int] = None  # cap on every context length (default: the teacher's limit)
    contexts: Optional[List[int]] = None  # context lengths for speed, memory, passkey (default 128..8192)
    batch_sizes: List[int] = field(default_factory=lambda: [1, 16])
    tasks: List[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    zero_shot_batch_size: int = 8
    ppl_tokens: int = 32768  # per perplexity set
    ppl_window: int = 1024
    ppl_stride: int = 512
    ppl_batch_size: int = 4
    passkey_trials: int = 5
    passkey_lengths: Optional[List[int]] = None  # default: the contexts
    position_docs: int = 8  # rows of held-out C4 for the per-position loss
    position_length: Optional[int] = None  # default: the longest context
    decode_steps: int = 32
    decode_warmup: int = 2
    prefill_repeats: int = 3
    prefill_warmup: int = 1
    prefill_budget: Optional[float] = 60.0  # seconds a run of the parallel form may take (predicted); None: no limit
    energy_context: int = 1024
    energy_steps: int = 64
    energy_repeats: int = 3
    assumed_watts: Optional[float] = None
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    window_baseline: Optional[int] = None  # also the teacher over its last W tokens + first token

    def validate(self):
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            raise RetconvertError(f"unknown suite {', '.join(unknown) or '(none)'}; use a comma list of "
                                  f"{', '.join(SUITES)}")
        for name in ("limit", "max_context", "ppl_tokens", "ppl_window", "ppl_stride", "passkey_trials",
                     "position_docs", "decode_steps", "prefill_repeats", "prefill_budget", "energy_steps",
                     "energy_repeats", "window_baseline"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RetconvertError(f"--{name.replace('_', '-')} {value} must be positive")
        for name in ("contexts", "batch_sizes", "passkey_lengths"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) <= 0):
                raise RetconvertError(f"--{name.replace('_', '-')} needs positive integers, e.g. 128,256")
        if self.ppl_window < 2:  # a window scores its tokens after the first: at least one
            raise RetconvertError(f"--ppl-window {self.ppl_window} must be at least 2 (one context token, one scored)")
        if self.assumed_watts is not None and self.assumed_watts <= 0:
            raise RetconvertError("--assumed-watts must be positive")
        check_device(self.device)


def context_limit(teacher, settings: EvalSettings) -> int:
    limits = [x for x in (teacher.max_context, settings.max_context) if x]
    return min(limits) if limits else max(DEFAULT_CONTEXTS)


def context_lengths(teacher, settings: EvalSettings) -> List[int]:
    top = context_limit(teacher, settings)
    wanted = settings.contexts or list(DEFAULT_CONTEXTS)
    kept = sorted({c for c in wanted if c <= top})
    if not kept:
        kept = [top]
    return kept


REPORT_KIND = "an eval report (results.json and report.md)"


def is_eval_report(folder: Path) -> bool:
    """Whether `folder` holds an earlier `run_eval` report: its results.json and report.md."""
    return (Path(folder) / "results.json").is_file() and (Path(folder) / "report.md").is_file()


def run_eval(sources: List[str], out: Path, settings: EvalSettings, force: bool = False) -> dict:
    from retconvert.eval.models import EvalModel, load_model

    settings.validate()
    if len(sources) < 1:
        raise RetconvertError("pass at least one --model (the first is the teacher)")
    check_output_dir(out, force=force, ours=is_eval_report, kind=REPORT_KIND)  # fail before the slow part
    if "quality" in settings.suites and settings.tasks:
        check_tasks(settings.tasks)  # a typo fails here, not as a skipped task after the models ran
    models = []
    for i, source in enumerate(sources):
        role = "teacher" if i == 0 else "student"
        same = next((m for m in models if m.name == source), None)
        if same is not None:  # the same model twice (a sanity check): share the weights
            log(f"{role} {source}: already loaded, shared")
            models.append(EvalModel(source, role, same.model, same.tokenizer, same.kind, list(same.notes)))
            continue
        log(f"loading {role} {source}")
        models.append(load_model(source, role, dtype=settings.dtype, device=settings.device,
                                 trust_remote_code=settings.trust_remote_code, allow_pickle=settings.allow_pickle,
                                 fallback_tokenizer=models[0].tokenizer if models else None))
    sources = list(sources)
    if settings.window_baseline:  # beside the teacher: what the window alone buys, nothing trained
        from retconvert.eval.window_baseline import apply_window_baseline

        W, teacher = settings.window_baseline, models[0]
        log(f"window baseline: {teacher.name} over its last {W} tokens and its first token (a second copy "
            "of the teacher's weights in memory)")
        baseline = copy.deepcopy(teacher.model)
        apply_window_baseline(baseline, W)
        models.insert(1, EvalModel(f"{teacher.name} (window {W} + first token)", "baseline", baseline,
                                   teacher.tokenizer, teacher.kind,
                                   [f"the teacher's weights, attention restricted to its last {W} tokens and its "
                                    "row's first token (retconvert.eval.window_baseline)"]))
        sources.insert(1, sources[0])
    names = [m.name for m in models]
    if len(set(names)) != len(names):  # the same model twice: keep the entries apart
        for i, m in enumerate(models):
            m.name = f"{m.name} ({m.role} {i})" if names.count(m.name) > 1 else m.name

    contexts = context_lengths(models[0], settings)
    limit = context_limit(models[0], settings)
    resolved = {**asdict(settings), "contexts": contexts,
                # the answer's tokens must fit too
                "passkey_lengths": sorted({min(c, limit - PASSKEY_NEW_TOKENS)
                                           for c in (settings.passkey_lengths or contexts)}),
                "position_length": min(settings.position_length or max(contexts), limit),
                "energy_context": min(settings.energy_context, limit),
                "context_limit": limit,
                "data_dir_found": shared_data_dir().is_dir()}
    results = {
        "machine": machine_info(settings.device),
        "settings": resolved,
        "models": [{"name": display_path(m.name), "label": _label(m, models), "source": display_path(sources[i]),
                    "role": m.role,
                    "kind": m.kind, "params": m.params, "architecture": type(m.model).__name__,
                    "is_retnet": m.is_retnet,
                    "max_context_tokens": m.max_context, "retention_mode": m.retention_mode,
                    "dtype": settings.dtype, "notes": m.notes, "results": {}} for i, m in enumerate(models)],
        "skipped": [],
    }
    entry = {m.name: e for m, e in zip(models, results["models"])}
    skipped = results["skipped"]

    def skip(suite, model, reason):
        log(f"skipped {suite}" + (f" for {model}" if model else "") + f": {reason}")
        skipped.append({"suite": suite, "model": model, "reason": reason})

    def guarded(suite, model_name, fn):
        try:
            return fn()
        except RetconvertError as e:
            skip(suite, model_name, str(e))
        except Exception as e:  # recorded, never turned into a number
            log(traceback.format_exc())
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            skip(suite, model_name, f"failed: {type(e).__name__}: {first}")
        finally:
            free_memory(settings.device)
        return None

    # The window baseline masks the teacher's full KV cache: its speed and memory are the teacher's.
    costed = [m for m in models if m.role != "baseline"]
    cost_suites = [s for s in settings.suites if s in ("speed", "memory", "energy")]
    for m in models:
        if m.role == "baseline" and cost_suites:
            skip(", ".join(cost_suites), m.name, "a quality reference only: it runs the teacher's attention "
                 "and full KV cache under a mask, so its cost is the teacher's")
    for suite in settings.suites:
        log(f"suite {suite}")
        if suite == "quality":
            _quality(models, entry, resolved, settings, guarded, skip)
        elif suite == "longrange":
            _longrange(models, entry, resolved, settings, guarded)
        elif suite == "speed":
            _speed(costed, entry, resolved, settings, guarded)
        elif suite == "memory":
            _memory(costed, entry, resolved, guarded, skip)
        elif suite == "energy":
            _energy(costed, entry, resolved, settings, guarded, skip)

    for where in _non_finite(results["models"], "models"):
        skip("values", None, f"{where} was not finite; written as null")
    from retconvert.eval.report import write_plots, write_report

    with atomic_output_dir(Path(out), force=force, ours=is_eval_report, kind=REPORT_KIND) as tmp:
        plots = guarded("plots", None, lambda: write_plots(results, tmp)) or []
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (tmp / "report.md").write_text(write_report(results, plots))
    log(f"wrote {out}/results.json, report.md and {len(plots)} plot(s)")
    return results


def _label(m, models) -> str:
    """A short name for tables and legends: the folder or file name, unless two models share it."""
    short = Path(m.name).name if m.kind in ("folder", "gguf") else m.name
    others = [Path(o.name).name if o.kind in ("folder", "gguf") else o.name for o in models if o is not m]
    return m.name if short in others else short


def _quality(models, entry, resolved, settings, guarded, skip):
    from retconvert.eval.lm_tasks import task_setup, zero_shot
    from retconvert.eval.quality import perplexities

    for m in models:
        window = min(settings.ppl_window, m.max_context or settings.ppl_window)
        ppl = guarded("quality.perplexity", m.name, lambda: perplexities(
            m, settings.ppl_tokens, window, min(settings.ppl_stride, window), settings.ppl_batch_size,
            max_docs=settings.limit, log=log))
        if ppl is not None:
            entry[m.name]["results"].setdefault("quality", {})["perplexity"] = ppl
    if not settings.tasks:
        return
    data_dir = shared_data_dir() if shared_data_dir().is_dir() else None
    with ExitStack() as stack:
        setup = guarded("quality.zero_shot", None, lambda: stack.enter_context(task_setup(settings.tasks, data_dir)))
        if setup is None:
            return
        for m in models:
            zs = guarded("quality.zero_shot", m.name, lambda: zero_shot(
                m.model, m.tokenizer, settings.tasks, setup, limit=settings.limit,
                batch_size=settings.zero_shot_batch_size, max_length=m.max_context, log=log))
            if zs is not None:
                entry[m.name]["results"].setdefault("quality", {})["zero_shot"] = zs


def _longrange(models, entry, resolved, settings, guarded):
    from retconvert.eval.longrange import passkey, position_loss

    for m in models:
        res = {}
        saved = m.retention_mode
        m.set_retention_mode("chunkwise")  # long prompts: the memory-light form (same numbers)
        try:
            pk = guarded("longrange.passkey", m.name, lambda: passkey(
                m, resolved["passkey_lengths"], settings.passkey_trials, new_tokens=PASSKEY_NEW_TOKENS, log=log))
            if pk is not None:
                res["passkey"] = pk
            pl = guarded("longrange.position_loss", m.name, lambda: position_loss(
                m, resolved["position_length"], settings.position_docs, log=log))
            if pl is not None:
                res["position_loss"] = pl
        finally:
            m.set_retention_mode(saved)
        if res:
            res["prefill_mode"] = "chunkwise" if m.is_retnet else "attention"
            entry[m.name]["results"]["longrange"] = res


def _speed(models, entry, resolved, settings, guarded):
    from retconvert.eval.speed import decode_curve, generate_curve, prefill_curve

    units = {"latency_ms": "milliseconds per decode step (one token per row)", "tokens_per_s":
             "generated tokens per second over the batch", "context_tokens": "tokens in the cache before timing"}
    dec = guarded("speed.decode", None, lambda: decode_curve(
        models, resolved["contexts"], settings.batch_sizes, settings.decode_steps, settings.decode_warmup))
    gen = guarded("speed.generate", None, lambda: generate_curve(
        models, resolved["contexts"], settings.decode_steps))
    pre = guarded("speed.prefill", None, lambda: prefill_curve(
        models, resolved["contexts"], settings.prefill_repeats, settings.prefill_warmup, settings.prefill_budget))
    for m in models:
        res = {}
        if dec is not None:
            res["decode"] = {"points": dec["curves"][m.name],
                             "skipped_points": [s for s in dec["skipped_points"] if s["model"] == m.name],
                             "method": "recurrent state" if m.is_retnet else "KV cache",
                             "statistic": f"median of {settings.decode_steps} steps in up to 3 blocks, each after "
                                          f"{settings.decode_warmup} warm-up steps, models taking turns by block",
                             "unit": units}
            if m.name in dec["packed"]:
                res["decode_packed"] = {**res["decode"], "points": dec["packed"][m.name],
                                        "method": "recurrent state, packed decoder (models/decoding_retnet.py)"}
        if gen is not None:
            res["generate"] = {"points": gen["generate"][m.name], "method": "model.generate(), greedy, batch 1",
                               "skipped_points": [x for x in gen["skipped_points"] if x["model"] == m.name],
                               "statistic": "median over 3 rounds after a warm-up round, models taking turns",
                               "unit": {"total_ms": "milliseconds per generate() call (prompt pass included)",
                                        "per_token_ms": "milliseconds per decoding step, "
                                                        "median gap between generated tokens"}}
            if m.name in gen["packed"]:
                res["generate_packed"] = {**res["generate"], "points": gen["packed"][m.name],
                                          "method": "the packed decoder's generate(), greedy, batch 1"}
        if pre is not None:
            res["prefill"] = {"points": pre["curves"][m.name],
                              "skipped_points": [s for s in pre["skipped_points"] if s["model"] == m.name],
                              "statistic": f"median of {settings.prefill_repeats} runs after "
                                           f"{settings.prefill_warmup} warm-up, batch 1, models alternating",
                              "unit": {"latency_ms": "milliseconds per prompt",
                                       "tokens_per_s": "prompt tokens per second"}}
        if res:
            entry[m.name]["results"]["speed"] = res


def _memory(models, entry, resolved, guarded, skip):
    from retconvert.eval.speed import memory_curve

    mem = guarded("memory", None, lambda: memory_curve(models, resolved["contexts"]))
    if mem is None:
        return
    for reason in mem["rss_unavailable"]:
        skip("memory.peak_rss", None, reason)
    for m in models:
        entry[m.name]["results"]["memory"] = {
            "points": mem["curves"][m.name],
            "skipped_points": [s for s in mem["skipped_points"] if s["model"] == m.name],
            "cache": "RetNetState.nbytes() (recurrent state)" if m.is_retnet else "sum of KV cache tensor bytes",
            "method": "batch 1: prefill then 8 decode steps; peak RSS is the process high-water mark "
                      "(reset before each point), so it includes the weights",
            "unit": {"cache_bytes": "bytes", "peak_rss_bytes": "bytes", "peak_rss_increase_bytes":
                     "bytes above the resident size before the prefill"}}


def _energy(models, entry, resolved, settings, guarded, skip):
    from retconvert.eval.energy import find_meter
    from retconvert.eval.speed import energy_run

    meter, about = find_meter(settings.device)
    if meter is None and settings.assumed_watts is None:
        skip("energy", None, about + "; pass --assumed-watts W for a clearly labelled time x power estimate")
        return
    if meter is None:
        log(f"energy: {about}; reporting an ESTIMATE from --assumed-watts {settings.assumed_watts}")
    res = guarded("energy", None, lambda: energy_run(
        models, meter, resolved["energy_context"], 1, settings.energy_steps, settings.energy_repeats,
        settings.assumed_watts))
    if res is None:
        return
    for m in models:
        r = res[m.name]
        if meter is None:
            r["reason_not_measured"] = about
        r["unit"] = {"joules_per_token": "joules per generated token", "estimated_joules_per_token":
                     "joules per generated token (estimate)", "seconds": "seconds for all generated tokens",
                     "average_watts": "watts"}
        entry[m.name]["results"]["energy"] = r


def _non_finite(obj, path="results") -> List[str]:
    """Replace NaN/inf by None (JSON has no such numbers; none may pass as measured); return their paths."""
    found = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in list(items):
        where = f"{path}.{k}" if isinstance(obj, dict) else f"{path}[{k}]"
        if isinstance(v, float) and not math.isfinite(v):
            obj[k] = None
            found.append(where)
        else:
            found += _non_finite(v, where)
    return found
