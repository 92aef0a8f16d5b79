"""Publish a converted or distilled RetNet checkpoint on the Hugging Face Hub.

    retconvert push DIR --repo-id USER/NAME [--private] [--revision BRANCH] [--commit-message MSG]
                        [--eval-report REPORT_DIR] [--license ID] [--base-model HUB_ID]
                        [--dry-run [--card-out FILE]]

Before anything leaves the machine the folder is checked (`validate_checkpoint`): a RetNet
`config.json` with `auto_map`, readable safetensors weights (single file or shards + index),
the modeling code that `trust_remote_code` loads, and no pickle files anywhere. The folder's
own README.md is replaced, in the upload only, by a model card rendered from what the folder
records (its provenance record: `config.conversion`, `config.distillation`, see
`retconvert.provenance`) and, optionally, a `retconvert eval` report. JSON files whose records
are in an older schema or hold paths of the machine that made them (an older checkpoint's
training config) are uploaded in the current schema, path-free. The user's folder is never
modified.

The token comes from HF_TOKEN or the huggingface_hub login cache (`huggingface_hub.get_token`);
it is passed to the Hub client only, never printed, logged or written anywhere. `--dry-run`
needs neither a token nor a network: it prints the exact upload (paths, sizes, sha256) and
writes the card next to the folder for review.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from retconvert.errors import RetconvertError
from retconvert.provenance import public_json, read_conversion, read_distillation

# Pickle checkpoints can run arbitrary code when loaded: never published, and their presence
# in the folder is an error (the user decides what to do with them).
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
# Hidden files (.cache/, .git/, editor files) are never uploaded.
HIDDEN_PATTERNS = (".*", "*/.*")
IGNORE_PATTERNS = list(PICKLE_PATTERNS) + list(HIDDEN_PATTERNS)
# The code `trust_remote_code` imports; retconvert's save_pretrained copies it into every checkpoint.
CODE_FILES = ("configuration_retnet.py", "modeling_retnet.py", "retention.py", "state_retnet.py", "positions_retnet.py",
              "decoding_retnet.py", "kernels.py")
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForCausalLM")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CARD = "README.md"
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# Perplexity and zero-shot metrics read from an eval report; other numbers (counts) are ignored.
PPL_METRICS = ("ppl",)
ZERO_SHOT_METRICS = ("acc", "acc_norm", "perplexity")
METRIC_NAMES = {"ppl": "perplexity", "acc": "accuracy", "acc_norm": "normalized accuracy",
                "perplexity": "perplexity"}
METRIC_TYPES = {"ppl": "perplexity"}  # model-index metric types (the Hub's names)


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> str:
    """`USER/NAME` as the Hub accepts it, else a RetconvertError."""
    if not isinstance(repo_id, str) or not REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith((".", ".git")):
        raise RetconvertError(f"--repo-id {repo_id!r} is not a Hub repo id; use USER/NAME "
                              "(letters, digits, '-', '_', '.'), e.g. alice/smollm2-135m-retnet")
    return repo_id


def repo_id_arg(value: str) -> str:
    """argparse `type=` for repo ids (a bad one fails at parse time, before any slow work)."""
    try:
        return check_repo_id(value)
    except RetconvertError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def _visible_files(folder: Path) -> List[str]:
    """Relative posix paths of the regular files under `folder`, hidden entries skipped, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            if path.is_file():
                out.append(path.relative_to(folder).as_posix())
    return sorted(out)


def _is_pickle(rel: str) -> bool:
    return rel.lower().endswith(tuple(p[1:] for p in PICKLE_PATTERNS))


def _check_safetensors(folder: Path, rel: str, expected_keys: Optional[Sequence[str]] = None) -> int:
    """Open `rel` with safetensors (parses and bounds-checks the header); returns its tensor count."""
    from safetensors import safe_open

    path = folder / rel
    if not path.is_file():
        raise RetconvertError(f"{path} is missing; re-run the conversion, or copy the whole checkpoint folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # SafetensorError, OSError, ...: all mean "not a usable weights file"
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise RetconvertError(f"{path} is not a readable safetensors file ({reason}); it is corrupted or "
                              "truncated: re-run the conversion or copy it again") from None
    if not keys:
        raise RetconvertError(f"{path} holds no tensors; re-run the conversion")
    missing = [k for k in (expected_keys or ()) if k not in keys]
    if missing:
        raise RetconvertError(f"{path} lacks {missing[0]} ({len(missing)} tensors in all), which "
                              f"{WEIGHTS_INDEX} places there; the shards and the index disagree: re-save the model")
    return len(keys)


def _with_relative_imports(folder: Path, modules) -> set:
    """`modules` (file names) plus every sibling file they import relatively (`from .x import`),
    followed through the files that exist: what trust_remote_code will load. A checkpoint
    written by an older retconvert ships fewer files and stays publishable."""
    needed, todo = set(), list(modules)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            todo += [f"{m}.py" for m in re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.M)]
    return needed


def validate_checkpoint(folder) -> dict:
    """Check that `folder` is a complete, safe RetNet checkpoint; returns its config.json as a dict.

    Raises RetconvertError (one line: the problem and the fix) for: a missing folder, any pickle
    file, a missing/unparsable/non-RetNet config.json or one without `auto_map`, missing modeling
    code, and missing or unreadable safetensors weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RetconvertError(f"{folder} is not a folder; pass the checkpoint folder written by "
                              "`retconvert from-hf` or distillation")
    files = _visible_files(folder)
    pickles = [f for f in files if _is_pickle(f)]
    if pickles:
        raise RetconvertError(f"{folder / pickles[0]} is a pickle file ({len(pickles)} in all), which can run "
                              "code when loaded and is never published; delete it or move it out of the folder "
                              "(the safetensors weights are what gets uploaded)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise RetconvertError(f"{config_path} is missing; pass a folder written by save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetconvertError(f"{config_path} is not valid JSON ({str(e).splitlines()[0][:120]}); "
                              "re-save the model with save_pretrained") from None
    if not isinstance(config, dict) or config.get("model_type") != "retnet":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise RetconvertError(f"{config_path} has model_type {found!r}, not 'retnet'; only RetNet checkpoints are "
                              "published: convert the model first with `retconvert from-hf`")
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or any(k not in auto_map for k in REQUIRED_AUTO_MAP):
        raise RetconvertError(f"{config_path} has no auto_map for {' and '.join(REQUIRED_AUTO_MAP)}, so "
                              "trust_remote_code cannot load it; re-save with `import retconvert` done first "
                              "(it registers the code to ship)")
    modules = set()
    for ref in auto_map.values():
        refs = ref if isinstance(ref, (list, tuple)) else [ref]
        for r in refs:
            if isinstance(r, str) and "--" not in r and "." in r:  # "repo--module.Class" lives elsewhere
                modules.add(r.rsplit(".", 1)[0].replace(".", "/") + ".py")
    for module in sorted(_with_relative_imports(folder, modules)):
        if not (folder / module).is_file():
            raise RetconvertError(f"{folder / module} is missing, and trust_remote_code needs it; re-save with "
                                  "`import retconvert` done first, or copy it from retconvert's models/ folder")
    index_path = folder / WEIGHTS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict) and weight_map
        except Exception:
            raise RetconvertError(f"{index_path} is not a valid shard index (no weight_map); re-save the model "
                                  "with save_pretrained") from None
        by_shard: Dict[str, List[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(str(shard), []).append(key)
        for shard, keys in sorted(by_shard.items()):
            if not shard.endswith(".safetensors") or "/" in shard or "\\" in shard:
                raise RetconvertError(f"{index_path} points to {shard!r}, not a safetensors shard in the folder; "
                                      "re-save the model with safe_serialization=True")
            _check_safetensors(folder, shard, keys)
    elif (folder / SINGLE_WEIGHTS).is_file():
        _check_safetensors(folder, SINGLE_WEIGHTS)
    else:
        raise RetconvertError(f"{folder} has no weights ({SINGLE_WEIGHTS} or {WEIGHTS_INDEX} with shards); "
                              "re-run the conversion, or save with save_pretrained(safe_serialization=True)")
    return config


# ------------------------------------------------------------------------------------------
# Eval report
# ------------------------------------------------------------------------------------------


@dataclass
class EvalResults:
    """Normalised results of one model: {"perplexity": {dataset: {metric: value}},
    "zero_shot": {task: {metric: value}}, "longrange": {"dotted.path": value}}."""

    name: str
    perplexity: Dict[str, Dict[str, float]] = field(default_factory=dict)
    zero_shot: Dict[str, Dict[str, float]] = field(default_factory=dict)
    longrange: Dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    path: Path
    student: EvalResults
    teacher: Optional[EvalResults]


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metrics(table, wanted: Sequence[str]) -> Dict[str, Dict[str, float]]:
    out = {}
    if not isinstance(table, dict):
        return out
    for name, entry in table.items():
        if not isinstance(entry, dict):
            continue
        values = {m: _number(entry.get(m)) for m in wanted}
        values = {m: v for m, v in values.items() if v is not None}
        if values:
            out[str(name)] = values
    return out


def _flatten(tree, prefix="") -> Dict[str, float]:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif _number(tree) is not None and prefix:
        out[prefix] = _number(tree)
    return out


def _results(entry: dict) -> EvalResults:
    results = entry.get("results") if isinstance(entry.get("results"), dict) else {}
    quality = results.get("quality") if isinstance(results.get("quality"), dict) else {}
    return EvalResults(
        name=str(entry.get("name", "?")),
        perplexity=_metrics(quality.get("perplexity"), PPL_METRICS),
        zero_shot=_metrics(quality.get("zero_shot"), ZERO_SHOT_METRICS),
        longrange=_flatten(results.get("longrange")),
    )


def load_eval_report(report, folder=None, repo_id: Optional[str] = None) -> EvalReport:
    """Read the `results.json` that `retconvert eval` writes (REPORT_DIR or the file itself).

    Expected schema (anything missing or non-numeric is skipped, unknown keys are ignored):

        {"models": [
            {"name": "HuggingFaceTB/SmolLM2-135M", "role": "teacher",
             "results": {
                 "quality": {
                     "perplexity": {"<dataset>": {"ppl": 12.3, ...}, ...},
                     "zero_shot": {"<task>": {"acc": 0.41, "acc_norm": 0.43, "perplexity": ..., ...}, ...}},
                 "longrange": {... nested dicts whose leaves are numbers ...}}},
            {"name": "outputs/smollm2-135m-retnet", "role": "student", "results": {...}}]}

    The student is the only "student" entry, or, with several, the one whose name is the
    folder (path or folder name) or `repo_id`. The teacher is the first "teacher" entry, if any.
    """
    path = Path(report)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise RetconvertError(f"eval report {path} not found; pass the folder written by `retconvert eval` "
                              "(it holds results.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetconvertError(f"eval report {path} is not valid JSON ({str(e).splitlines()[0][:120]}); "
                              "re-run `retconvert eval`") from None
    models = data.get("models") if isinstance(data, dict) else None
    models = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
    students = [m for m in models if m.get("role") == "student"]
    teachers = [m for m in models if m.get("role") == "teacher"]
    if not students:
        raise RetconvertError(f"eval report {path} has no model with role 'student'; run `retconvert eval` "
                              "on this checkpoint (with its teacher) and pass that report")
    student = students[0]
    if len(students) > 1:
        names = {str(folder)} if folder is not None else set()
        if folder is not None:
            names |= {Path(folder).name, str(Path(folder).resolve())}
        if repo_id:
            names.add(repo_id)

        def matches(m):
            name = str(m.get("name", ""))
            return name in names or name.rstrip("/") in names or \
                (folder is not None and Path(name).expanduser().resolve() == Path(folder).resolve())

        chosen = [m for m in students if matches(m)]
        if len(chosen) != 1:
            listed = ", ".join(str(m.get("name")) for m in students)
            raise RetconvertError(f"eval report {path} has {len(students)} students ({listed}) and none is "
                                  f"uniquely this folder; evaluate this checkpoint on its own and pass that report")
        student = chosen[0]
    return EvalReport(path, _results(student), _results(teachers[0]) if teachers else None)


# ------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------

KINDS = {"hub": "a Hub model", "builtin": "the built-in teacher (a GGUF copy of the Hub model)",
         "folder": "a local folder", "gguf": "a GGUF file"}


def _hub_base_model(conversion: dict) -> Optional[str]:
    """The teacher as a Hub ID, or None when it was a local folder or GGUF file (names only)."""
    teacher = conversion.get("teacher")
    return teacher if conversion.get("kind") in ("hub", "builtin") and isinstance(teacher, str) and teacher else None


def _fmt(value: Optional[float], metric: str = "") -> str:
    if value is None:
        return "—"
    if metric in ("acc", "acc_norm"):
        return f"{value:.4f}"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.1f}"


def _tokens(n) -> str:
    n = _number(n)
    if n is None:
        return "not recorded"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{int(n):,} (~{n / scale:.3g}{unit})"
    return f"{int(n):,}"


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, default=str)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _side_by_side(student: Dict[str, Dict[str, float]], teacher: Dict[str, Dict[str, float]]):
    rows = []
    for name in sorted(set(student) | set(teacher)):
        metrics = sorted(set(student.get(name, {})) | set(teacher.get(name, {})))
        for m in metrics:
            rows.append([name, METRIC_NAMES.get(m, m), _fmt(teacher.get(name, {}).get(m), m),
                         _fmt(student.get(name, {}).get(m), m)])
    return rows


def _model_index(name: str, results: EvalResults) -> list:
    entries = []
    for group, table in (("perplexity", results.perplexity), ("zero-shot", results.zero_shot)):
        for dataset, metrics in sorted(table.items()):
            entries.append({
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": dataset, "type": dataset},
                "metrics": [{"type": METRIC_TYPES.get(m, m), "value": round(v, 6),
                             "name": METRIC_NAMES.get(m, m) + (f" ({group})" if group != "perplexity" else ""),
                             "verified": False} for m, v in sorted(metrics.items())],
            })
    return [{"name": name, "results": entries}] if entries else []


def _layer_errors(conversion_report: Optional[dict]) -> List[str]:
    """The per-layer calibration errors of conversion_report.json as card lines (none: [])."""
    layers = (conversion_report or {}).get("layers")
    errors = [_number(layer.get("rel_error")) for layer in layers or [] if isinstance(layer, dict)]
    if not errors or None in errors:
        return []
    return ["", "Relative error of retention vs attention output per layer (calibration text):", "",
            _table(["layer", "relative error"], [[str(i), _cell(e)] for i, e in enumerate(errors)])]


def _conversion_section(conversion: Optional[dict], teacher_md: str, conversion_report: Optional[dict]) -> List[str]:
    if not conversion:
        return ["No conversion record in config.json."]
    options = conversion.get("options") if isinstance(conversion.get("options"), dict) else {}
    calibration = conversion.get("calibration") if isinstance(conversion.get("calibration"), dict) else None
    rows = [["teacher", teacher_md], ["given as", KINDS.get(conversion.get("kind"), "—")],
            ["family (key table)", f"`{conversion['family']}`" if conversion.get("family") else "—"],
            ["retconvert version", str(conversion.get("retconvert_version") or "—")]]
    rows += [[f"`{k}`", f"`{json.dumps(v)}`"] for k, v in options.items() if k != "calib_data"]
    if calibration:
        rows += [["calibration text", f"`{calibration['data']}`" if calibration.get("data") else
                  "the default (a C4 sample)"],
                 ["calibration tokens", _cell(calibration.get("tokens"))]]
        if _number(calibration.get("mean_rel_error")) is not None:
            rows.append(["mean relative error of retention vs attention (calibration text)",
                         _cell(float(calibration["mean_rel_error"]))])
    return [_table(["setting", "value"], rows)] + _layer_errors(conversion_report)


def _distillation_section(distillation: Optional[dict]) -> List[str]:
    if not distillation:
        return ["Not distilled."]
    stages = [s for s in distillation.get("stages") or [] if isinstance(s, dict)]
    out = [f"Tokens seen: **{_tokens(distillation.get('tokens_seen'))}**"
           + (" (token positions fed to the model, all stages and processes)."
              if _number(distillation.get("tokens_seen")) is not None else
              " (an older checkpoint: its number of training processes was not recorded).")]
    student = distillation.get("student") if isinstance(distillation.get("student"), dict) else {}
    if student.get("init") == "checkpoint":
        out += ["", f"The student started from the converted checkpoint `{student.get('name')}`."]
    if stages:
        out += ["", _table(["stage", "steps", "tokens", "final loss"],
                           [[str(s.get("name")), _cell(s.get("steps")), _cell(s.get("tokens")),
                             _cell(_number(s.get("final_loss")))] for s in stages])]
        for s in stages:
            settings = s.get("settings") if isinstance(s.get("settings"), dict) else {}
            if settings:
                out += ["", f"Settings of {s.get('name')}: "
                        + ", ".join(f"`{k}={json.dumps(v, default=str)}`" for k, v in settings.items()) + "."]
    data = distillation.get("data") if isinstance(distillation.get("data"), dict) else {}
    if data.get("train"):
        out += ["", f"Training text: {', '.join(f'`{d}`' for d in data['train'])}"
                + (f", packed into sequences of {data['seq_len']} tokens" if data.get("seq_len") else "")
                + (f"; held out: {', '.join(f'`{d}`' for d in data['eval'])}." if data.get("eval") else ".")]
    return out


def _recorded_eval(distillation: Optional[dict]) -> List[str]:
    """The held-out perplexity the recipe measured at its last step, as card lines (none: [])."""
    results = (distillation or {}).get("eval")
    results = {k: v for k, v in results.items() if isinstance(v, dict)} if isinstance(results, dict) else {}
    if not results:
        return []
    with_teacher = any(_number(v.get("teacher")) is not None for v in results.values())
    rows = [[name] + ([_fmt(_number(v.get("teacher")))] if with_teacher else []) + [_fmt(_number(v.get("student")))]
            for name, v in sorted(results.items())]
    return ["Held-out perplexity measured by the distillation recipe at its last step (lower is better):", "",
            _table(["held-out set"] + (["teacher"] if with_teacher else []) + ["this model"], rows)]


def _metadata(name: str, retnet: bool, scratch: bool, hub_teacher: Optional[str], license_id: Optional[str],
              distillation: Optional[dict], eval_report: Optional[EvalReport]) -> dict:
    """The card's YAML front matter (the Hub's model metadata)."""
    meta = {}
    if hub_teacher:
        meta["base_model"] = hub_teacher
    if license_id:
        meta["license"] = license_id
    elif not scratch:  # derived weights: the teacher's license
        meta["license"] = "other"
        meta["license_name"] = "same-as-teacher"
        if hub_teacher:
            meta["license_link"] = f"https://huggingface.co/{hub_teacher}"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = (["retnet", "retconvert", "retention", "linear-attention", "custom_code"] if retnet else
                    ["retconvert"]) + ([] if scratch else ["distillation" if distillation else "converted"])
    if eval_report is not None:
        index = _model_index(name, eval_report.student)
        if index:
            meta["model-index"] = index
    return meta


def _intro(retnet: bool, model_type, scratch: bool, distillation: Optional[dict], teacher_md: str) -> List[str]:
    """What the model is, in a paragraph."""
    if scratch and not retnet:
        return [f"A Transformer (`{model_type}`) trained from scratch with "
                "[retconvert](https://pypi.org/project/retconvert/): the softmax-attention baseline of a "
                "RetNet-vs-Transformer comparison.", ""]
    if scratch:
        return ["A Retentive Network (RetNet) trained from scratch with "
                "[retconvert](https://pypi.org/project/retconvert/): multi-scale retention instead of softmax "
                "attention, which can run as a recurrence: constant memory per generated token.", ""]
    out = [f"A Retentive Network (RetNet) {'distilled' if distillation else 'converted'} from the Transformer "
           f"{teacher_md} with [retconvert](https://pypi.org/project/retconvert/). The teacher's embeddings, MLPs, "
           "norms and attention projections were carried over and softmax attention was replaced by multi-scale "
           "retention, which can run as a recurrence: constant memory per generated token."
           + (" It was then distilled: trained to match the teacher's outputs." if distillation else ""), ""]
    if not distillation:
        out += ["**Not distilled.** This is the direct conversion; expect a large quality gap to the teacher "
                "until it has been distilled (trained to match the teacher's outputs).", ""]
    return out


def _license_section(license_id: Optional[str], given: bool, scratch: bool, hub_teacher: Optional[str],
                     teacher_md: str) -> List[str]:
    """The license and where it comes from (`given`: set when publishing, else the teacher's record)."""
    if license_id:
        source = "set when publishing" if given else "the teacher's, as its source states it, recorded at conversion"
        return [f"`{license_id}` ({source})."]
    if scratch:
        return ["No license was recorded; set one with `retconvert push --license ID`."]
    return ["The teacher's license was not recorded at conversion. These weights are derived from the "
            f"teacher's, so the teacher's license applies{': see ' + teacher_md if hub_teacher else ''}; "
            "check it before use."]


def _evaluation_section(eval_report: Optional[EvalReport], distillation: Optional[dict], teacher: Optional[str],
                        hub_teacher: Optional[str]) -> List[str]:
    """The eval report's numbers (teacher beside this model) and the recipe's own held-out perplexity."""
    recorded = _recorded_eval(distillation)
    if eval_report is None:
        if recorded:
            return recorded + ["", "No `retconvert eval` report was attached: zero-shot quality was not measured here."]
        return ["No evaluation report was attached when this card was written: quality relative to the "
                "teacher was not measured here."]
    s, t = eval_report.student, eval_report.teacher or EvalResults(name="")
    out = [f"Self-reported by `retconvert eval` (`{eval_report.path.name}`), not verified by the Hub. "
           f"Teacher: `{t.name or 'not in the report'}`; this model: `{s.name}`."]
    if t.name and teacher and t.name != teacher and hub_teacher and t.name != hub_teacher:
        out.append(f"Note: the report's teacher (`{t.name}`) is not the recorded teacher (`{teacher}`).")
    if s.perplexity or t.perplexity:
        out += ["", "Perplexity (lower is better):", "",
                _table(["dataset", "metric", "teacher", "this model"], _side_by_side(s.perplexity, t.perplexity))]
    if s.zero_shot or t.zero_shot:
        out += ["", "Zero-shot tasks:", "",
                _table(["task", "metric", "teacher", "this model"], _side_by_side(s.zero_shot, t.zero_shot))]
    if not (s.perplexity or t.perplexity or s.zero_shot or t.zero_shot):
        out.append("The report holds no perplexity or zero-shot numbers.")
    return out + ([""] + recorded if recorded else [])


def has_tokenizer(files: Sequence[str]) -> bool:
    """Whether the folder's `files` (relative paths) hold a loadable tokenizer: tokenizer.json, a
    SentencePiece *.model, or a vocabulary (vocab.json / vocab.txt)."""
    names = [Path(f).name for f in files]
    return any(n in ("tokenizer.json", "vocab.json", "vocab.txt") or n.endswith(".model") for n in names)


def _usage_section(config: dict, repo_id: Optional[str], revision: Optional[str], files: Sequence[str],
                   hub_teacher: Optional[str]) -> List[str]:
    """How to load and run it: from the Hub repo (`repo_id`), else from this folder."""
    retnet = config.get("model_type") == "retnet"
    where = "repo" if repo_id else "folder"
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    remote = ", trust_remote_code=True" if retnet else ""  # config.json's auto_map: else transformers asks y/N
    if has_tokenizer(files):
        tok_line = f"tok = AutoTokenizer.from_pretrained(repo{rev}{remote})"
    else:
        tok_src = f'"{hub_teacher}"' if hub_teacher else "TEACHER_TOKENIZER"
        tok_line = f"tok = AutoTokenizer.from_pretrained({tok_src})  # this {where} ships no tokenizer: the teacher's"
    out = ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           f'repo = "{repo_id}"' if repo_id else 'repo = "path/to/this/folder"  # or its Hub repo id once pushed',
           f"model = AutoModelForCausalLM.from_pretrained(repo{rev}{remote})",
           tok_line,
           'inputs = tok("The capital of France is", return_tensors="pt")',
           "out = model.generate(**inputs, max_new_tokens=20)",
           "print(tok.decode(out[0], skip_special_tokens=True))"]
    if not retnet:
        return out + ["```", ""]
    return out + ["", "# faster: packed weights and a static decode loop (same tokens, greedy)",
                  "out = model.packed_decoder().generate(inputs.input_ids, max_new_tokens=20)", "```", "",
                  f"`trust_remote_code=True` runs the modeling code shipped in this {where} "
                  f"({', '.join(f'`{c}`' for c in CODE_FILES)}); retconvert itself is not needed. The prompt is "
                  f"processed in the `{config.get('retention_mode', 'chunkwise')}` form; decoding is always "
                  "recurrent (a fixed-size state per layer instead of a growing KV cache).", ""]


def _limitations_section(retnet: bool, scratch: bool, distillation: Optional[dict], options: dict,
                         eval_report: Optional[EvalReport]) -> List[str]:
    out = []
    s_lr = eval_report.student.longrange if eval_report else {}
    t_lr = eval_report.teacher.longrange if eval_report and eval_report.teacher else {}
    if s_lr or t_lr:
        out += ["Long-range retrieval (from the eval report):", "",
                _table(["measure", "teacher", "this model"],
                       [[k, _fmt(t_lr.get(k)), _fmt(s_lr.get(k))] for k in sorted(set(s_lr) | set(t_lr))]), ""]
        if retnet:
            out.append("- Retention decays exponentially with distance; check the numbers above before relying on "
                       "recall of facts far back in a long context.")
    elif retnet:
        out.append("- Long-range retrieval (passkey / needle-in-a-haystack) was **not measured**. Retention decays "
                   "exponentially with distance, so recall of facts far back in a long context is likely worse "
                   + ("than a Transformer's." if scratch else "than the teacher's."))
    else:
        out.append("- Long-range retrieval (passkey / needle-in-a-haystack) was **not measured**.")
    if not distillation:
        out.append("- Not distilled: outputs are noticeably worse than the teacher's.")
    if options.get("gate") and not distillation:
        out.append("- The output gate was randomly initialised at conversion and has not been trained.")
    if not scratch:
        out.append("- It inherits the teacher's training data, biases and intended-use restrictions.")
    return out


def render_card(config: dict, repo_id: Optional[str] = None, *, name: Optional[str] = None, files: Sequence[str] = (),
                eval_report: Optional[EvalReport] = None, license: Optional[str] = None,
                base_model: Optional[str] = None, revision: Optional[str] = None,
                conversion_report: Optional[dict] = None) -> str:
    """The model card (README.md) of a checkpoint whose config.json is `config`: Hub YAML
    metadata, then what was done and what is known. The one card writer: `retconvert push`
    renders it for `repo_id` (the published card); the converter and the distillation recipe
    render it with `repo_id` None, titled `name`, into the folder they write (`write_card`).

    What was done comes from the checkpoint's provenance record (`retconvert.provenance`, older
    records included; `conversion_report` is the conversion_report.json beside it, which also
    gives the per-layer calibration errors). `files` are the folder's files (relative paths:
    whether it ships a tokenizer). No path of the machine that converted or trained the model
    appears in the card. ValueError when neither `repo_id` nor `name` is given.
    """
    import yaml

    if repo_id is None and not name:
        raise ValueError("render_card needs the repo id it is published to, or the checkpoint's name")
    conversion = read_conversion(config, conversion_report) or {}
    distillation = read_distillation(config)
    teacher = conversion.get("teacher")
    hub_teacher = base_model or _hub_base_model(conversion)
    license_id = license or conversion.get("license")
    name = repo_id.split("/", 1)[1] if repo_id else name
    retnet = config.get("model_type") == "retnet"
    scratch = bool(distillation) and (distillation.get("student") or {}).get("init") == "scratch"

    meta = _metadata(name, retnet, scratch, hub_teacher, license_id, distillation, eval_report)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    teacher_md = f"[{hub_teacher}](https://huggingface.co/{hub_teacher})" if hub_teacher else \
        (f"`{teacher}` ({KINDS.get(conversion.get('kind'), 'a local file or folder')}, not linked to a Hub model)"
         if teacher else "unknown (config.json records no `conversion`)")
    out = [f"---\n{front}---", f"# {name}", ""] + _intro(retnet, config.get("model_type"), scratch, distillation,
                                                          teacher_md)
    out += ["## License", ""] + _license_section(license_id, bool(license), scratch, hub_teacher, teacher_md) + [""]
    if not scratch:
        out += ["## Conversion", ""] + _conversion_section(conversion, teacher_md, conversion_report) + [""]
    out += ["## Distillation" if not scratch else "## Training", ""] + _distillation_section(distillation) + [""]
    out += ["## Evaluation", ""] + _evaluation_section(eval_report, distillation, teacher, hub_teacher) + [""]
    out += _usage_section(config, repo_id, revision, files, hub_teacher)
    out += ["## Limitations", ""] + _limitations_section(retnet, scratch, distillation, conversion.get("options") or {},
                                                         eval_report)
    out += ["", f"_Card generated by `retconvert push` (retconvert {_version()})._" if repo_id else
            f"_Card generated by retconvert {_version()} when this checkpoint was written._", ""]
    return "\n".join(out)


def write_card(folder, name: str) -> Path:
    """Write the model card (README.md) of the checkpoint just saved in `folder`, by the converter
    or the distillation recipe: `render_card` of its config.json and conversion_report.json,
    titled `name` (the checkpoint's name: `folder` may be a temporary folder renamed later).
    Returns the card's path."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    report = _read_json(folder / "conversion_report.json")
    card = render_card(config, name=name, files=[r for r in _visible_files(folder) if r != CARD],
                       conversion_report=report if isinstance(report, dict) else None)
    path = folder / CARD
    path.write_text(card, encoding="utf-8")
    return path


def _version() -> str:
    try:
        from retconvert import __version__

        return __version__
    except Exception:
        return "?"


# ------------------------------------------------------------------------------------------
# Plan and push
# ------------------------------------------------------------------------------------------


@dataclass
class PlannedFile:
    path: str  # in the repo (posix, relative)
    size: int
    sha256: Optional[str]
    source: Optional[Path]  # on disk; None for what the upload writes itself (`data`)
    data: Optional[bytes] = None  # the rendered card, or a JSON file rewritten without local paths
    note: str = ""  # why `data` replaces the folder's file (dry-run listing)


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    revision: str
    private: bool
    commit_message: str
    card: str
    files: List[PlannedFile]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_push(folder, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
              commit_message: Optional[str] = None, eval_report=None, license: Optional[str] = None,
              base_model: Optional[str] = None, hashes: bool = True) -> PushPlan:
    """Validate `folder` and work out exactly what would be uploaded (nothing touches the network)."""
    check_repo_id(repo_id)
    folder = Path(folder)
    config = validate_checkpoint(folder)
    if not has_tokenizer(_visible_files(folder)):
        raise RetconvertError(f"{folder} has no tokenizer (tokenizer.json, *.model or vocab.json), so users of the "
                              "repo could not run it; save the teacher's tokenizer there with "
                              "AutoTokenizer.from_pretrained(TEACHER).save_pretrained(folder), then push again")
    if revision is not None and (not revision.strip() or revision != revision.strip()):
        raise RetconvertError(f"--revision {revision!r} is not a branch name; e.g. --revision main")
    if base_model is not None and not (REPO_ID_RE.match(base_model) or re.match(r"^[A-Za-z0-9][\w.-]*$", base_model)):
        raise RetconvertError(f"--base-model {base_model!r} is not a Hub model id; use ORG/NAME, e.g. "
                              "HuggingFaceTB/SmolLM2-135M")
    report = load_eval_report(eval_report, folder, repo_id) if eval_report is not None else None
    rels = [r for r in _visible_files(folder) if r != CARD]
    conversion_report = _read_json(folder / "conversion_report.json") if "conversion_report.json" in rels else None
    conversion_report = conversion_report if isinstance(conversion_report, dict) else None
    card = render_card(config, repo_id, files=rels, eval_report=report, license=license, base_model=base_model,
                       revision=revision, conversion_report=conversion_report)
    files = [_planned(folder, r, config, conversion_report, hashes) for r in rels]
    data = card.encode("utf-8")
    files.append(PlannedFile(CARD, len(data), hashlib.sha256(data).hexdigest(), None, data, "rendered model card"))
    files.sort(key=lambda f: f.path)
    if commit_message is None:
        what = "distilled" if read_distillation(config) else "converted"
        teacher = (read_conversion(config) or {}).get("teacher")
        source = f" from {teacher}" if teacher else ""
        commit_message = f"Upload RetNet {what}{source} with retconvert {_version()}"
    return PushPlan(folder, repo_id, revision or "main", bool(private), commit_message, card, files)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _planned(folder: Path, rel: str, config: dict, conversion_report: Optional[dict], hashes: bool) -> PlannedFile:
    """The upload of `rel`: the folder's file, or (a JSON file whose records are older or hold
    local paths) its public form from `retconvert.provenance.public_json`."""
    path = folder / rel
    if rel.endswith(".json") and "/" not in rel:
        data = config if rel == "config.json" else _read_json(path)
        public = public_json(rel, data, config, conversion_report) if data is not None else None
        if public is not None and public != data:
            text = (json.dumps(public, indent=2, sort_keys=rel == "config.json", default=str) + "\n").encode("utf-8")
            return PlannedFile(rel, len(text), hashlib.sha256(text).hexdigest(), None, text,
                               "provenance in the current schema, without local paths")
    return PlannedFile(rel, path.stat().st_size, _sha256(path) if hashes else None, path)


def _write_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_card_out(folder) -> Path:
    folder = Path(folder).resolve()
    return folder.with_name(folder.name + ".card.md")


def _escape_pattern(rel: str) -> str:
    """A path as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", rel)


def _stage(plan: PushPlan, staging: Path):
    """The upload as a folder: links to the user's files (copies where links fail) plus the card."""
    for f in plan.files:
        dest = staging / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.source is None:
            dest.write_bytes(f.data)
            continue
        src = f.source.resolve()
        try:
            os.link(src, dest)
        except OSError:
            try:
                os.symlink(src, dest)
            except OSError:
                shutil.copy2(src, dest)


def offline_mode() -> bool:
    """Whether the Hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now)."""
    from huggingface_hub import constants

    env = any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
              for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.is_offline_mode())


def _hub_error(e: Exception, token: Optional[str], repo_id: str, stage: str) -> RetconvertError:
    text = " ".join(str(e).split())  # one line
    if token:
        text = text.replace(token, "***")
    text = text[:200] or type(e).__name__
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        fix = "the Hub rejected the token: log in again with `hf auth login` (a write token) or fix HF_TOKEN"
    elif status == 403:
        fix = f"the token may not write to {repo_id.split('/')[0]}: use a write token with access to that namespace"
    elif status is None:
        fix = "check the network connection and retry, or use --dry-run to review offline"
    else:
        fix = "retry later, or check the repo id and revision"
    done = "nothing was uploaded" if stage != "upload" else \
        f"{repo_id} may exist but nothing was committed to it"
    return RetconvertError(f"pushing to {repo_id} failed during {stage} ({type(e).__name__}: {text}); {done}; {fix}")


def push(folder, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, eval_report=None, dry_run: bool = False,
         card_out=None, license: Optional[str] = None, base_model: Optional[str] = None,
         api=None, token: Optional[str] = None, log: Callable[[str], None] = print) -> PushPlan:
    """Validate `folder`, render its card and upload it to `repo_id` (or, with dry_run, only report).

    `api` is an `huggingface_hub.HfApi`-like object (create_repo, create_branch, upload_folder);
    by default a real HfApi, which refuses to start in offline mode (HF_HUB_OFFLINE). `token`
    defaults to `huggingface_hub.get_token()` (HF_TOKEN, then the login cache). Returns the plan.
    """
    plan = plan_push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                     eval_report=eval_report, license=license, base_model=base_model, hashes=dry_run)
    flags = f"revision={plan.revision}, private={plan.private}"
    if dry_run:
        out = Path(card_out) if card_out is not None else default_card_out(plan.folder)
        _write_atomic(out, plan.card)
        log("dry run: nothing is uploaded and no token is used")
        log(f"repo: {plan.repo_id} (model, {flags}; an existing repo keeps its visibility)")
        log(f"commit message: {plan.commit_message}")
        log(f"files ({len(plan.files)}, {plan.total_size} bytes):")
        for f in plan.files:
            note = f"  ({f.note})" if f.note else ""
            log(f"  {f.sha256}  {f.size:>12}  {f.path}{note}")
        log(f"model card written to {out}")
        return plan

    if token is None:
        from huggingface_hub import get_token

        try:
            token = get_token()
        except Exception as e:  # e.g. a failed OIDC exchange
            raise RetconvertError(f"could not read a Hugging Face token ({type(e).__name__}); set HF_TOKEN or run "
                                  "`hf auth login`") from None
    if not token:
        raise RetconvertError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token); "
                              "or review the upload with --dry-run, which needs none")
    if api is None:
        if offline_mode():
            raise RetconvertError(f"offline mode is on (HF_HUB_OFFLINE), so {plan.repo_id} cannot be reached and "
                                  "nothing was uploaded; unset HF_HUB_OFFLINE, or use --dry-run")
        from huggingface_hub import HfApi

        api = HfApi(token=token, library_name="retconvert", library_version=_version())

    log(f"pushing {len(plan.files)} files ({plan.total_size} bytes) from {plan.folder} to {plan.repo_id} ({flags})")
    for f in plan.files:
        log(f"  {f.size:>12}  {f.path}")
    stage = "create_repo"
    try:
        api.create_repo(plan.repo_id, token=token, private=plan.private, repo_type="model", exist_ok=True)
        if plan.revision != "main":
            stage = "create_branch"
            api.create_branch(plan.repo_id, branch=plan.revision, token=token, repo_type="model", exist_ok=True)
        stage = "upload"
        with tempfile.TemporaryDirectory(prefix="retconvert-push-") as tmp:
            _stage(plan, Path(tmp))
            result = api.upload_folder(
                repo_id=plan.repo_id, folder_path=tmp, repo_type="model", revision=plan.revision,
                commit_message=plan.commit_message, token=token,
                allow_patterns=[_escape_pattern(f.path) for f in plan.files],
                ignore_patterns=list(IGNORE_PATTERNS),
            )
    except RetconvertError:
        raise
    except Exception as e:  # the Hub client's HTTP, network and validation errors
        raise _hub_error(e, token, plan.repo_id, stage) from None
    url = getattr(result, "commit_url", None) or f"https://huggingface.co/{plan.repo_id}"
    log(f"pushed {plan.repo_id} ({plan.revision}): {url}")
    return plan


def push_after_convert(out, repo_id: str, log=print) -> PushPlan:
    """`retconvert from-hf --push-to-hub`: push the folder just written; on failure keep it and say how to retry."""
    try:
        return push(out, repo_id, log=log)
    except RetconvertError as e:
        raise RetconvertError(f"{e} (the checkpoint is kept at {out}: retry with "
                              f"`retconvert push {out} --repo-id {repo_id}`)") from None
