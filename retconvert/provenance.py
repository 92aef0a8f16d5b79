"""The provenance record of a RetNet checkpoint: where its weights came from and what was done
to them. This module owns the record's schema: the converter and the distillation recipe write
it, the model card (`retconvert.hub.render_card`) and the upload read it.

Both parts live in config.json, so they travel with the weights:

    config.conversion = conversion_record(teacher, options, report, license=teacher_license(teacher))
        {"schema": 1,
         "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct",  # a Hub ID, else the file or folder *name*
         "kind": "builtin",               # how the teacher was given: hub | folder | gguf | builtin
         "family": "llama",               # the key table used (convert/families.py)
         "license": "apache-2.0",         # the teacher's, when its source states it; None: unknown
         "options": {...},                # ConvertOptions; calib_data as a source name
         "calibration": {"data": ..., "tokens": 8192, "seq_len": 512, "mean_rel_error": 0.114},
                                          # None: nothing was calibrated
         "retconvert_version": "0.1.0"}

    config.distillation = distillation_record(cfg, result, ...)   (also saved as distillation.json)
        {"schema": 1,
         "student": {"init": "converted"},          # converted | checkpoint (+ name) | scratch (+ settings)
         "stages": [{"name": "attention transfer", "steps": 200, "tokens": 204800,
                     "final_loss": 0.05, "settings": {"lr": 0.01, ...}},
                    {"name": "logit distillation", "steps": 1000, "tokens": 16384000,
                     "final_loss": 2.1, "settings": {"lr": 0.0003, "temperature": 2.0, ...}}],
         "tokens_seen": 16588800,                   # token positions processed, all stages, all processes
         "data": {"train": ["c4_train_sample.jsonl"], "eval": ["heldout.jsonl"], "seq_len": 512},
         "eval": {"heldout": {"student": 21.3}},    # held-out perplexity at the last step
         "run": {"world_size": 1, "dtype": "float32", "seed": 0, "deepspeed": null,
                 "params": 134515008, "trainable_params": 134515008, "wall_s": 812.4},
         "retconvert_version": "0.1.0"}

Paths of the machine that converted or trained never enter a record: a local file or folder is
recorded by its name (`source_name`), the output folder not at all. `read_conversion` and
`read_distillation` return records in this schema for any checkpoint, turning those of older
checkpoints (keys `source`, `config`, `origin`, `result`) into it, path-free as well.
"""

import re
from dataclasses import asdict
from pathlib import Path, PureWindowsPath
from typing import Any, Dict, List, Optional

SCHEMA = 1
STAGE1, STAGE2, SCRATCH = "attention transfer", "logit distillation", "next-token training"
# A local absolute path: /x, ~/x, C:\x or C:/x, \\server\share (not // URLs or hf: specs).
_LOCAL_PATH = re.compile(r"^(/(?!/)|~[/\\]|~$|[A-Za-z]:[\\/]|\\\\)")
# License ids as the Hub's metadata takes them (apache-2.0, mit, llama3.2, cc-by-nc-4.0, ...).
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,63}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_BARE_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # a canonical id such as gpt2


# ------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------


def is_local_path(text) -> bool:
    """True for an absolute path of some machine (posix, home-relative or Windows)."""
    return isinstance(text, str) and bool(_LOCAL_PATH.match(text))


def _name(path: str) -> str:
    return PureWindowsPath(path).name if "\\" in path else Path(path).name


def source_name(spec) -> Optional[str]:
    """A data source as it may be published: `hf:NAME:CONFIG:SPLIT` as it is, a file by its name."""
    if spec is None:
        return None
    spec = str(spec)
    return spec if spec.startswith("hf:") else _name(spec)


def strip_local_paths(tree):
    """`tree` (JSON-like) with every string that is an absolute local path replaced by its name."""
    if isinstance(tree, dict):
        return {k: strip_local_paths(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [strip_local_paths(v) for v in tree]
    return _name(tree) if is_local_path(tree) else tree


def local_paths(tree) -> List[str]:
    """Every absolute local path in `tree` (a JSON-like value), in order."""
    if isinstance(tree, dict):
        return [p for v in tree.values() for p in local_paths(v)]
    if isinstance(tree, (list, tuple)):
        return [p for v in tree for p in local_paths(v)]
    return [tree] if is_local_path(tree) else []


# ------------------------------------------------------------------------------------------
# The teacher's license
# ------------------------------------------------------------------------------------------


def license_id(value) -> Optional[str]:
    """A license as a Hub metadata id (an SPDX id lower-cased: 'Apache-2.0' -> 'apache-2.0');
    None when absent or not an id (free text such as 'see LICENSE')."""
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return text if _LICENSE_ID.match(text) else None


def gguf_license(path) -> Optional[str]:
    """`general.license` of a GGUF file (llama.cpp's metadata), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    return license_id(field.contents()) if field is not None else None


def card_license(readme) -> Optional[str]:
    """The `license:` of a model card's YAML front matter (README.md), or None."""
    from huggingface_hub.repocard import metadata_load

    path = Path(readme)
    return license_id((metadata_load(path) or {}).get("license")) if path.is_file() else None


def _hub_readme(repo_id: str) -> Optional[str]:
    """The teacher's README.md from the local Hub cache, else downloaded (unless offline)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from retconvert.hub import offline_mode

    cached = try_to_load_from_cache(repo_id, "README.md")
    if isinstance(cached, str):
        return cached
    return None if offline_mode() else hf_hub_download(repo_id, "README.md", etag_timeout=10)


def teacher_license(teacher) -> Optional[str]:
    """The license the teacher's source states, or None: `general.license` of a GGUF file (and
    of the built-in teacher's), the `license:` of a local folder's README.md, or of a Hub
    model's card (from the Hub cache, else downloaded unless offline). Never raises: an
    unreadable source means "not recorded"."""
    try:
        if teacher.kind == "builtin":
            from retconvert.convert.sources import resolve_builtin

            return gguf_license(resolve_builtin(teacher.source))
        if teacher.kind == "gguf":
            return gguf_license(Path(teacher.source).expanduser())
        if teacher.kind == "folder":
            return card_license(Path(teacher.source).expanduser() / "README.md")
        if teacher.kind == "hub":
            readme = _hub_readme(teacher.source)
            return card_license(readme) if readme else None
    except Exception:  # a network failure, a malformed card or GGUF header: the license stays unknown
        return None
    return None


# ------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------


def _version() -> str:
    from retconvert import __version__

    return __version__


def conversion_record(teacher, options, report: Optional[dict], *, license: Optional[str]) -> dict:
    """`config.conversion` for a student converted from `teacher` (convert.sources.Teacher) with
    `options` (ConvertOptions); `report` is what `convert.student.convert()` returned (its
    `mean_rel_error` and `calibration_tokens`; None or without them: not calibrated here);
    `license` as `teacher_license(teacher)` finds it."""
    from retconvert.convert.families import family_for

    opts = asdict(options)
    opts["calib_data"] = source_name(opts.get("calib_data"))
    calibration = None
    if report and "mean_rel_error" in report:
        calibration = {"data": opts["calib_data"], "tokens": report.get("calibration_tokens"),
                       "seq_len": options.calib_seq_len, "mean_rel_error": float(report["mean_rel_error"])}
    teacher_id = teacher.base_model if teacher.kind in ("hub", "builtin") else _name(str(teacher.base_model))
    return {"schema": SCHEMA, "teacher": teacher_id, "kind": teacher.kind,
            "family": family_for(teacher.model.config).model_type, "license": license_id(license),
            "options": opts, "calibration": calibration, "retconvert_version": _version()}


def _stage1(cfg, result: dict) -> dict:
    s1 = cfg.stage1
    steps = result.get("stage1_steps", s1.steps)  # it may stop early (converged)
    settings = {k: v for k, v in asdict(s1).items() if k not in ("steps", "log_every")}
    return {"name": STAGE1, "steps": steps, "tokens": steps * s1.micro_batch_size * s1.seq_len,
            "final_loss": result.get("stage1_loss"), "settings": settings}


def _stage2(cfg, result: dict, world_size: int, distilled: bool) -> dict:
    s2 = cfg.stage2
    settings = {k: v for k, v in asdict(s2).items() if k not in ("steps", "logit_cache_dir")}
    if s2.finetune != "lora":
        settings = {k: v for k, v in settings.items() if not k.startswith("lora_")}
    if not distilled:
        settings = {k: v for k, v in settings.items() if k not in ("temperature", "alpha") and
                    not k.startswith("logit_cache")}
    rows = s2.micro_batch_size * s2.grad_accum * world_size  # sequences per optimizer step, all processes
    return {"name": STAGE2 if distilled else SCRATCH, "steps": s2.steps, "tokens": s2.steps * rows * cfg.data.seq_len,
            "final_loss": result.get("final_loss"), "settings": {**settings, "seq_len": cfg.data.seq_len,
                                                                   "world_size": world_size}}


def _student(origin: dict) -> dict:
    if "scratch" in origin:
        return {"init": "scratch", **origin["scratch"]}
    if "student" in origin:
        return {"init": "checkpoint", "name": _name(str(origin["student"]))}
    return {"init": "converted"}


def _eval(results: Optional[dict]) -> Dict[str, Dict[str, float]]:
    """The recipe's evaluate() output, {"heldout": 21.3, "teacher_heldout": 15.2}, as
    {"heldout": {"student": 21.3, "teacher": 15.2}}."""
    out: Dict[str, Dict[str, float]] = {}
    for key, value in (results or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            who, name = ("teacher", key[len("teacher_"):]) if key.startswith("teacher_") else ("student", key)
            out.setdefault(name, {})[who] = float(value)
    return out


def distillation_record(cfg, result: dict, *, origin: dict, world_size: int,
                        set_at_export: Optional[dict] = None) -> dict:
    """`config.distillation` for a finished run of the recipe: `cfg` the DistillConfig, `result`
    the trainer's result (stage1_loss, stage1_steps, final_loss, eval, params, trainable_params, wall_s),
    `origin` where the student came from (distill.models.build_student), `world_size` the
    number of processes, `set_at_export` the config fields the export changed (length caps,
    widened `retention_window`; recorded when not empty). Token counts are token positions
    fed to the student, all processes."""
    distilled = cfg.model.teacher is not None
    stages = []
    if distilled and cfg.stage1.steps > 0:
        stages.append(_stage1(cfg, result))
    if cfg.stage2.steps > 0:
        stages.append(_stage2(cfg, result, world_size, distilled))
    run = {"world_size": world_size, "dtype": cfg.run.dtype, "seed": cfg.run.seed,
           "deepspeed": source_name(cfg.run.deepspeed)}
    run.update({k: result[k] for k in ("params", "trainable_params", "wall_s") if k in result})
    record = {"schema": SCHEMA, "student": strip_local_paths(_student(origin)), "stages": stages,
              "tokens_seen": sum(s["tokens"] for s in stages),
              "data": {"train": [source_name(s) for s in cfg.data.train],
                       "eval": [source_name(s) for s in cfg.data.eval], "seq_len": cfg.data.seq_len},
              "eval": _eval(result.get("eval")), "run": run, "retconvert_version": _version()}
    if set_at_export:
        record["set_at_export"] = set_at_export
    return record


# ------------------------------------------------------------------------------------------
# Readers (any checkpoint, older ones included)
# ------------------------------------------------------------------------------------------


def _legacy_kind(teacher, source) -> str:
    """How an older record's teacher was given, from its `teacher` and `source`."""
    if not isinstance(teacher, str) or teacher.endswith(".gguf"):
        return "gguf"
    if _HUB_ID.match(teacher):
        return "hub"  # org/name: folders and files were recorded by their bare name
    if teacher == source and _BARE_HUB_ID.match(teacher) and not Path(teacher).exists():
        return "hub"  # a canonical id such as gpt2
    return "folder"


def read_conversion(config: dict, conversion_report: Optional[dict] = None) -> Optional[dict]:
    """config.json's `conversion` in the current schema (None when there is none). Older records
    ({"teacher", "source", "options", "retconvert_version"}) take family and calibration error
    from `conversion_report` (the conversion_report.json beside them), when given."""
    record = config.get("conversion") if isinstance(config, dict) else None
    if not isinstance(record, dict):
        return None
    if record.get("schema") == SCHEMA:
        return strip_local_paths(record)
    report = conversion_report if isinstance(conversion_report, dict) else {}
    teacher, source = record.get("teacher"), record.get("source")
    kind = _legacy_kind(teacher, source)
    options = dict(record.get("options")) if isinstance(record.get("options"), dict) else {}
    if "calib_data" in options:
        options["calib_data"] = source_name(options["calib_data"])
    calibration = None
    if isinstance(report.get("mean_rel_error"), (int, float)):
        calibration = {"data": options.get("calib_data"), "tokens": None, "seq_len": options.get("calib_seq_len"),
                       "mean_rel_error": float(report["mean_rel_error"])}
    return strip_local_paths({
        "schema": SCHEMA, "teacher": teacher if kind == "hub" or not isinstance(teacher, str) else _name(teacher),
        "kind": kind, "family": record.get("family") or report.get("family"),
        "license": license_id(record.get("license")), "options": options, "calibration": calibration,
        "retconvert_version": record.get("retconvert_version")})


def _legacy_distillation(record: dict) -> dict:
    """An older `distillation` ({"config", "origin", "result", "eval"}) in the current schema.
    The number of processes was not recorded, so token counts are unknown (None)."""
    cfg = record.get("config") if isinstance(record.get("config"), dict) else {}
    result = record.get("result") if isinstance(record.get("result"), dict) else {}
    section = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}  # noqa: E731
    model, data, run, s1, s2 = (section(n) for n in ("model", "data", "run", "stage1", "stage2"))
    distilled = model.get("teacher") is not None or not model
    stages = []
    if distilled and (s1.get("steps") or 0) > 0:
        stages.append({"name": STAGE1, "steps": s1["steps"], "tokens": None, "final_loss": result.get("stage1_loss"),
                       "settings": {k: v for k, v in s1.items() if k not in ("steps", "log_every")}})
    if (s2.get("steps") or 0) > 0:
        settings = {k: v for k, v in s2.items() if k not in ("steps", "logit_cache_dir")}
        stages.append({"name": STAGE2 if distilled else SCRATCH, "steps": s2["steps"], "tokens": None,
                       "final_loss": result.get("final_loss"),
                       "settings": {**settings, "seq_len": data.get("seq_len")}})
    origin = record.get("origin") if isinstance(record.get("origin"), dict) else {}
    names = lambda key: [source_name(s) for s in data.get(key) or [] if isinstance(s, str)]  # noqa: E731
    return {"schema": SCHEMA, "student": _student(origin), "stages": stages, "tokens_seen": None,
            "data": {"train": names("train"), "eval": names("eval"), "seq_len": data.get("seq_len")},
            "eval": _eval(record.get("eval")),
            "run": {"world_size": None, "dtype": run.get("dtype"), "seed": run.get("seed"),
                    "deepspeed": source_name(run.get("deepspeed")),
                    **{k: result[k] for k in ("params", "trainable_params", "wall_s") if k in result}},
            "retconvert_version": None}


def read_distillation(config: dict) -> Optional[dict]:
    """config.json's `distillation` in the current schema (None: not distilled)."""
    record = config.get("distillation") if isinstance(config, dict) else None
    if not isinstance(record, dict):
        return None
    return strip_local_paths(record if record.get("schema") == SCHEMA else _legacy_distillation(record))


def public_config(config: dict, conversion_report: Optional[dict] = None) -> dict:
    """config.json as it may be published: its records in the current schema, no local paths."""
    out = dict(config)
    if isinstance(config.get("conversion"), dict):
        out["conversion"] = read_conversion(config, conversion_report)
    if isinstance(config.get("distillation"), dict):
        out["distillation"] = read_distillation(config)
    return strip_local_paths(out)


def public_json(name: str, data: Any, config: dict, conversion_report: Optional[dict] = None) -> Any:
    """A JSON file of a checkpoint folder as it may be published: config.json through
    `public_config`, distillation.json as the config's record, anything else without local paths."""
    if name == "config.json" and isinstance(data, dict):
        return public_config(data, conversion_report)
    if name == "distillation.json" and isinstance(data, dict):
        return read_distillation({"distillation": data})
    return strip_local_paths(data)

