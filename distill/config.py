"""Distillation configuration: YAML files validated against dataclasses, plus `key=value` overrides.

    cfg = load_config("configs/distill/smollm2-135m.yaml", ["stage2.lr=3e-4", "run.seed=1"])

Every YAML key must be a field of the dataclasses below, with a value of the field's type;
anything else is a `ConfigError` naming the key and the expected type. Overrides use the
same dotted names (`section.key=value`, `model.convert.decay=retnet`); the value is parsed as
YAML (`1e-4`, `true`, `null`, `[a, b]`).

Data paths: never absolute in a YAML file. `${shared_data}` is replaced at run time by
`retconvert.paths.shared_data_dir()` (the offline data folder), `${repo}` by the repository
root; other relative paths are relative to the current directory; `hf:NAME:CONFIG:SPLIT`
streams a Hugging Face dataset.
"""

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from retconvert.convert.student import ConvertOptions  # noqa: F401  (the model.convert schema)
from retconvert.device import check_device
from retconvert.errors import RetconvertError


class ConfigError(RetconvertError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def _convert_options():
    """model.convert is convert.ConvertOptions itself, so the schema follows the converter."""
    from retconvert.convert.student import ConvertOptions

    return ConvertOptions()


@dataclass
class ScratchSection:
    """A model trained from scratch (model.teacher: null): a RetNet or a plain Llama Transformer."""

    arch: str = "retnet"  # "retnet" | "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True


@dataclass
class ModelSection:
    teacher: Optional[str] = "smollm2-135m"  # Hub ID, folder, GGUF, built-in name; null: from scratch
    student: Optional[str] = None  # a converted checkpoint folder; null: convert the teacher now
    tokenizer: Optional[str] = None  # from scratch only: tokenizer folder or Hub ID
    teacher_dtype: str = "float32"  # "float32" | "bfloat16"
    trust_remote_code: bool = False
    convert: "ConvertOptions" = field(default_factory=_convert_options)  # calib_data null: first train source
    scratch: ScratchSection = field(default_factory=ScratchSection)


@dataclass
class DataSection:
    train: List[str] = field(default_factory=list)  # text sources, interleaved (see train_weights)
    # None: one document from each source in turn (a source of long documents then dominates the
    # tokens); a list (one number per source): each source's share of the training tokens, the
    # next document always from the source furthest below its share
    train_weights: Optional[List[float]] = None
    eval: List[str] = field(default_factory=list)  # held-out perplexity sources (never trained on)
    text_field: str = "text"
    seq_len: int = 512
    shuffle_buffer: int = 256  # rows; 0 keeps the packed order
    mask_doc_boundaries: bool = True  # do not score the first token of a document (predicted from EOS)
    eval_tokens: int = 16384  # per eval source
    eval_window: int = 512
    eval_stride: int = 256
    eval_batch_size: int = 4


@dataclass
class Stage1Section:
    """Attention transfer: each layer's attention path regresses the teacher's attention output
    (after o_proj) on the teacher's own layer input (distill/attention_transfer.py)."""

    steps: int = 0  # the most steps; 0 skips the stage
    train: str = "full"  # "full": every attention-path parameter; "lora": low-rank deltas on its linear maps
    lr: float = 1e-2  # what retention adds (decay, score bias, sink, head norm, ...)
    proj_lr: float = 1e-4  # the linear maps (q, k, v, o, gate), or their low-rank deltas
    lora_rank: int = 8  # train: lora
    warmup_steps: int = 10  # linear warmup of both learning rates, then constant
    micro_batch_size: int = 4
    seq_len: int = 256
    log_every: int = 10
    eval_every: int = 0  # steps between held-out per-layer errors (on eval_rows rows set aside); 0: none
    eval_rows: int = 4
    patience: int = 0  # stop after this many evals without a min_improvement gain; 0: run all steps
    min_improvement: float = 0.01  # relative gain of the held-out mean error that counts as progress
    # compute dtype of this stage (bfloat16: teacher pass and retention under autocast); null: run.dtype.
    # Stage 1 is layer-local (every layer gets the teacher's input), so bf16 rounding does not
    # compound through depth as it does in stage 2 (docs/RESULTS.md, "bf16 and the student's gradients").
    dtype: Optional[str] = None


@dataclass
class Stage2Section:
    """Logit distillation (or plain next-token training without a teacher)."""

    steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    micro_batch_size: int = 4
    grad_accum: int = 1
    clip: float = 1.0  # max gradient norm; 0 disables
    fused_adamw: bool = True  # torch's fused AdamW kernel (same update, less time); false: the default one
    temperature: float = 2.0
    alpha: float = 0.0  # weight of next-token cross-entropy; 1 - alpha goes to the KL
    finetune: str = "full"  # "full" | "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    frozen: List[str] = field(default_factory=list)  # fnmatch patterns of parameter names not trained
    gradient_checkpointing: bool = False
    logit_cache: bool = False  # cache the teacher's top-k logits on disk (reused across runs)
    logit_cache_top_k: int = 64
    logit_cache_dir: Optional[str] = None  # default: <out_dir>/../logit-cache


@dataclass
class RunSection:
    out_dir: str = "outputs/distill/run"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start afresh in an out_dir that holds an earlier run (deletes it)
    device: str = "cpu"
    # "float32" | "bfloat16": stage 2 under autocast, student and teacher (fp32 master weights); DeepSpeed: its bf16
    dtype: str = "float32"
    deepspeed: Optional[str] = None  # DeepSpeed JSON (e.g. configs/deepspeed/zero2.json); null: plain torch
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 50  # steps; 0: never (only the final export)
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time passed since the last; 0: off
    eval_at_tokens: List[int] = field(default_factory=list)  # evaluate and checkpoint once stage 2 saw these tokens
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    save_final: bool = True
    # A converted student written out (final/, `python -m retconvert.distill.export`) caps the attention
    # sink's distance and every head's decay span at data.seq_len (RetNetConfig.max_sink_distance,
    # max_retention_span): uncapped, both degrade it past the length it trained on (docs/RESULTS.md). false: no caps
    length_caps: bool = True
    threads: int = 0  # torch.set_num_threads; 0 keeps the default


@dataclass
class DistillConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    stage1: Stage1Section = field(default_factory=Stage1Section)
    stage2: Stage2Section = field(default_factory=Stage2Section)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.teacher_dtype": ("float32", "bfloat16"),
    "model.scratch.arch": ("retnet", "llama"),
    "run.dtype": ("float32", "bfloat16"),
    "stage1.dtype": ("float32", "bfloat16"),
    "stage2.finetune": ("full", "lora"),
    "stage1.train": ("full", "lora"),
    "model.convert.decay": ("retnet", "calibrated"),
    "model.convert.head_norm": ("none", "rmsnorm", "groupnorm"),
    "model.convert.kv_heads": ("keep", "expand"),
    "model.convert.output_scale": ("fit", "one"),
    "model.convert.retention_mode": ("parallel", "chunkwise", "recurrent"),
}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        return f"{names} or null" if type(None) in args else names
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return tp.__name__


def _convert(value, tp, key: str):
    """Check `value` against the annotation `tp`; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # the first alternative that accepts the value
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for alternative in (a for a in args if a is not type(None)):
            try:
                return _convert(value, alternative, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp not in (bool, int, float, str):  # an annotation this checker does not know: accept as is
        return value
    if tp is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not supported; use one of {', '.join(CHOICES[key])}")
    return float(value) if tp is float else value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'; {prefix.rstrip('.') or 'the top level'} "
                              f"accepts {', '.join(names)}")
    kwargs = {name: _convert(data[name], hints[name], prefix + name) for name in names if name in data}
    return cls(**kwargs)


def weights_problem(weights: Optional[List[float]], sources: int) -> Optional[str]:
    """Why `weights` cannot give `sources` training sources their token shares; None if they can."""
    if weights is None:
        return None
    if len(weights) != sources or not all(math.isfinite(w) and w > 0 for w in weights):
        return f"{list(weights)} must give one finite positive number per training source ({sources}), e.g. [1, 1]"
    return None


def _check_ranges(cfg: DistillConfig):
    def positive(key, value, zero_ok=False):
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(f"{key}: {value} must be {'>= 0' if zero_ok else '> 0'}")

    positive("data.seq_len", cfg.data.seq_len)
    positive("stage2.steps", cfg.stage2.steps, zero_ok=True)
    positive("stage2.micro_batch_size", cfg.stage2.micro_batch_size)
    positive("stage2.grad_accum", cfg.stage2.grad_accum)
    positive("stage2.temperature", cfg.stage2.temperature)
    positive("stage1.steps", cfg.stage1.steps, zero_ok=True)
    positive("stage1.micro_batch_size", cfg.stage1.micro_batch_size)
    positive("stage1.seq_len", cfg.stage1.seq_len)
    positive("stage1.lora_rank", cfg.stage1.lora_rank)
    positive("stage1.eval_every", cfg.stage1.eval_every, zero_ok=True)
    positive("stage1.eval_rows", cfg.stage1.eval_rows)
    positive("stage1.patience", cfg.stage1.patience, zero_ok=True)
    positive("run.checkpoint_minutes", cfg.run.checkpoint_minutes, zero_ok=True)
    for tokens in cfg.run.eval_at_tokens:
        positive("run.eval_at_tokens", tokens, zero_ok=True)
    if cfg.stage1.patience > 0 and cfg.stage1.eval_every == 0:
        raise ConfigError("stage1.patience needs held-out evals; set stage1.eval_every (e.g. 25)")
    positive("run.checkpoint_every", cfg.run.checkpoint_every, zero_ok=True)
    if cfg.data.eval_window < 2:  # a window scores its tokens after the first: at least one
        raise ConfigError(f"data.eval_window: {cfg.data.eval_window} must be at least 2 "
                          "(one context token, one scored)")
    if not 0.0 <= cfg.stage2.alpha <= 1.0:
        raise ConfigError(f"stage2.alpha: {cfg.stage2.alpha} must be in [0, 1]")
    if len(cfg.stage2.betas) != 2:
        raise ConfigError("stage2.betas: expected two numbers, e.g. [0.9, 0.95]")
    if not cfg.data.train:
        raise ConfigError("data.train: give at least one training text source")
    problem = weights_problem(cfg.data.train_weights, len(cfg.data.train))
    if problem:
        raise ConfigError(f"data.train_weights: {problem}; or null for one document from each in turn")
    if cfg.model.teacher is None and cfg.model.student is None and cfg.model.tokenizer is None:
        raise ConfigError("model.tokenizer: training from scratch (model.teacher: null) needs a tokenizer")


def _check_relative(data: dict, source: Path):
    """Data paths written in a YAML file must not be absolute (overrides may be)."""
    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    for key in ("train", "eval"):
        paths = section.get(key) or []
        for p in paths if isinstance(paths, list) else [paths]:
            if isinstance(p, str) and os.path.isabs(p):
                raise ConfigError(f"{source}: data.{key} entry {p} is absolute; use ${{shared_data}}/... "
                                  "or a path relative to the working directory")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def parse_override(text: str):
    """`section.key=value` -> (["section", "key"], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. stage2.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key such as stage2.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: List[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _shipped_recipes() -> str:
    """`; the shipped recipes: configs/distill/a.yaml, ...` when run from a checkout, else ''."""
    from retconvert.paths import REPO_ROOT

    names = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "configs" / "distill").glob("*.yaml"))
    return f" (the shipped recipes: {', '.join(names)})" if names else ""


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    """The mapping of sections a YAML config holds. A file may start from another with a top-level
    `base: other.yaml` (relative to itself): its own sections are merged into the base's key by key,
    its values (lists included) replacing the base's."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; check the path{_shipped_recipes()}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: its base chain returns to itself; remove one of the base: keys")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    _check_relative(data, path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another YAML config, not {base!r}")
    return _merge(read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def _merge(base: dict, top: dict) -> dict:
    """`base` updated with `top`, section by section (nested mappings merged, other values replaced)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path=None, overrides: Optional[List[str]] = None) -> DistillConfig:
    """Read a YAML file (following its `base:`, if any; or start from the defaults), apply
    overrides, validate."""
    data = read_yaml(Path(path)) if path is not None else {}
    cfg = config_from_dict(apply_overrides(data, overrides or []))
    cfg.model.convert.validate(spell=lambda name: f"model.convert.{name}")  # before any model loads
    check_device(cfg.run.device, "run.device", need_available=False)  # this machine's devices: Trainer.setup
    return cfg


def config_from_dict(data: dict, source: str = "the config") -> DistillConfig:
    """A DistillConfig from its `to_dict()` form (a run's config.json), validated like a YAML file's."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    cfg = _build(DistillConfig, data)
    _check_ranges(cfg)
    return cfg


def resolve_path(spec: Optional[str]) -> Optional[str]:
    """Expand `${shared_data}` / `${repo}` and a leading `~`; leave `hf:` specs alone; relative
    paths stay relative to CWD."""
    if spec is None or spec.startswith("hf:"):
        return spec
    from retconvert.paths import REPO_ROOT, shared_data_dir

    return os.path.expanduser(spec).replace("${shared_data}", str(shared_data_dir())).replace("${repo}", str(REPO_ROOT))
