"""Teacher families beyond gpt2/llama/qwen2, each on a tiny random model built from its config:
Qwen3, GPT-NeoX (Pythia), Phi-3, OLMo 2, Gemma 2 and Gemma 3 (text).

For every family: the conversion succeeds and accounts for every tensor, embeddings, norms and
MLPs equal the teacher's sub-modules, the student's attention scores equal the teacher's in every
layer, the first position's logits (attention over one token) match, and the converted
checkpoint loads through trust_remote_code without retconvert and generates.
"""

import copy
import json

import pytest
import torch
import transformers
from tiny import (assert_attention_matches, assert_close, assert_loads_with_remote_code, save_teacher, tiny_text,
                  write_gguf, write_jsonl)
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, LlamaConfig,
                          Olmo2Config, Phi3Config, Qwen3Config)

import retconvert  # noqa: F401
from retconvert.cli import main as cli
from retconvert.convert.student import ConvertOptions, build_student, student_config
from retconvert.convert.families import family_for, map_state_dict
from retconvert.errors import RetconvertError
from retconvert.models.decoding_retnet import RetNetDecoder
from retconvert.models.kernels import BACKENDS
from retconvert.models.modeling_retnet import CACHE_NAME

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="eager")
GQA = dict(num_key_value_heads=2, head_dim=16)

# RoPE given with the attributes both transformers 4.56 and 5 read (5 folds them into rope_parameters).
CONFIGS = {
    "qwen3": lambda: Qwen3Config(**TINY, **GQA, tie_word_embeddings=False),
    # rotary over a quarter of each head (4 of 16 channels), parallel residual, untied head
    "gpt_neox": lambda: GPTNeoXConfig(**TINY, rotary_pct=0.25, rotary_emb_base=10000.0),
    "phi3": lambda: Phi3Config(**TINY, **GQA, partial_rotary_factor=0.5),
    "olmo2": lambda: Olmo2Config(**TINY, **GQA),
    "gemma2": lambda: Gemma2Config(**TINY, **GQA, query_pre_attn_scalar=24),  # softcaps at 50 (scores) and 30 (logits)
    # layers 0 local (sliding, theta 10^4), 1 global (theta 10^6, linear scaling 8)
    "gemma3_text": lambda: Gemma3TextConfig(**TINY, **GQA, query_pre_attn_scalar=24, rope_local_base_freq=10000.0,
                                            rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                                            layer_types=["sliding_attention", "full_attention"]),
}

# Sub-modules that must compute the same function: (teacher, student), `{i}` for the layer.
_LLAMA_PARTS = [("model.layers.{i}.input_layernorm", "model.layers.{i}.input_layernorm"),
                ("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.post_retention_layernorm"),
                ("model.layers.{i}.mlp", "model.layers.{i}.mlp"), ("model.norm", "model.norm"), ("lm_head", "lm_head")]
_QK_NORMS = [("model.layers.{i}.self_attn.q_norm", "model.layers.{i}.retention.q_norm"),
             ("model.layers.{i}.self_attn.k_norm", "model.layers.{i}.retention.k_norm")]
_GEMMA_PARTS = [("model.layers.{i}.input_layernorm", "model.layers.{i}.input_layernorm"),
                ("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.retention_out_norm"),
                ("model.layers.{i}.pre_feedforward_layernorm", "model.layers.{i}.post_retention_layernorm"),
                ("model.layers.{i}.post_feedforward_layernorm", "model.layers.{i}.mlp_out_norm"),
                ("model.layers.{i}.mlp", "model.layers.{i}.mlp"), ("model.norm", "model.norm"), ("lm_head", "lm_head")]
PARTS = {
    "qwen3": _LLAMA_PARTS + _QK_NORMS,
    "gpt_neox": [("gpt_neox.layers.{i}.input_layernorm", "model.layers.{i}.input_layernorm"),
                 ("gpt_neox.layers.{i}.post_attention_layernorm", "model.layers.{i}.post_retention_layernorm"),
                 ("gpt_neox.layers.{i}.mlp", "model.layers.{i}.mlp"), ("gpt_neox.final_layer_norm", "model.norm"),
                 ("lm_head", "lm_head")],
    "phi3": _LLAMA_PARTS,
    "olmo2": [("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.retention_out_norm"),
              ("model.layers.{i}.post_feedforward_layernorm", "model.layers.{i}.mlp_out_norm"),
              ("model.layers.{i}.mlp", "model.layers.{i}.mlp"), ("model.norm", "model.norm"),
              ("lm_head", "lm_head")] + _QK_NORMS,
    "gemma2": _GEMMA_PARTS,
    "gemma3_text": _GEMMA_PARTS + _QK_NORMS,
}


def make_teacher(name: str):
    """A tiny random teacher whose norm weights are random too (so that Gemma's 1 + w is tested)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key or "layernorm" in key:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request):
    teacher = make_teacher(request.param)
    return request.param, teacher, build_student(teacher, ConvertOptions()).eval()


def test_family_is_chosen_by_model_type_and_every_tensor_is_mapped_or_dropped(pair):
    name, teacher, student = pair
    family = family_for(teacher.config)
    assert family.model_type == teacher.config.model_type == name
    for key in teacher.state_dict():
        assert family.match(key) is not None, key
    extra = dict(teacher.state_dict(), **{"model.layers.0.self_attn.mystery.weight": torch.zeros(1)})
    with pytest.raises(RetconvertError, match="no rule in the .* key table"):
        map_state_dict(family, extra, teacher.config)


def test_unknown_config_field_is_refused_by_name(pair):
    _, teacher, _ = pair
    teacher = AutoModelForCausalLM.from_config(copy.deepcopy(teacher.config))  # the fixture's config stays as is
    teacher.config.attn_temperature = 0.5
    with pytest.raises(RetconvertError, match="config field attn_temperature=0.5 is unknown"):
        build_student(teacher, ConvertOptions())


@pytest.mark.parametrize("config, message", [
    (lambda: Phi3Config(**TINY, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                                                 "original_max_position_embeddings": 64}),
     "RoPE scaling type 'longrope' is not supported"),
    (lambda: Gemma3TextConfig(**TINY, use_bidirectional_attention=True),
     "config field use_bidirectional_attention=True cannot be converted"),
])
def test_what_the_retnet_cannot_express_is_refused_by_name(config, message):
    with pytest.raises(RetconvertError, match=message):
        student_config(config(), ConvertOptions())


@pytest.mark.parametrize("name, legacy", [
    ("gpt_neox", dict(rotary_pct=0.25, rotary_emb_base=10000.0)),
    ("phi3", dict(partial_rotary_factor=0.5, rope_theta=10000.0, rope_scaling=None)),
    ("gemma3_text", dict(rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                         rope_local_base_freq=10000.0, sliding_window_pattern=2)),
])
def test_transformers4_rope_attributes_map_as_rope_parameters(name, legacy):
    """The same model described with transformers 4.x attributes (no rope_parameters or
    layer_types) gives the same student config."""
    from types import SimpleNamespace

    config = CONFIGS[name]()
    fields = {k: v for k, v in config.to_dict().items() if k not in ("rope_parameters", "layer_types")}
    old = SimpleNamespace(**{**fields, **legacy})
    family = family_for(config)
    assert family.retnet_config(old) == family.retnet_config(config)


@torch.no_grad()
def test_embeddings_norms_and_mlps_equal_the_teachers(pair):
    name, teacher, student = pair
    ids = torch.randint(0, 128, (2, 7))
    # hidden_states[0]: the embeddings as the first layer sees them (Gemma's sqrt(hidden) included)
    torch.testing.assert_close(student(ids, output_hidden_states=True).hidden_states[0],
                               teacher(ids, output_hidden_states=True).hidden_states[0], rtol=0, atol=0)
    for t_name, s_name in PARTS[name]:
        for i in range(teacher.config.num_hidden_layers):
            t_mod = (teacher.get_output_embeddings() if t_name == "lm_head"
                     else teacher.get_submodule(t_name.format(i=i)))
            s_mod = student.get_submodule(s_name.format(i=i))
            w = getattr(t_mod, "weight", None)
            dim = w.shape[0] if w is not None and w.dim() == 1 else 64  # a norm's width, else hidden
            x = torch.randn(2, 7, dim)
            torch.testing.assert_close(s_mod(x), t_mod(x), rtol=0, atol=2e-6, msg=f"{t_name} vs {s_name}")
            if "{i}" not in t_name:
                break


@torch.no_grad()
def test_attention_scores_equal_the_teachers_in_every_layer(pair):
    """softmax of the student's q.k (norms, partial or per-layer RoPE, grouped heads, scale) equals
    the teacher's attention weights, given each layer's own input."""
    name, teacher, student = pair
    # Gemma 2 soft-caps scores at 50 (tanh): at these magnitudes (|s| < 1) that is below 1e-5
    assert_attention_matches(teacher, student, rtol=1e-4, atol=1e-5, what=name)


@torch.no_grad()
def test_first_position_logits_match_the_teachers(pair):
    """Over one token softmax attention returns that token's value; so does retention with the
    paper's normaliser, s v / |s|, whenever the score s = b + q.k is positive (b large here)."""
    name, teacher, student = pair
    for block in student.model.layers:
        block.retention.score_bias.fill_(1e3)
    ids = torch.randint(3, 128, (4, 1))
    got, want = student(ids).logits, teacher(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"{name}: relative error {err:.1e}"
    for block in student.model.layers:
        block.retention.score_bias.fill_(1.0)


@torch.no_grad()
@pytest.mark.parametrize("window", [0, 4])
def test_token_by_token_decoding_equals_the_parallel_form(pair, window):
    """The recurrent state (through the modules, and the packed decoder) gives the logits of the
    whole-sequence forward, with every new layer option; also for the windowed student
    (`--window`), whose window is shorter than the sequence here."""
    name, teacher, student = pair
    if window:
        student = build_student(teacher, ConvertOptions(window=window)).eval()
    ids = torch.randint(3, 128, (2, 12))
    want = student(ids, use_cache=False).logits  # (B, T, V)
    state = student(ids[:, :5], use_cache=True)[CACHE_NAME]
    for t in range(5, 12):
        out = student(ids[:, t:t + 1], use_cache=True, **{CACHE_NAME: state})
        torch.testing.assert_close(out.logits[:, 0], want[:, t], rtol=1e-4, atol=1e-5, msg=f"{name} step {t}")
        state = out[CACHE_NAME]
    decoder = student.packed_decoder(batch_size=2)
    decoder.prefill(ids[:, :5])
    for t in range(5, 12):
        torch.testing.assert_close(decoder.step(ids[:, t]), want[:, t], rtol=1e-4, atol=1e-5,
                                   msg=f"{name} packed step {t}")


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_decoder_steps_and_states_equal_the_modules(pair, backend):
    """Every family decodes in the packed decoder (q/k norms, post and sandwich norms, logit
    soft-capping, per-layer RoPE): its one-token steps give the logits and states of the modules'."""
    name, _, student = pair
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(2))
    state = student(ids[:, :5], use_cache=True)[CACHE_NAME]
    decoder = RetNetDecoder(student, batch_size=2, backend=backend)
    decoder.prefill(ids[:, :5])
    for t in range(5, 14):
        out = student(ids[:, t:t + 1], use_cache=True, **{CACHE_NAME: state})
        assert_close(decoder.step(ids[:, t]), out.logits[:, 0], what=f"{name} step {t}")
        state = out[CACHE_NAME]
    for got, want in zip(decoder.export_state().states, state.states):
        assert_close(got, want, what=f"{name} state")


@torch.no_grad()
def test_generate_steps_in_the_packed_decoder(pair):
    from test_generate import run

    name, _, student = pair
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    try:
        want, _ = run(student, False, ids, max_new_tokens=8, do_sample=False)
        got, lengths = run(student, True, ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    finally:
        student.packed_generation = True
    assert torch.equal(got.sequences, want), name
    assert lengths == [9] + [1] * 7  # one prompt pass, then one token per step
    assert got[CACHE_NAME].packed is not None  # the steps ran in the packed decoder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cli_converts_and_the_checkpoint_loads_without_retconvert_and_generates(name, tmp_path):
    folder = save_teacher(make_teacher(name), tmp_path / name)
    calib = write_jsonl(tmp_path / "calib.jsonl", tiny_text())
    out = tmp_path / "student"
    assert cli(["from-hf", str(folder), "--out", str(out), "--calib-data", str(calib),
                "--calib-tokens", "256", "--calib-seq-len", "64"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.conversion["options"]["decay"] == "calibrated"  # calibrated on the teacher's attention
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["family"] == name
    if name in ("qwen3", "phi3", "gemma2", "gemma3_text"):  # the record says what becomes of the window
        assert "else replaced by retention" in report["family_notes"], report["family_notes"]
    assert_loads_with_remote_code(out, tmp_path, torch.randint(3, 40, (2, 9)))


# Published configurations, as their config.json files spell them (fields of older transformers
# releases included): shapes-only conversions on the meta device, nothing downloaded.
REAL_CONFIGS = {
    "HuggingFaceTB/SmolLM2-135M": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, is_llama_config=True, rope_interleaved=False, rope_scaling=None, pretraining_tp=1),
    "Qwen/Qwen3-0.6B": lambda: Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False, sliding_window=None,
        max_window_layers=28, torch_dtype="bfloat16"),
    "EleutherAI/pythia-160m": lambda: GPTNeoXConfig(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, use_parallel_residual=True,
        tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="gelu"),
    "microsoft/Phi-3-mini-4k-instruct": lambda: Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5, sliding_window=2047, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000, attention_bias=False, tie_word_embeddings=False),
    "allenai/OLMo-2-0425-1B": lambda: Olmo2Config(
        vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-6,
        pad_token_id=100277, eos_token_id=100257, tie_word_embeddings=False),
    "google/gemma-2-2b": lambda: Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh", cache_implementation="hybrid"),
    "google/gemma-3-1b-it": lambda: Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        rope_local_base_freq=10000.0, rope_theta=1000000.0, rope_scaling=None, max_position_embeddings=32768,
        eos_token_id=[1, 106], cache_implementation="hybrid"),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_published_configurations_convert_at_the_teachers_size(name):
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(REAL_CONFIGS[name]())
        student = build_student(teacher, ConvertOptions(score_bias=False, sink=False))
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert abs(n_student - n_teacher) < 1e-3 * n_teacher, (n_student, n_teacher)  # + decay and output scale only


# ------------------------------------------------------------------------------------------
# GGUF teachers, for the families whose GGUF architecture transformers reads
# ------------------------------------------------------------------------------------------


# What a GGUF of each can hold: transformers reads no head_dim for qwen3 (its default is 128),
# no partial rotary for phi3, no query_pre_attn_scalar or layer pattern for Gemma (defaults).
GGUF_CONFIGS = {
    "qwen3": lambda: Qwen3Config(**TINY, num_key_value_heads=2, head_dim=128),
    "phi3": lambda: Phi3Config(**TINY, num_key_value_heads=2),
    "gemma2": lambda: Gemma2Config(**TINY, **GQA),
    "gemma3": lambda: Gemma3TextConfig(**TINY, **GQA),
}


OLD_TRANSFORMERS = int(transformers.__version__.split(".")[0]) < 5


@torch.no_grad()
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.skipif(
    OLD_TRANSFORMERS and a == "qwen3", reason="transformers 4.x builds a qwen3 GGUF's tokenizer as BPE, which "
    "needs merges the placeholder vocabulary here lacks")) for a in GGUF_CONFIGS])
def test_gguf_teacher_converts_like_its_safetensors_original(arch, tmp_path):
    from retconvert.convert.sources import load_teacher

    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(GGUF_CONFIGS[arch]()).eval()
    folder = load_teacher(str(save_teacher(original, tmp_path / "folder")))
    gguf = load_teacher(str(write_gguf(original, tmp_path / f"{arch}.gguf", arch)))
    assert gguf.kind == "gguf" and gguf.model.config.model_type == original.config.model_type
    ids = torch.randint(3, 128, (2, 9))
    torch.testing.assert_close(gguf.model(ids).logits, folder.model(ids).logits, rtol=0, atol=1e-5)
    students = [build_student(t.model, ConvertOptions(decay="retnet")).eval() for t in (folder, gguf)]
    torch.testing.assert_close(students[1](ids).logits, students[0](ids).logits, rtol=0, atol=1e-5)
