"""Convert a Transformer teacher into a RetNet student and write a loadable checkpoint.

    teacher --(family key table)--> student weights
            --(calibration text)--> decay, score bias and output scale per head
            --(atomic write)------> save_pretrained folder + tokenizer + model card
"""

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from retconvert.convert.calibrate import calibrate
from retconvert.convert.families import (NEW_PARAMETERS, Family, check_config, family_for, map_state_dict,
                                         teacher_windows)
from retconvert.convert.sources import Teacher
from retconvert.data import iter_texts, token_stream
from retconvert.errors import RetconvertError
from retconvert.hub import write_card
from retconvert.models import RetNetConfig, RetNetForCausalLM
from retconvert.paths import atomic_output_dir, shared_data_dir
from retconvert.provenance import conversion_record, strip_local_paths, teacher_license

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def flag(name: str) -> str:
    """A ConvertOptions field as its `retconvert from-hf` flag: chunk_size -> --chunk-size."""
    return "--" + name.replace("_", "-")


@dataclass
class ConvertOptions:
    """How retention replaces attention. Defaults are the settings that measured best
    on SmolLM2 (docs/RESULTS.md)."""

    decay: str = "calibrated"  # "retnet": the paper's 1 - 2^(-5-h); "calibrated": fitted per head
    score_bias: bool = True  # scores b + q.k (b fitted with calibration, else 1)
    sink: bool = True  # a never-decaying sink key/value per head, fitted with calibration
    head_norm: str = "none"  # "none" | "rmsnorm" | "groupnorm"; each followed by a per-head scale
    kv_heads: str = "keep"  # grouped-query K/V: "keep" the teacher's (fewer bytes per token) or "expand" per head
    output_scale: str = "fit"  # "fit": least squares to the attention output; "one": 1
    gate: bool = False  # the paper's swish gate, untrained (random) at conversion
    retention_mode: str = "chunkwise"
    chunk_size: int = 64
    # W > 0: exact softmax over each layer's last W tokens beside the decayed state; a list: one W per
    # layer (0: pure retention); "teacher": the teacher's own sliding window on its sliding layers,
    # pure retention on its global ones
    window: Union[int, str, List[int]] = 0
    calib_data: Optional[str] = None  # text source; default: the offline C4 sample, else C4 online
    calib_tokens: int = 8192
    calib_seq_len: int = 512

    def validate(self, spell: Callable[[str], str] = flag):
        """Raise RetconvertError on an unsupported value, naming the option as `spell(field)` writes
        it: `--chunk-size` for the CLI (the default), `model.convert.chunk_size` for a distill config."""
        choices = {"decay": ("retnet", "calibrated"), "head_norm": ("none", "rmsnorm", "groupnorm"),
                   "output_scale": ("fit", "one"), "kv_heads": ("keep", "expand")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RetconvertError(f"{spell(name)} {getattr(self, name)!r} is not supported; "
                                      f"use one of {', '.join(allowed)}")
        if self.chunk_size <= 0:
            raise RetconvertError(f"{spell('chunk_size')} {self.chunk_size} must be positive; use e.g. 64")
        windows = self.window if isinstance(self.window, list) else [self.window]
        if self.window != "teacher" and not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0
                                                for w in windows):
            raise RetconvertError(f"{spell('window')} {self.window} must be 0 (pure RetNet), a token count such as "
                                  "64, one per layer, or 'teacher' (the teacher's sliding window on its sliding "
                                  "layers)")
        if self.calib_tokens < self.calib_seq_len or self.calib_seq_len < 2:
            raise RetconvertError(f"calibration needs calib_tokens >= calib_seq_len >= 2; raise "
                                  f"{spell('calib_tokens')}")

    @property
    def needs_calibration(self) -> bool:
        return self.decay == "calibrated" or self.output_scale == "fit" or self.score_bias or self.sink


def student_windows(teacher_config, window: Union[int, str, List[int]]) -> Union[int, list]:
    """`retention_window` of the student: the option's W for every layer (or its W per layer), or
    with "teacher" the teacher's sliding window on each sliding layer and 0 (pure retention) on
    the others."""
    layers = teacher_config.num_hidden_layers
    if isinstance(window, list) and len(window) != layers:
        raise RetconvertError(f"the window option (--window, model.convert.window) gives {len(window)} windows "
                              f"for a teacher of {layers} layers; give {layers}, one per layer, or one for all")
    if window != "teacher":
        return window
    windows = teacher_windows(teacher_config)
    if not any(windows):
        raise RetconvertError(f"window 'teacher' (--window, model.convert.window): this {teacher_config.model_type} "
                              "teacher has no sliding-window layer (every layer attends to the whole context); "
                              "use window 0 (pure RetNet) or a token count such as 64")
    return windows


def student_config(teacher_config, options: ConvertOptions) -> RetNetConfig:
    family = family_for(teacher_config)
    check_config(family, teacher_config)  # every field that changes the maths is carried over, or refused here
    kwargs = family.retnet_config(teacher_config)
    if options.kv_heads == "expand":  # one key/value head per query head, as in the paper's RetNet
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    return RetNetConfig(
        **kwargs,
        value_factor=1,
        retention_mode=options.retention_mode,
        chunk_size=options.chunk_size,
        retention_window=student_windows(teacher_config, options.window),
        learnable_decay=True,
        retention_normalization="paper",
        head_norm=options.head_norm,
        head_norm_affine=True,
        score_bias=options.score_bias,
        attention_sink=options.sink,
        use_output_gate=options.gate,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=getattr(teacher_config, "pad_token_id", None),
    )


def build_student(teacher_model, options: ConvertOptions) -> RetNetForCausalLM:
    """Map the teacher's weights; new retention parameters get their default initialisation."""
    family = family_for(teacher_model.config)
    config = student_config(teacher_model.config, options)
    student = RetNetForCausalLM(config)
    if options.score_bias:
        for block in student.model.layers:
            torch.nn.init.ones_(block.retention.score_bias)
    mapped = map_state_dict(family, teacher_model.state_dict(), teacher_model.config)
    if options.kv_heads == "expand":
        mapped = expand_kv_heads(mapped, teacher_model.config)
    load_mapped(student, mapped)
    return student


def expand_kv_heads(mapped: dict, teacher_config) -> dict:
    """Grouped-query K/V repeated for the query heads each serves: exact, since query head h
    of a Llama reads kv head h // (H / Hkv), which is what repeat_interleave produces."""
    H = teacher_config.num_attention_heads
    Hkv = getattr(teacher_config, "num_key_value_heads", None) or H
    if H == Hkv:
        return mapped
    out = dict(mapped)
    for key, tensor in mapped.items():
        if re.search(r"\.retention\.[kv]_proj\.(weight|bias)$", key):
            rows = tensor.view(Hkv, -1, *tensor.shape[1:])  # (Hkv, D, ...)
            out[key] = rows.repeat_interleave(H // Hkv, dim=0).flatten(0, 1).contiguous()
    return out


def load_mapped(student: RetNetForCausalLM, mapped: dict):
    """Load mapped tensors; anything the student lacks from the teacher must be a new parameter."""
    own = student.state_dict()
    unexpected = sorted(set(mapped) - set(own))
    if unexpected:
        raise RetconvertError(f"the key table produced {unexpected[0]}, which the student does not have; "
                              "the family's table and the RetNet config disagree")
    for key, tensor in mapped.items():
        if own[key].shape != tensor.shape:
            raise RetconvertError(f"{key}: teacher shape {tuple(tensor.shape)} != student shape "
                                  f"{tuple(own[key].shape)}; the family's config mapping is wrong")
    new = [re.compile("^" + re.escape(t).replace(r"\{i\}", r"\d+") + "$") for t in NEW_PARAMETERS]
    tied = {"lm_head.weight"} if student.config.tie_word_embeddings else set()
    missing = [k for k in own if k not in mapped and k not in tied and not any(p.match(k) for p in new)]
    if missing:
        raise RetconvertError(f"no teacher tensor maps to {missing[0]} ({len(missing)} in all); "
                              "the family's key table is incomplete")
    student.load_state_dict(mapped, strict=False)
    if student.config.tie_word_embeddings:
        student.tie_weights()


def calibration_ids(tokenizer, options: ConvertOptions) -> torch.Tensor:
    """Calibration text as (N, calib_seq_len) token rows, documents joined by EOS."""
    spec = options.calib_data
    if spec is None:
        local = shared_data_dir() / "c4" / "c4_train_sample.jsonl"
        spec = str(local) if local.is_file() else "hf:allenai/c4:en:train"
    ids = token_stream(iter_texts(spec), tokenizer, options.calib_tokens, separator_id=tokenizer.eos_token_id)
    rows = len(ids) // options.calib_seq_len
    if rows == 0:
        raise RetconvertError(f"calibration text {spec} gave only {len(ids)} tokens; need {options.calib_seq_len}")
    return torch.tensor(ids[: rows * options.calib_seq_len]).view(rows, options.calib_seq_len)


def convert(teacher: Teacher, options: ConvertOptions, log=print):
    """Teacher -> calibrated student. Returns (student, report dict)."""
    options.validate()
    t0 = time.time()
    family: Family = family_for(teacher.model.config)
    log(f"converting {teacher.source} ({family.model_type}: {family.notes})")
    student = build_student(teacher.model, options).to(teacher.model.device)
    if options.window == "teacher":
        windows = student.config.layer_windows
        log(f"keeping the teacher's sliding window: {sum(map(bool, windows))} of {len(windows)} layers windowed "
            f"({', '.join(sorted({f'{w} tokens' for w in windows if w}))}), the others pure retention")
    # notes: what carries over and what retention replaces (e.g. a sliding window), for the record
    report = {"family": family.model_type, "family_notes": family.notes, "options": asdict(options), "layers": []}
    if options.needs_calibration:
        ids = calibration_ids(teacher.tokenizer, options)
        log(f"calibrating on {ids.numel()} tokens ({ids.shape[0]} x {ids.shape[1]})")
        fits = calibrate(student, teacher.model, family, ids, fit_decay=options.decay == "calibrated",
                         fit_bias=options.score_bias, log=log)
        if options.output_scale == "one":
            for block in student.model.layers:
                torch.nn.init.ones_(block.retention.head_norm_weight)
        report["layers"] = [asdict(f) for f in fits]
        report["mean_rel_error"] = sum(f.rel_error for f in fits) / len(fits)
        report["calibration_tokens"] = ids.numel()
    report["seconds"] = round(time.time() - t0, 1)
    return student, report


def save_checkpoint(student: RetNetForCausalLM, teacher: Teacher, options: ConvertOptions, report: dict,
                    out: Path, dtype: str = "float32", force: bool = False):
    """Write the student, its code, tokenizer, generation config, conversion report and model
    card (`retconvert.hub.write_card`, from the provenance record), atomically."""
    student.config.conversion = conversion_record(teacher, options, report, license=teacher_license(teacher))
    with atomic_output_dir(out, force=force) as tmp:
        student.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        teacher.tokenizer.save_pretrained(tmp)
        gen = getattr(teacher.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        (tmp / "conversion_report.json").write_text(json.dumps(strip_local_paths(report), indent=2))
        write_card(tmp, Path(out).name)
    return out
