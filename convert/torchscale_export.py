"""Export a RetNet checkpoint to torchscale's RetNetDecoder (torchscale 0.3.0).

    our config --(checks, then kwargs)----> torchscale RetNetConfig(**args)
    our state dict --(key table)----------> RetNetDecoder state dict (with embed_tokens
                                             and output_projection)
    --(atomic write)--> out_dir/checkpoint.pt {"args": ..., "model": ...} + out_dir/config.json

torchscale's layout is fixed, so only models configured like it can be exported: xpos
positions with its angles, the paper decays, RMSNorm everywhere (no affine on the head),
the swish gate, a bias-free GLU. Anything else is refused with one message naming every
mismatch; grouped-query key/value heads are expanded to one per query head.

Limit: torchscale's recurrent form is exact only where the head norm's eps is negligible.
Its parallel form normalises retention as we do (scores over max(|row sum|, c_n)) and
matches at every weight scale. Its recurrent form divides by the running scale c_n alone,
which differs from ours by max(|row sum| / c_n, 1) per (position, head); the head RMSNorm
removes that factor only where the mean square of the head's retention output is far
above layernorm_eps. Where it is not (small value weights: with v_proj scaled by 1e-2 and
1e-3, a tiny test model's recurrent logits are off by 4e-3 and 0.18 relative), no export can
match both forms, since the two disagree with each other. `export_torchscale` measures both
on a short probe after writing and prints the figures, with a warning naming this limit when
the recurrent form is off.
"""

import json
import math
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from retconvert.errors import RetconvertError
from retconvert.models import RetNetForCausalLM
from retconvert.models.configuration_retnet import paper_decay
from retconvert.paths import atomic_output_dir, check_output_dir, is_retnet_checkpoint

ACTIVATIONS = {"gelu": "gelu", "silu": "swish", "swish": "swish", "relu": "relu"}  # ours -> torchscale
TORCHSCALE_THETA = 10000.0  # RetNetRelPos hard-codes its angles and decays
PROBE_TOKENS = 16  # random ids the parity probe runs through both torchscale forms
PARITY_TOL = 1e-4  # relative logit error above which the export warns

# Ours -> torchscale, per layer ("{i}" is the layer index).
LAYER_KEYS = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.retention_layer_norm.weight",
    "model.layers.{i}.retention.q_proj.weight": "layers.{i}.retention.q_proj.weight",
    "model.layers.{i}.retention.k_proj.weight": "layers.{i}.retention.k_proj.weight",
    "model.layers.{i}.retention.v_proj.weight": "layers.{i}.retention.v_proj.weight",
    "model.layers.{i}.retention.g_proj.weight": "layers.{i}.retention.g_proj.weight",
    "model.layers.{i}.retention.o_proj.weight": "layers.{i}.retention.out_proj.weight",
    "model.layers.{i}.post_retention_layernorm.weight": "layers.{i}.final_layer_norm.weight",
    # torchscale's GLU is fc2(act(fc1(x)) * gate(x)); ours is down(act(gate(x)) * up(x)).
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.ffn.fc1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.ffn.gate.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.ffn.fc2.weight",
}
MODEL_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "layer_norm.weight",
    "lm_head.weight": "output_projection.weight",
}
IGNORED = ("decay_logit",)  # our decays: checked against torchscale's fixed ones instead


class TorchscaleExportError(RetconvertError, ValueError):
    """The model uses a feature torchscale's RetNetDecoder cannot express."""


def unmappable_features(model: RetNetForCausalLM) -> list:
    """Every reason the model cannot become a torchscale RetNetDecoder (empty: it can)."""
    cfg, problems = model.config, []

    def need(ok, text):
        if not ok:
            problems.append(text)

    H, C = cfg.num_attention_heads, cfg.hidden_size
    need(cfg.position_embedding_type == "xpos",
         f"position_embedding_type={cfg.position_embedding_type!r} (torchscale: 'xpos')")
    need(cfg.rope_theta == TORCHSCALE_THETA, f"rope_theta={cfg.rope_theta} (torchscale: {TORCHSCALE_THETA:g})")
    need(cfg.rotary_scaling is None, f"rotary_scaling={cfg.rotary_scaling} (torchscale has none)")
    need(not cfg.learned_position_embeddings, "learned_position_embeddings (torchscale has no absolute positions)")
    need(cfg.head_norm == "rmsnorm", f"head_norm={cfg.head_norm!r} (torchscale: 'rmsnorm')")
    need(not cfg.head_norm_affine, "head_norm_affine (torchscale's head norm has no weights)")
    need(cfg.head_norm_eps == cfg.norm_eps,
         f"head_norm_eps={cfg.head_norm_eps} != norm_eps={cfg.norm_eps} (torchscale uses one layernorm_eps)")
    need(cfg.retention_normalization == "paper",
         f"retention_normalization={cfg.retention_normalization!r} (torchscale: 'paper')")
    need(cfg.norm_type == "rmsnorm", f"norm_type={cfg.norm_type!r} (torchscale: 'rmsnorm')")
    need(cfg.mlp_type == "glu", f"mlp_type={cfg.mlp_type!r} (torchscale's RetNet always uses a GLU)")
    need(cfg.hidden_act in ACTIVATIONS,
         f"hidden_act={cfg.hidden_act!r} (torchscale: one of {sorted(ACTIVATIONS)})")
    for name in ("attention_bias", "o_proj_bias", "mlp_bias", "score_bias", "attention_sink", "parallel_residual"):
        need(not getattr(cfg, name), f"{name}=True (torchscale has none)")
    need(cfg.use_output_gate, "use_output_gate=False (torchscale always gates)")
    need(not any(cfg.layer_windows), f"retention_window={cfg.retention_window} (torchscale's retention has no "
         "softmax window; export a pure RetNet, converted without --window)")
    need(cfg.qk_head_dim * H == C,
         f"head_dim={cfg.qk_head_dim} with {H} heads != hidden_size={C} (torchscale ties them)")
    need(all(math.isclose(cfg.layer_qk_scale(i), cfg.qk_head_dim**-0.5) for i in range(cfg.num_hidden_layers)),
         f"qk_scale={cfg.qk_scale} (torchscale: head_dim ** -0.5)")
    for name, plain in (("qk_norm", None), ("block_norms", "pre"), ("final_logit_softcapping", None),
                        ("layer_rope", None), ("partial_rotary_factor", 1.0)):
        need(getattr(cfg, name) == plain, f"{name}={getattr(cfg, name)!r} (torchscale: {plain!r})")
    need(any(math.isclose(cfg.embed_scale, s) for s in (1.0, math.sqrt(C))),
         f"embed_scale={cfg.embed_scale} (torchscale: 1 or sqrt(hidden_size))")
    paper = torch.tensor(paper_decay(H), dtype=torch.float64)
    for i, layer in enumerate(model.model.layers):
        gamma = layer.retention.gamma.double()
        if not torch.allclose(gamma, paper, rtol=0, atol=1e-6):
            problems.append(f"layer {i} decays {[round(g, 6) for g in gamma.tolist()]} "
                            f"(torchscale: the paper's 1 - 2^(-5-h) in every layer)")
            break
    return problems


def _expand_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """(Hkv * D, C) -> (H * D, C): each key/value head repeated for the query heads it serves."""
    return weight.view(kv_heads, -1, weight.shape[-1]).repeat_interleave(heads // kv_heads, 0).flatten(0, 1)


def to_torchscale(model: RetNetForCausalLM) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(kwargs of torchscale's RetNetConfig, RetNetDecoder state dict) for the same function."""
    problems = unmappable_features(model)
    if problems:
        raise TorchscaleExportError("cannot export to torchscale: " + "; ".join(problems))
    cfg = model.config
    H, Hkv, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    args = dict(
        decoder_embed_dim=cfg.hidden_size,
        decoder_value_embed_dim=H * cfg.v_head_dim,
        decoder_retention_heads=H,
        decoder_ffn_embed_dim=cfg.intermediate_size,
        decoder_layers=L,
        decoder_normalize_before=True,
        activation_fn=ACTIVATIONS[cfg.hidden_act],
        dropout=0.0,
        activation_dropout=0.0,
        drop_path_rate=0.0,
        no_scale_embedding=math.isclose(cfg.embed_scale, 1.0),
        layernorm_embedding=False,
        layernorm_eps=cfg.norm_eps,
        share_decoder_input_output_embed=tied,
        vocab_size=cfg.vocab_size,
        max_target_positions=cfg.max_position_embeddings,
        chunkwise_recurrent=False,  # torchscale's chunkwise form is wrong past the first chunk
        deepnorm=False,
        subln=True,
        multiway=False,
        checkpoint_activations=False,
        fsdp=False,
    )

    ours = model.state_dict()
    table = dict(MODEL_KEYS)
    for i in range(L):
        table.update({k.format(i=i): v.format(i=i) for k, v in LAYER_KEYS.items()})
    leftover = [k for k in ours if k not in table and not k.endswith(IGNORED)]
    if leftover:  # a parameter the table does not know: never drop weights silently
        raise TorchscaleExportError(f"cannot export to torchscale: no mapping for {', '.join(leftover)}")
    state = {}
    for key, ts_key in table.items():
        tensor = ours[key]
        if Hkv != H and key.endswith(("k_proj.weight", "v_proj.weight")):
            tensor = _expand_heads(tensor, Hkv, H)
        state[ts_key] = tensor.detach().contiguous()
    if tied:  # one tensor under both names, saved once
        state["output_projection.weight"] = state["embed_tokens.weight"]
    # RetNetRelPos buffers, as torchscale builds them (the checks above make them equal ours).
    angle = 1.0 / TORCHSCALE_THETA ** torch.linspace(0, 1, cfg.qk_head_dim // 2)
    decay = torch.log(1 - 2 ** (-5 - torch.arange(H, dtype=torch.float)))
    state["retnet_rel_pos.angle"] = angle.repeat_interleave(2)  # one angle per interleaved pair
    state["retnet_rel_pos.decay"] = decay
    return args, state


def _stderr(message: str):
    print(message, file=sys.stderr)


def is_torchscale_export(folder: Path) -> bool:
    """Whether `folder` holds an earlier export: checkpoint.pt and torchscale's config.json."""
    try:
        args = json.loads((Path(folder) / "config.json").read_text())
        return (Path(folder) / "checkpoint.pt").is_file() and "decoder_retention_heads" in args
    except (OSError, ValueError, TypeError):
        return False


EXPORT_KIND = "a torchscale export (checkpoint.pt and config.json)"


def export_torchscale(src_dir, out_dir, force: bool = False, log: Callable[[str], None] = _stderr) -> Path:
    """Load our checkpoint from `src_dir`, write `out_dir/checkpoint.pt` and `config.json`,
    then (where torchscale is installed) measure both torchscale forms against the model on a
    probe and `log` the figures, with a warning when the recurrent form is off (see the
    module docstring's limit)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    made_by = "a folder written by `retconvert from-hf` or `retconvert distill`"
    if not src_dir.is_dir():
        raise RetconvertError(f"checkpoint folder {src_dir} does not exist; pass {made_by}")
    if not is_retnet_checkpoint(src_dir):
        raise RetconvertError(f"{src_dir} is not a RetNet checkpoint (its config.json has no model_type retnet); "
                              f"export {made_by}")
    check_output_dir(out_dir, force=force, ours=is_torchscale_export, kind=EXPORT_KIND)  # before the long load
    model = RetNetForCausalLM.from_pretrained(src_dir)
    args, state = to_torchscale(model)
    with atomic_output_dir(out_dir, force=force, ours=is_torchscale_export, kind=EXPORT_KIND) as tmp:
        torch.save({"args": args, "model": state}, tmp / "checkpoint.pt")
        (tmp / "config.json").write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")
    try:
        decoder = load_torchscale(out_dir)
    except ImportError:
        log("torchscale is not installed here: parity with the export not measured")
        return out_dir
    parity = torchscale_parity(model.float(), decoder.float())
    log(f"torchscale parity on {PROBE_TOKENS} random tokens (relative logit error): parallel "
        f"{parity['parallel']:.1e}, recurrent {parity['recurrent']:.1e}")
    if parity["recurrent"] > PARITY_TOL:
        log(f"warning: torchscale's recurrent form differs from this model by {parity['recurrent']:.1e}: it "
            f"normalises retention by a running scale, which matches ours only where each head's retention "
            f"output is far above layernorm_eps={args['layernorm_eps']:g} (not so with small value weights); "
            f"its parallel form is exact, so decode the export with it")
    return out_dir


@torch.no_grad()
def torchscale_parity(model: RetNetForCausalLM, decoder: nn.Module, tokens: int = PROBE_TOKENS) -> Dict[str, float]:
    """Relative logit error (max |diff| / max |ours|) of torchscale's parallel and recurrent
    forms against `model` on `tokens` random ids (seeded)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    want = model(ids, use_cache=False).logits.double()
    parallel, _ = decoder(ids)
    incremental, steps = {}, []
    for t in range(tokens):  # torchscale takes the whole prefix and runs only its last token
        steps.append(decoder(ids[:, :t + 1], incremental_state=incremental)[0])
    scale = want.abs().max()
    return {"parallel": ((parallel.double() - want).abs().max() / scale).item(),
            "recurrent": ((torch.cat(steps, 1).double() - want).abs().max() / scale).item()}


def load_torchscale(out_dir) -> nn.Module:
    """The exported RetNetDecoder, weights loaded, in eval mode."""
    ckpt = torch.load(Path(out_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)
    TorchscaleConfig, RetNetDecoder = import_torchscale()
    args = TorchscaleConfig(**ckpt["args"])
    embed = nn.Embedding(args.vocab_size, args.decoder_embed_dim)
    decoder = RetNetDecoder(args, embed_tokens=embed)
    decoder.load_state_dict(ckpt["model"], strict=True)
    weight = ckpt["model"]["embed_tokens.weight"]
    return decoder.to(weight.dtype).eval()


@contextmanager
def _stub_modules(stubs: Dict[str, dict]):
    """Temporarily provide modules (name -> attributes) that are not installed."""
    saved = {name: sys.modules.get(name) for name in stubs}
    for name, attrs in stubs.items():
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__dict__.update(attrs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _unused(*args, **kwargs):
    raise RuntimeError("stub: install fairscale and timm for activation checkpointing, FSDP or drop-path")


def import_torchscale():
    """torchscale's (RetNetConfig, RetNetDecoder).

    torchscale 0.3.0 is installed with --no-deps (pyproject.toml), and its retnet module imports
    fairscale (only for checkpoint_activations / fsdp) and timm (only for drop_path_rate > 0) at
    import time. When they are missing, stand-ins that refuse to run are used for the import;
    exports never enable those features.
    """
    try:
        from torchscale.architecture.config import RetNetConfig
        from torchscale.architecture.retnet import RetNetDecoder
        return RetNetConfig, RetNetDecoder
    except ImportError:
        pass
    stubs = {}
    try:
        import fairscale.nn  # noqa: F401
    except ImportError:
        stubs.update({"fairscale": {}, "fairscale.nn": {"checkpoint_wrapper": _unused, "wrap": _unused}})
    try:
        from timm.models.layers import drop_path  # noqa: F401
    except ImportError:
        stubs.update({"timm": {}, "timm.models": {}, "timm.models.layers": {"drop_path": _unused}})
    with _stub_modules(stubs):
        from torchscale.architecture.config import RetNetConfig
        from torchscale.architecture.retnet import RetNetDecoder
    return RetNetConfig, RetNetDecoder
