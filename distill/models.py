"""Teacher, student and from-scratch models for distillation.

Student sources, in order: `model.student` (a converted checkpoint folder), else the teacher
converted now with `convert.convert()` (options from `model.convert`), else (no teacher) a
model built from `model.scratch`: a RetNet, or a plain Llama Transformer for comparison.
"""

from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from retconvert.distill.config import DistillConfig, resolve_path
from retconvert.errors import RetconvertError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}



def _retention_suffixes() -> tuple:
    """What retention adds to a converted Transformer (convert.families.NEW_PARAMETERS): the
    parameters stage 1 trains, as name suffixes such as 'retention.decay_logit'."""
    from retconvert.convert.families import NEW_PARAMETERS

    return tuple(key.split("{i}.", 1)[1] for key in NEW_PARAMETERS)


def load_teacher_model(cfg: DistillConfig, log=print):
    from retconvert.convert.sources import load_teacher

    source = cfg.model.teacher
    local = resolve_path(source)
    if local is not None and Path(local).exists():
        source = local
    log(f"loading teacher {source}")
    return load_teacher(source, dtype=DTYPES[cfg.model.teacher_dtype], device=cfg.run.device,
                        trust_remote_code=cfg.model.trust_remote_code)


def build_student(cfg: DistillConfig, teacher, log=print, calibrate: bool = True,
                  tokenizer=None) -> Tuple[nn.Module, dict]:
    """The student in fp32 on `run.device`, and a report of where it came from.

    `calibrate=False` (resuming: the weights come from a checkpoint) only maps the teacher's
    weights, skipping the calibration pass. Without a teacher or `model.student`, a model from
    scratch sized for `tokenizer`."""
    import retconvert  # noqa: F401  (registers the RetNet Auto classes)

    if cfg.model.student is not None:
        from transformers import AutoModelForCausalLM

        path = Path(resolve_path(cfg.model.student))
        if not (path / "config.json").is_file():
            raise RetconvertError(f"model.student: {path} is not a checkpoint folder (no config.json); "
                                  "pass a `retconvert from-hf` output or null to convert now")
        log(f"loading student {path}")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.to(cfg.run.device), {"student": str(path)}
    if teacher is None:
        return scratch_model(cfg, tokenizer), {"scratch": asdict(cfg.model.scratch)}
    from retconvert.convert.student import ConvertOptions, convert

    options = ConvertOptions(**asdict(cfg.model.convert))
    if options.calib_data is None:
        options.calib_data = resolve_path(cfg.data.train[0])
    else:
        options.calib_data = resolve_path(options.calib_data)
    if teacher.model.dtype != torch.float32:
        raise RetconvertError("converting on the fly needs model.teacher_dtype=float32; convert first with "
                              "`retconvert from-hf` and pass model.student")
    if calibrate:
        student, report = convert(teacher, options, log=log)
    else:
        from retconvert.convert.student import build_student as map_teacher

        options.validate()
        student, report = map_teacher(teacher.model, options), {"resumed": "calibration skipped"}
    from retconvert.provenance import conversion_record, teacher_license

    student.config.conversion = conversion_record(teacher, options, report, license=teacher_license(teacher))
    return student.float().to(cfg.run.device), {"converted": report}


def scratch_model(cfg: DistillConfig, tokenizer) -> nn.Module:
    sc = cfg.model.scratch
    vocab = cfg_vocab(tokenizer) if tokenizer is not None else None
    if vocab is None:
        raise RetconvertError("a model from scratch needs its tokenizer first")
    common = dict(vocab_size=vocab, hidden_size=sc.hidden_size, num_hidden_layers=sc.num_layers,
                  num_attention_heads=sc.num_heads, intermediate_size=sc.intermediate_size,
                  max_position_embeddings=sc.max_position_embeddings, initializer_range=sc.initializer_range,
                  tie_word_embeddings=sc.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if sc.hidden_size % sc.num_heads:
        raise RetconvertError(f"model.scratch.hidden_size={sc.hidden_size} is not divisible by "
                              f"model.scratch.num_heads={sc.num_heads}")
    if sc.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(hidden_act="silu", **common)).to(cfg.run.device)
    from retconvert.models import RetNetConfig, RetNetForCausalLM

    config = RetNetConfig(hidden_act="silu", mlp_type="glu", norm_type="rmsnorm", position_embedding_type="rotary",
                          value_factor=1, head_norm="groupnorm", head_norm_affine=True, learnable_decay=True,
                          retention_mode="chunkwise", chunk_size=64, use_output_gate=True, **common)
    return RetNetForCausalLM(config).to(cfg.run.device)


def cfg_vocab(tokenizer) -> int:
    return len(tokenizer)


def load_scratch_tokenizer(cfg: DistillConfig):
    from transformers import AutoTokenizer

    from retconvert.convert.sources import BUILTIN_TEACHERS, resolve_builtin

    source = resolve_path(cfg.model.tokenizer or cfg.model.student)  # a student folder carries its tokenizer
    try:
        if source in BUILTIN_TEACHERS:  # the tokenizer inside the built-in teacher's GGUF
            path = resolve_builtin(source)
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(source)
    except RetconvertError:
        raise
    except Exception as e:
        raise RetconvertError(f"model.tokenizer: cannot load {source} ({type(e).__name__}); "
                              "pass a tokenizer folder") from None


def retention_parameters(student: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) for every retention-only parameter of a RetNet student."""
    suffixes = _retention_suffixes()
    return [(n, p) for n, p in student.named_parameters() if n.endswith(suffixes)]


def count_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def wrap_lora(student: nn.Module, cfg: DistillConfig, log=print):
    """peft LoRA on `stage2.lora_targets`; retention's own parameters stay fully trainable.
    A targeted output head tied to the input embeddings is untied first (see `untie_lora_targets`)."""
    from peft import LoraConfig, get_peft_model

    s2 = cfg.stage2
    untie_lora_targets(student, s2.lora_targets, log)
    lora = LoraConfig(r=s2.lora_rank, lora_alpha=s2.lora_alpha, target_modules=list(s2.lora_targets),
                      lora_dropout=0.0, bias="none")
    model = get_peft_model(student, lora)
    for _, p in retention_parameters(model):
        p.requires_grad_(True)
    return model


def untie_lora_targets(model: nn.Module, targets: List[str], log=print):
    """Give each LoRA target whose weight another module shares (a head tied to the input
    embeddings) its own copy, and record the untying in the config (`tie_word_embeddings`), so
    that merging changes that module alone and the merged model computes what the adapter
    model did (merging into a tied weight would change the embeddings too). Targets match as
    peft matches a list: a module name equal to a target or ending in "." + target.
    RetconvertError for a shared weight other than the output head's, which no config field unties."""
    owners: dict = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        sharing = [n for n in owners.get(id(getattr(module, "weight", None)), []) if n != name]
        if not sharing:
            continue
        if module is not head:
            raise RetconvertError(f"stage2.lora_targets: {name} shares its weight with {', '.join(sharing)}, so "
                                  "merging its LoRA update would change them too; drop it from the targets")
        module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
        model.config.tie_word_embeddings = False
        log(f"LoRA on {name}: untied it from {', '.join(sharing)} (its own copy, "
            f"{module.weight.numel() / 1e6:.2f}M more parameters), so that merging leaves the embeddings as they are")


def trained_student(model: nn.Module, cfg: DistillConfig, state: dict, lora: bool, log=print) -> nn.Module:
    """`model` with a trained `state` loaded (wrapped in LoRA first when `state` holds peft's keys,
    merged after): the plain fp32 model in eval mode that exports write."""
    if lora:
        model = wrap_lora(model, cfg, log=log)
    model.load_state_dict(state)
    return unwrap(model).float().eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model: LoRA merged into the weights, peft removed."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


class LowRankDelta(nn.Module):
    """y = base(x) + x A^T B^T with B = 0 at start: a LoRA delta without peft, merged by `merge()`."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        self.base.weight.add_((self.B @ self.A).to(self.base.weight.dtype))
        return self.base


# RetNetConfig fields an export may set (tokens), with their smallest value
LENGTH_CAPS = {"max_sink_distance": 0, "max_retention_span": 2}


def default_length_caps(cfg: DistillConfig, model: nn.Module, stage: int = 2) -> dict:
    """{LENGTH_CAPS field: tokens} that a written-out student of this run gets unless told
    otherwise: both at the length of the rows it last trained on (stage 2: data.seq_len; a
    stage-1 result: stage1.seq_len) for a RetNet distilled from a teacher with run.length_caps,
    none otherwise (a RetNet trained from scratch keeps its designed decays; another
    architecture has no retention)."""
    if not cfg.run.length_caps or cfg.model.teacher is None or getattr(model.config, "model_type", None) != "retnet":
        return {}
    return {name: cfg.data.seq_len if stage == 2 else cfg.stage1.seq_len for name in LENGTH_CAPS}


def check_length_caps(caps: dict) -> dict:
    """`caps` ({LENGTH_CAPS field: tokens}) without its None values; RetconvertError for a value
    below its minimum."""
    caps = {k: v for k, v in caps.items() if v is not None}
    for name, value in caps.items():
        if name not in LENGTH_CAPS or value < LENGTH_CAPS[name]:
            raise RetconvertError(f"--{name.replace('_', '-')} {value} must be at least {LENGTH_CAPS.get(name, 0)} "
                                  "tokens; give e.g. the training rows' length (data.seq_len)")
    return caps


def check_widening(layers: Sequence[int], window: Optional[int] = None):
    """What `widen_layers` can check before any model loads: RetconvertError for a negative or
    repeated layer index, a window below 1 token, or a window without layers."""
    if window is not None and not layers:
        raise RetconvertError(f"--full-attention-window {window} applies to --full-attention-layers, which is not "
                              "given; name the layers (e.g. --full-attention-layers 14,17) or leave the window out")
    if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
        raise RetconvertError(f"--full-attention-layers {','.join(map(str, layers))}: give distinct layer indices "
                              "from 0 (0-based)")
    if window is not None and window < 1:
        raise RetconvertError(f"--full-attention-window {window} must be at least 1 token; give e.g. the longest "
                              "context to serve (default: max_position_embeddings)")


def widen_layers(model: nn.Module, layers: Sequence[int], window: Optional[int] = None) -> dict:
    """Make `layers` (indices) full-attention layers of a RetNet: their retention window becomes
    `window` tokens (default: config.max_position_embeddings), so within it they are the exact
    softmax attention of the teacher's layer (the decayed state holds only what left the window),
    with a KV cache of that many tokens when decoding: a hybrid, the trade Mamba-in-the-Llama
    makes. Returns {"retention_window": [one per layer]} for the export record ({} for no
    layers); RetconvertError for a model without retention, an index out of range or repeated,
    a window below 1 or below a layer's own. The weights are unchanged."""
    check_widening(layers, window)
    if not layers:
        return {}
    config = model.config
    if getattr(config, "model_type", None) != "retnet":
        raise RetconvertError(f"--full-attention-layers: the model is a {config.model_type}, which has no "
                              "retention layers; leave the option out")
    n = config.num_hidden_layers
    if max(layers) >= n:
        raise RetconvertError(f"--full-attention-layers {','.join(map(str, layers))}: layer {max(layers)} is out of "
                              f"range; this model's layers are 0 to {n - 1}")
    width = config.max_position_embeddings if window is None else window
    if config.retention_normalization != "paper":
        raise RetconvertError("--full-attention-layers needs retention_normalization 'paper' (a converted student "
                              "has it); this RetNet was built without it")
    windows = config.layer_windows
    narrower = [i for i in layers if windows[i] > width]
    if narrower:
        raise RetconvertError(f"--full-attention-window {width} is narrower than layer {narrower[0]}'s window of "
                              f"{windows[narrower[0]]} tokens; give a longer window or leave the option out")
    for i in layers:
        windows[i] = width
    config.retention_window = windows
    return {"retention_window": windows}


def apply_length_caps(model: nn.Module, caps: dict) -> dict:
    """Set `caps` (see `check_length_caps`) in a RetNet's config and return them; RetconvertError
    for a model without retention."""
    caps = check_length_caps(caps)
    if caps and getattr(model.config, "model_type", None) != "retnet":
        raise RetconvertError(f"--{next(iter(caps)).replace('_', '-')}: the model is a {model.config.model_type}, "
                              "which has no retention; leave the option out")
    for name, value in caps.items():
        setattr(model.config, name, value)
    return caps
