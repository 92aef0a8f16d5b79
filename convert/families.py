"""Source families: how a Transformer's config and tensors map onto a RetNet.

One `Family` per `config.model_type`. Its key table maps every teacher tensor name (with
`{i}` for the layer index) to one of:
    "student.key"        copied as is,
    None                 dropped on purpose (e.g. a tied lm_head, a causal-mask buffer),
    a Transform          reshaped or split into one or more student tensors.
A teacher tensor that matches no entry is an error: nothing is lost silently.

Student parameters that retention adds (decay, score bias, head norm scale, gate) have no
teacher counterpart; `NEW_PARAMETERS` lists them with their initialisation.

Config fields get the same treatment as tensors: every field of the teacher's config is
listed, in `COMMON_FIELDS` or the family's own table, as carried over (MAPPED), without
effect on the forward pass (INERT), part of the softmax attention that retention replaces
(REPLACED), the sliding window (WINDOW: kept per layer with `--window teacher`, see
`teacher_windows`, else replaced), or accepted only at the values the RetNet can express
(`Only`). A field that is not listed (a new transformers release, a fork) stops the conversion
with its name.
"""

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from transformers import PretrainedConfig

from retconvert.errors import RetconvertError

Tensor = torch.Tensor

NEW_PARAMETERS = {
    "model.layers.{i}.retention.decay_logit": "logit(gamma): the paper's schedule or calibrated per head",
    "model.layers.{i}.retention.score_bias": "per-head score offset b (scores b + q.k): calibrated, or 1",
    "model.layers.{i}.retention.head_norm_weight": "per-head output scale: least squares to the attention output, or 1",
    "model.layers.{i}.retention.head_norm_bias": "0 (groupnorm only)",
    "model.layers.{i}.retention.sink_key": "the teacher's first-token key, averaged over calibration rows",
    "model.layers.{i}.retention.sink_value": "the teacher's first-token value, averaged over calibration rows",
    "model.layers.{i}.retention.sink_weight": "calibrated per head (0: no sink)",
    "model.layers.{i}.retention.g_proj.weight": "swish gate (only with --gate on): normal(0, initializer_range)",
}


@dataclass
class Transform:
    """Turn one teacher tensor into student tensors: fn(tensor, hf_config) -> {suffix: tensor}.

    `targets` holds student key templates with `{}` for the suffix (e.g. q/k/v).
    """

    target: str
    fn: Callable[[Tensor, object], Dict[str, Tensor]]

    def __call__(self, tensor: Tensor, hf_config, layer: Optional[str]) -> Dict[str, Tensor]:
        return {self.target.format(part, i=layer): t for part, t in self.fn(tensor, hf_config).items()}


Target = Union[str, None, Transform]


MAPPED = "mapped"  # carried over exactly by the family's retnet_config
INERT = "inert"  # no effect on the forward pass in eval mode (dropout, initialisation, token ids, bookkeeping)
REPLACED = "replaced"  # a detail of softmax attention, which retention replaces as a whole
# the sliding window: each sliding layer's window becomes its retention window with --window teacher
# (`teacher_windows`); otherwise retention replaces it, the decay playing its role
WINDOW = "window"


@dataclass(frozen=True)
class Only:
    """A field the RetNet can express at `values` only; any other value is refused, naming `why`."""

    values: tuple
    why: str


Rule = Union[str, Only]


@dataclass
class Family:
    """How one `model_type` converts. See the module docstring."""

    model_type: str
    keys: Dict[str, Target]
    retnet_config: Callable[[object], dict]
    attention_output: str  # the teacher module whose *input* is the attention output, per layer
    fields: Dict[str, Rule]  # the family's config fields, besides COMMON_FIELDS
    notes: str = ""
    _patterns: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        for template, target in self.keys.items():
            regex = "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
            self._patterns.append((re.compile(regex), template, target))

    def match(self, key: str):
        for regex, template, target in self._patterns:
            m = regex.match(key)
            if m:
                return template, target, m.groupdict().get("i")
        return None


# --------------------------------------------------------------------------------------------
# Tensor transforms
# --------------------------------------------------------------------------------------------


def conv1d(tensor: Tensor, _cfg) -> Dict[str, Tensor]:
    """GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in)."""
    return {"": tensor.t().contiguous() if tensor.dim() == 2 else tensor}


def split_c_attn(tensor: Tensor, _cfg) -> Dict[str, Tensor]:
    """GPT-2's fused c_attn: (C, 3C) Conv1D weight or (3C,) bias -> q, k, v."""
    if tensor.dim() == 2:
        tensor = tensor.t()  # (3C, C)
    q, k, v = tensor.chunk(3, dim=0)
    return {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()}


def rotary_permutation(head_dim: int, rotary_dim: int) -> Tensor:
    """Channel order that turns a teacher rotating its first `rotary_dim` channels of a head in
    halves (pairs (i, i + r/2), GPT-NeoX / Phi-3) into the student's layout, which pairs
    (i, i + D/2) and leaves the pairs past partial_rotary_factor * D/2 unrotated:
    [rot first half, pass first half, rot second half, pass second half]."""
    r, p = rotary_dim // 2, (head_dim - rotary_dim) // 2
    idx = torch.arange(head_dim)
    return torch.cat([idx[:r], idx[2 * r:2 * r + p], idx[r:2 * r], idx[2 * r + p:]])


def _permute_heads(t: Tensor, heads: int, perm: Tensor) -> Tensor:
    """Reorder the channels inside each head of a (heads * D, ...) weight or bias."""
    return t.reshape(heads, -1, *t.shape[1:])[:, perm].flatten(0, 1).contiguous()


def _rotary_dim(cfg, head_dim: int) -> int:
    return int(head_dim * _rope_parameters(cfg).get("partial_rotary_factor", 1.0))


def split_neox_qkv(tensor: Tensor, cfg) -> Dict[str, Tensor]:
    """GPT-NeoX's fused query_key_value, rows laid out per head as [q_h, k_h, v_h]: (H*3*D, C)
    or (H*3*D,) -> q, k, v (H*D, ...), q/k channels permuted for the partial rotary."""
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    q, k, v = tensor.view(H, 3, D, *tensor.shape[1:]).unbind(1)
    perm = rotary_permutation(D, _rotary_dim(cfg, D))
    return {"q": _permute_heads(q.flatten(0, 1), H, perm), "k": _permute_heads(k.flatten(0, 1), H, perm),
            "v": v.flatten(0, 1).contiguous()}


def split_phi3_qkv(tensor: Tensor, cfg) -> Dict[str, Tensor]:
    """Phi-3's fused qkv_proj: rows [q (H*D), k (Hkv*D), v (Hkv*D)], q/k permuted for a partial rotary."""
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    q, k, v = tensor.split([H * D, Hkv * D, Hkv * D], dim=0)
    perm = rotary_permutation(D, _rotary_dim(cfg, D))
    return {"q": _permute_heads(q, H, perm), "k": _permute_heads(k, Hkv, perm), "v": v.contiguous()}


def split_gate_up(tensor: Tensor, _cfg) -> Dict[str, Tensor]:
    """Phi-3's fused gate_up_proj: rows [gate (F), up (F)]."""
    gate, up = tensor.chunk(2, dim=0)
    return {"gate": gate.contiguous(), "up": up.contiguous()}


def plus_one(tensor: Tensor, _cfg) -> Dict[str, Tensor]:
    """Gemma's RMSNorm scales by (1 + w); the student's by its weight, so it stores 1 + w."""
    return {"": tensor.float().add(1.0).to(tensor.dtype)}


# --------------------------------------------------------------------------------------------
# Config mapping
# --------------------------------------------------------------------------------------------


def _rope_parameters(cfg) -> dict:
    """transformers 5 `rope_parameters` merged over the 4.x attributes: rope_scaling, rope_theta
    (GPT-NeoX: rotary_emb_base) and partial_rotary_factor (GPT-NeoX: rotary_pct)."""
    legacy = dict(getattr(cfg, "rope_scaling", None) or {})
    for attr, key in (("rope_theta", "rope_theta"), ("rotary_emb_base", "rope_theta"),
                      ("partial_rotary_factor", "partial_rotary_factor"), ("rotary_pct", "partial_rotary_factor")):
        if getattr(cfg, attr, None) is not None:
            legacy.setdefault(key, getattr(cfg, attr))
    return {**legacy, **dict(getattr(cfg, "rope_parameters", None) or {})}


def _rope(cfg) -> dict:
    """RoPE theta and scaling of a config (see `_rope_from`)."""
    return _rope_from(_rope_parameters(cfg))


def _rope_from(scaling: dict) -> dict:
    """rope_theta and rotary_scaling from one set of RoPE parameters; unsupported kinds are refused."""
    theta = scaling.get("rope_theta", 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return {"rope_theta": float(theta), "rotary_scaling": None}
    if kind == "linear":
        return {"rope_theta": float(theta), "rotary_scaling": {"rope_type": "linear", "factor": scaling["factor"]}}
    if kind == "llama3":
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {"rope_theta": float(theta), "rotary_scaling": {"rope_type": "llama3", **{k: scaling[k] for k in keep}}}
    raise RetconvertError(f"RoPE scaling type {kind!r} is not supported; supported: default, linear, llama3 "
                          "(convert a variant of the model without it)")


def llama_config(cfg) -> dict:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        hidden_act=getattr(cfg, "hidden_act", None) or cfg.hidden_activation,  # Gemma: hidden_activation
        mlp_type="glu",
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        norm_type="rmsnorm",
        norm_eps=cfg.rms_norm_eps,
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        o_proj_bias=bool(getattr(cfg, "attention_bias", False)),
        position_embedding_type="rotary",
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        **_rope(cfg),
    )


def qwen2_config(cfg) -> dict:
    # Qwen2 has biases on q, k, v but not on o, and none in the MLP (whatever the config says).
    return {**llama_config(cfg), "attention_bias": True, "o_proj_bias": False, "mlp_bias": False}


def qwen3_config(cfg) -> dict:
    return {**llama_config(cfg), "qk_norm": "head", "mlp_bias": False}  # its MLP never has biases


def olmo2_config(cfg) -> dict:
    return {**llama_config(cfg), "qk_norm": "full", "block_norms": "post", "mlp_bias": False}


def phi3_config(cfg) -> dict:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {**llama_config(cfg), "head_dim": head_dim, "partial_rotary_factor": _rotary_dim(cfg, head_dim) / head_dim,
            "attention_bias": False, "o_proj_bias": False, "mlp_bias": False}  # Phi-3 has no biases


def gpt_neox_config(cfg) -> dict:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        mlp_type="mlp",
        mlp_bias=True,
        norm_type="layernorm",
        norm_eps=cfg.layer_norm_eps,
        attention_bias=bool(cfg.attention_bias),
        o_proj_bias=bool(cfg.attention_bias),
        position_embedding_type="rotary",
        partial_rotary_factor=_rotary_dim(cfg, head_dim) / head_dim,
        parallel_residual=bool(cfg.use_parallel_residual),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        **_rope(cfg),
    )


def gemma2_config(cfg) -> dict:
    """Gemma 2's scores are soft-capped before the softmax (attn_logit_softcapping): a kept window's
    softmax caps them alike (`window_logit_softcapping`); pure-retention layers have no softmax and
    ignore it."""
    return {**llama_config(cfg), "hidden_act": cfg.hidden_activation, "block_norms": "sandwich", "mlp_bias": False,
            "embed_scale": cfg.hidden_size**0.5, "qk_scale": cfg.query_pre_attn_scalar**-0.5,
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "window_logit_softcapping": cfg.attn_logit_softcapping}


def gemma3_config(cfg) -> dict:
    """Gemma 2's layout plus per-head q/k norms and one RoPE per layer type (local and global)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if "full_attention" in params:  # transformers 5: one set of parameters per layer type
        by_type = {kind: _rope_from(p) for kind, p in params.items()}
    else:  # 4.x: the global rope_theta / rope_scaling, and rope_local_base_freq for the local layers
        by_type = {"full_attention": _rope(cfg),
                   "sliding_attention": _rope_from({"rope_theta": cfg.rope_local_base_freq})}
    layer_rope = [by_type[kind] for kind in _layer_types(cfg)]
    return {**gemma2_config(cfg), "qk_norm": "head", "layer_rope": layer_rope, **layer_rope[0]}


ATTENTION_KINDS = ("full_attention", "sliding_attention")


def _layer_types(cfg) -> List[str]:
    """Each layer's attention, "full_attention" or "sliding_attention": the config's `layer_types`
    (transformers' hybrid families), else Gemma 3's older `sliding_window_pattern` (every n-th
    layer global, default 6) for a config that has it, else the same kind on every layer (sliding
    where the config sets a `sliding_window`: Mistral, Phi-3)."""
    types = getattr(cfg, "layer_types", None)
    if types is None and getattr(cfg, "model_type", None) == "gemma3_text":
        pattern = getattr(cfg, "sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(cfg.num_hidden_layers)]
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    for i, kind in enumerate(types):
        if kind not in ATTENTION_KINDS:
            raise RetconvertError(f"layer {i} has attention type {kind!r}, which the converter does not know; "
                                  f"supported: {', '.join(ATTENTION_KINDS)}")
    return list(types)


def teacher_windows(cfg) -> List[int]:
    """The teacher's sliding window per layer in tokens, 0 for a layer that attends to the whole
    context: what `--window teacher` gives each student layer as its retention window. A sliding
    layer sees its last `sliding_window` tokens, itself included (transformers' mask keeps key j
    for query i when i - j < sliding_window), as a retention window of that length does."""
    window = getattr(cfg, "sliding_window", None) or 0
    return [window if kind == "sliding_attention" else 0 for kind in _layer_types(cfg)]


def gpt2_config(cfg) -> dict:
    # Scores are q.k * scale, scale = head_dim^-0.5 (or 1 without scale_attn_weights), divided
    # by layer_idx + 1 with scale_attn_by_inverse_layer_idx: one scale per layer.
    scale = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    by_layer = cfg.scale_attn_by_inverse_layer_idx
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
        hidden_act=cfg.activation_function,
        mlp_type="mlp",
        mlp_bias=True,
        norm_type="layernorm",
        norm_eps=cfg.layer_norm_epsilon,
        attention_bias=True,
        o_proj_bias=True,
        position_embedding_type="none",
        learned_position_embeddings=True,
        max_position_embeddings=cfg.n_positions,
        qk_scale=[scale / (i + 1) for i in range(cfg.n_layer)] if by_layer else scale,
        tie_word_embeddings=True,
    )


# --------------------------------------------------------------------------------------------
# Config fields
# --------------------------------------------------------------------------------------------

# Fields of the installed transformers' base config class, which every config carries (in 4.x
# also generation defaults, torchscript, use_bfloat16, ...): none enters a decoder's forward pass
# except those ruled in COMMON_FIELDS.
_BASE_CONFIG_FIELDS = frozenset(PretrainedConfig().to_dict())

COMMON_FIELDS: Dict[str, Rule] = {
    **dict.fromkeys(("_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype",
                     "id2label", "label2id", "model_type", "output_attentions", "output_hidden_states",
                     "problem_type", "return_dict", "transformers_version", "use_cache", "initializer_range",
                     "tokenizer_class", "prefix", "task_specific_params", "cache_implementation",
                     "auto_map"), INERT),  # auto_map: the author's own code, used only with --trust-remote-code
    "is_encoder_decoder": Only((False,), "an encoder-decoder model has no causal-LM RetNet counterpart"),
    "add_cross_attention": Only((False,), "cross-attention to an encoder has no RetNet counterpart"),
    "pruned_heads": Only(({}, None), "pruned attention heads are not converted"),
    "tie_word_embeddings": MAPPED,
}


def _rule(family: "Family", name: str) -> Optional[Rule]:
    if name in family.fields:
        return family.fields[name]
    if name in COMMON_FIELDS:
        return COMMON_FIELDS[name]
    if name.startswith("_") or name.endswith("_token_id") or name in _BASE_CONFIG_FIELDS:
        return INERT  # private bookkeeping, token ids, the base class's generic fields
    return None


def check_config(family: "Family", hf_config):
    """Every field of the teacher's config is known to the family and at a value the RetNet
    expresses; raises RetconvertError naming the first field that is not."""
    for name, value in hf_config.to_dict().items():
        rule = _rule(family, name)
        if rule is None:
            raise RetconvertError(
                f"{family.model_type} config field {name}={value!r} is unknown to the converter and may change "
                f"the model's maths; add it to the {family.model_type} field table in convert/families.py "
                "(mapped, inert or refused) before converting")
        if isinstance(rule, Only) and value not in rule.values:
            allowed = " or ".join(map(repr, rule.values))
            raise RetconvertError(f"{family.model_type} config field {name}={value!r} cannot be converted: {rule.why} "
                                  f"(supported: {allowed})")


_DROPOUT = dict.fromkeys(("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                          "classifier_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob"), INERT)
GPT2_FIELDS: Dict[str, Rule] = {
    **dict.fromkeys(("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                     "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx"), MAPPED),
    **_DROPOUT,
    # Scores computed in fp32 with the scale applied inside the product: the same maths, only
    # more precise in half precision (the student's retention accumulates in its own way).
    "reorder_and_upcast_attn": INERT,
    "n_ctx": INERT,  # old alias of n_positions that the model never reads
    **dict.fromkeys(("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                     "summary_first_dropout"), INERT),  # the sequence-classification head
}
LLAMA_FIELDS: Dict[str, Rule] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                     "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "mlp_bias"), MAPPED),
    **_DROPOUT,
    "pretraining_tp": INERT,  # split matmuls in old releases: the same products
    # nanotron export fields (SmolLM2's config.json) that transformers' Llama never reads
    "is_llama_config": INERT, "rope_interleaved": INERT,
}
_SLIDING = dict.fromkeys(("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"), WINDOW)
MISTRAL_FIELDS: Dict[str, Rule] = {**LLAMA_FIELDS, "sliding_window": WINDOW}
_NO_MLP_BIAS = {"mlp_bias": INERT}  # the family's MLP has no biases, whatever the config says
QWEN3_FIELDS: Dict[str, Rule] = {**LLAMA_FIELDS, **_SLIDING, **_NO_MLP_BIAS}
OLMO2_FIELDS: Dict[str, Rule] = {**LLAMA_FIELDS, **_NO_MLP_BIAS}
PHI3_FIELDS: Dict[str, Rule] = {
    **LLAMA_FIELDS,
    **dict.fromkeys(("attention_bias", "mlp_bias"), INERT),  # Phi-3's modules never read them
    "sliding_window": WINDOW,
    "original_max_position_embeddings": INERT,  # read only by the longrope scaling, which is refused
    "partial_rotary_factor": MAPPED,  # transformers 4.x; 5 keeps it in rope_parameters
}
GPT_NEOX_FIELDS: Dict[str, Rule] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "hidden_act", "max_position_embeddings", "layer_norm_eps", "use_parallel_residual",
                     "rope_parameters", "rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base",
                     "partial_rotary_factor", "attention_bias"), MAPPED),
    **_DROPOUT,
    "is_decoder": INERT,  # always a decoder; the flag only matters to encoder-decoder wrappers
}
GEMMA2_FIELDS: Dict[str, Rule] = {
    **LLAMA_FIELDS,
    **_NO_MLP_BIAS,
    "hidden_act": INERT,  # Gemma 2/3 read hidden_activation; old configs carry both
    **dict.fromkeys(("hidden_activation", "query_pre_attn_scalar", "final_logit_softcapping"), MAPPED),
    # tanh soft-capping of the softmax scores: kept on a kept window's softmax (window_logit_softcapping),
    # dropped on pure-retention layers, which have no softmax
    "attn_logit_softcapping": MAPPED, "sliding_window": WINDOW, "layer_types": WINDOW,
    "use_bidirectional_attention": Only((None, False), "bidirectional attention has no causal RetNet counterpart"),
}
GEMMA3_FIELDS: Dict[str, Rule] = {
    **GEMMA2_FIELDS,
    "rope_local_base_freq": MAPPED,  # transformers 4.x: the local layers' theta
    # which layers are local: which RoPE each layer has, and which keep the window with --window teacher
    "layer_types": MAPPED, "sliding_window_pattern": MAPPED,
}
QWEN2_FIELDS: Dict[str, Rule] = {
    **LLAMA_FIELDS,
    **dict.fromkeys(("attention_bias", "mlp_bias"), INERT),  # Qwen2's modules never read them
    **_SLIDING,
}


# --------------------------------------------------------------------------------------------
# Key tables
# --------------------------------------------------------------------------------------------

_LLAMA_LAYER = "model.layers.{i}"
LLAMA_KEYS: Dict[str, Target] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    f"{_LLAMA_LAYER}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    f"{_LLAMA_LAYER}.post_attention_layernorm.weight": "model.layers.{i}.post_retention_layernorm.weight",
    f"{_LLAMA_LAYER}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    f"{_LLAMA_LAYER}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    f"{_LLAMA_LAYER}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    f"{_LLAMA_LAYER}.self_attn.rotary_emb.inv_freq": None,  # recomputed from rope_theta
}
for _p in ("weight", "bias"):
    LLAMA_KEYS[f"{_LLAMA_LAYER}.self_attn.q_proj.{_p}"] = f"model.layers.{{i}}.retention.q_proj.{_p}"
    LLAMA_KEYS[f"{_LLAMA_LAYER}.self_attn.k_proj.{_p}"] = f"model.layers.{{i}}.retention.k_proj.{_p}"
    LLAMA_KEYS[f"{_LLAMA_LAYER}.self_attn.v_proj.{_p}"] = f"model.layers.{{i}}.retention.v_proj.{_p}"
    LLAMA_KEYS[f"{_LLAMA_LAYER}.self_attn.o_proj.{_p}"] = f"model.layers.{{i}}.retention.o_proj.{_p}"
    LLAMA_KEYS[f"{_LLAMA_LAYER}.mlp.gate_proj.{_p}"] = f"model.layers.{{i}}.mlp.gate_proj.{_p}"
    LLAMA_KEYS[f"{_LLAMA_LAYER}.mlp.up_proj.{_p}"] = f"model.layers.{{i}}.mlp.up_proj.{_p}"
    LLAMA_KEYS[f"{_LLAMA_LAYER}.mlp.down_proj.{_p}"] = f"model.layers.{{i}}.mlp.down_proj.{_p}"

QWEN3_KEYS: Dict[str, Target] = {
    **LLAMA_KEYS,
    f"{_LLAMA_LAYER}.self_attn.q_norm.weight": "model.layers.{i}.retention.q_norm.weight",
    f"{_LLAMA_LAYER}.self_attn.k_norm.weight": "model.layers.{i}.retention.k_norm.weight",
}
OLMO2_KEYS: Dict[str, Target] = {  # norms on the outputs of attention and MLP, none on their inputs
    **{k: v for k, v in QWEN3_KEYS.items() if "layernorm" not in k},
    f"{_LLAMA_LAYER}.post_attention_layernorm.weight": "model.layers.{i}.retention_out_norm.weight",
    f"{_LLAMA_LAYER}.post_feedforward_layernorm.weight": "model.layers.{i}.mlp_out_norm.weight",
}
PHI3_KEYS: Dict[str, Target] = {
    **{k: v for k, v in LLAMA_KEYS.items() if ".mlp." not in k and "_proj." not in k},
    f"{_LLAMA_LAYER}.self_attn.qkv_proj.weight": Transform("model.layers.{i}.retention.{}_proj.weight", split_phi3_qkv),
    f"{_LLAMA_LAYER}.self_attn.o_proj.weight": "model.layers.{i}.retention.o_proj.weight",
    f"{_LLAMA_LAYER}.mlp.gate_up_proj.weight": Transform("model.layers.{i}.mlp.{}_proj.weight", split_gate_up),
    f"{_LLAMA_LAYER}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GEMMA2_KEYS: Dict[str, Target] = {
    **{k: v for k, v in LLAMA_KEYS.items() if "norm" not in k},
    "model.norm.weight": Transform("model.norm.weight{}", plus_one),
    f"{_LLAMA_LAYER}.input_layernorm.weight": Transform("model.layers.{i}.input_layernorm.weight{}", plus_one),
    f"{_LLAMA_LAYER}.post_attention_layernorm.weight": Transform("model.layers.{i}.retention_out_norm.weight{}",
                                                                 plus_one),
    f"{_LLAMA_LAYER}.pre_feedforward_layernorm.weight": Transform(
        "model.layers.{i}.post_retention_layernorm.weight{}", plus_one),
    f"{_LLAMA_LAYER}.post_feedforward_layernorm.weight": Transform("model.layers.{i}.mlp_out_norm.weight{}",
                                                                   plus_one),
}
GEMMA3_KEYS: Dict[str, Target] = {
    **GEMMA2_KEYS,
    f"{_LLAMA_LAYER}.self_attn.q_norm.weight": Transform("model.layers.{i}.retention.q_norm.weight{}", plus_one),
    f"{_LLAMA_LAYER}.self_attn.k_norm.weight": Transform("model.layers.{i}.retention.k_norm.weight{}", plus_one),
}

GPT2_KEYS: Dict[str, Target] = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.wpe.weight": "model.embed_positions.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ln_f.bias": "model.norm.bias",
    "lm_head.weight": None,  # tied to wte
    "transformer.h.{i}.attn.bias": None,  # causal-mask buffer of old checkpoints
    "transformer.h.{i}.attn.masked_bias": None,
}
for _p in ("weight", "bias"):
    GPT2_KEYS.update({
        f"transformer.h.{{i}}.ln_1.{_p}": f"model.layers.{{i}}.input_layernorm.{_p}",
        f"transformer.h.{{i}}.ln_2.{_p}": f"model.layers.{{i}}.post_retention_layernorm.{_p}",
        f"transformer.h.{{i}}.attn.c_attn.{_p}": Transform(f"model.layers.{{i}}.retention.{{}}_proj.{_p}",
                                                          split_c_attn),
        f"transformer.h.{{i}}.attn.c_proj.{_p}": Transform(f"model.layers.{{i}}.retention.o_proj.{_p}{{}}", conv1d),
        f"transformer.h.{{i}}.mlp.c_fc.{_p}": Transform(f"model.layers.{{i}}.mlp.fc_in.{_p}{{}}", conv1d),
        f"transformer.h.{{i}}.mlp.c_proj.{_p}": Transform(f"model.layers.{{i}}.mlp.fc_out.{_p}{{}}", conv1d),
    })

_NEOX = "gpt_neox.layers.{i}"
GPT_NEOX_KEYS: Dict[str, Target] = {
    "gpt_neox.embed_in.weight": "model.embed_tokens.weight",
    "embed_out.weight": "lm_head.weight",  # the untied head (named lm_head since transformers 5)
    "lm_head.weight": "lm_head.weight",
    f"{_NEOX}.attention.bias": None,  # causal-mask buffers and cached frequencies of old checkpoints
    f"{_NEOX}.attention.masked_bias": None,
    f"{_NEOX}.attention.rotary_emb.inv_freq": None,
}
for _p in ("weight", "bias"):
    GPT_NEOX_KEYS.update({
        f"gpt_neox.final_layer_norm.{_p}": f"model.norm.{_p}",
        f"{_NEOX}.input_layernorm.{_p}": f"model.layers.{{i}}.input_layernorm.{_p}",
        f"{_NEOX}.post_attention_layernorm.{_p}": f"model.layers.{{i}}.post_retention_layernorm.{_p}",
        f"{_NEOX}.attention.query_key_value.{_p}": Transform(f"model.layers.{{i}}.retention.{{}}_proj.{_p}",
                                                           split_neox_qkv),
        f"{_NEOX}.attention.dense.{_p}": f"model.layers.{{i}}.retention.o_proj.{_p}",
        f"{_NEOX}.mlp.dense_h_to_4h.{_p}": f"model.layers.{{i}}.mlp.fc_in.{_p}",
        f"{_NEOX}.mlp.dense_4h_to_h.{_p}": f"model.layers.{{i}}.mlp.fc_out.{_p}",
    })

# What becomes of a sliding window (the families' notes)
_KEEP = "kept as each such layer's retention window with --window teacher, else replaced by retention (decay)"

FAMILIES: Dict[str, Family] = {
    "gpt2": Family("gpt2", GPT2_KEYS, gpt2_config, attention_output="transformer.h.{i}.attn.c_proj",
                   fields=GPT2_FIELDS,
                   notes="Conv1D weights transposed, fused c_attn split, learned absolute positions kept, "
                         "score scale per layer as the teacher's"),
    "llama": Family("llama", LLAMA_KEYS, llama_config, attention_output="model.layers.{i}.self_attn.o_proj",
                    fields=LLAMA_FIELDS,
                    notes="grouped-query K/V kept (or expanded per head), RoPE carried over with its theta "
                          "and scaling"),
    "mistral": Family("mistral", LLAMA_KEYS, llama_config, attention_output="model.layers.{i}.self_attn.o_proj",
                      fields=MISTRAL_FIELDS,
                      notes=f"as llama; the sliding window (every layer) {_KEEP}"),
    "qwen2": Family("qwen2", LLAMA_KEYS, qwen2_config, attention_output="model.layers.{i}.self_attn.o_proj",
                    fields=QWEN2_FIELDS,
                    notes=f"as llama, with q/k/v biases; a sliding window (use_sliding_window: the layers from "
                          f"max_window_layers on) {_KEEP}"),
    "qwen3": Family("qwen3", QWEN3_KEYS, qwen3_config, attention_output="model.layers.{i}.self_attn.o_proj",
                    fields=QWEN3_FIELDS,
                    notes=f"as llama, with per-head q/k RMSNorm; a sliding window (use_sliding_window: the layers "
                          f"from max_window_layers on) {_KEEP}"),
    "gpt_neox": Family("gpt_neox", GPT_NEOX_KEYS, gpt_neox_config,
                       attention_output="gpt_neox.layers.{i}.attention.dense", fields=GPT_NEOX_FIELDS,
                       notes="fused per-head query_key_value split, partial rotary kept (q/k channels permuted), "
                             "parallel residual, untied head"),
    "phi3": Family("phi3", PHI3_KEYS, phi3_config, attention_output="model.layers.{i}.self_attn.o_proj",
                   fields=PHI3_FIELDS,
                   notes=f"fused qkv and gate/up projections split, partial rotary kept; longrope scaling refused; "
                         f"the sliding window (every layer) {_KEEP}"),
    "olmo2": Family("olmo2", OLMO2_KEYS, olmo2_config, attention_output="model.layers.{i}.self_attn.o_proj",
                    fields=OLMO2_FIELDS,
                    notes="norms on the attention and MLP outputs, q/k RMSNorm over the projection"),
    "gemma2": Family("gemma2", GEMMA2_KEYS, gemma2_config, attention_output="model.layers.{i}.self_attn.o_proj",
                     fields=GEMMA2_FIELDS,
                     notes="embeddings scaled by sqrt(hidden), (1 + w) norms stored as weights, sandwich norms, GeGLU, "
                           "query_pre_attn_scalar, final logit soft-capping; the soft-capping of attention scores is "
                           "kept on a kept window's softmax scores (window_logit_softcapping) and dropped on "
                           f"pure-retention layers (no softmax); the sliding window (every other layer) {_KEEP}"),
    "gemma3_text": Family("gemma3_text", GEMMA3_KEYS, gemma3_config,
                          attention_output="model.layers.{i}.self_attn.o_proj", fields=GEMMA3_FIELDS,
                          notes=f"as gemma2, with per-head q/k norms and the local/global RoPE per layer; the sliding "
                                f"window (the local layers) {_KEEP}"),
}


def family_for(hf_config) -> Family:
    """Choose the family by `config.model_type`, never by the model's name."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise RetconvertError(
            f"model_type {model_type!r} is not supported; convert a model of one of the supported families: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def map_state_dict(family: Family, teacher_sd: Dict[str, Tensor], hf_config) -> Dict[str, Tensor]:
    """Apply the key table. Every teacher tensor is mapped or explicitly dropped."""
    out: Dict[str, Tensor] = {}
    unmapped = []
    for key, tensor in teacher_sd.items():
        hit = family.match(key)
        if hit is None:
            unmapped.append(key)
            continue
        _template, target, layer = hit
        if target is None:
            continue
        if isinstance(target, Transform):
            out.update(target(tensor, hf_config, layer))
        else:
            out[target.format(i=layer)] = tensor
    if unmapped:
        raise RetconvertError(
            f"{len(unmapped)} teacher tensor(s) have no rule in the {family.model_type} key table "
            f"(first: {unmapped[0]}); this checkpoint differs from the family the converter knows"
        )
    return out
