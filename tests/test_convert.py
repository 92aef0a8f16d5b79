"""The converter on tiny random GPT-2, Llama (GQA) and Qwen2 (biases) teachers built from configs."""

import json

import pytest
import torch
from tiny import (assert_attention_matches, assert_loads_with_remote_code, save_teacher, tiny_gpt2, tiny_llama,
                  tiny_qwen2, tiny_text, write_jsonl)
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import retconvert  # noqa: F401
from retconvert.cli import main as cli
from retconvert.convert.calibrate import calibrate, fit_layer
from retconvert.convert.student import ConvertOptions, build_student
from retconvert.convert.families import family_for, map_state_dict
from retconvert.errors import RetconvertError

TEACHERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "qwen2": tiny_qwen2}
PAIRS = {name: (make, "keep") for name, make in TEACHERS.items()}
PAIRS["llama-expanded-kv"] = (tiny_llama, "expand")


@pytest.fixture(params=list(PAIRS))
def pair(request):
    make, kv_heads = PAIRS[request.param]
    teacher = make()
    return teacher, build_student(teacher, ConvertOptions(kv_heads=kv_heads)).eval()


def test_kept_and_expanded_kv_heads_give_the_same_model():
    teacher = tiny_llama()  # 4 query heads, 2 key/value heads
    kept = build_student(teacher, ConvertOptions(kv_heads="keep")).eval()
    expanded = build_student(teacher, ConvertOptions(kv_heads="expand")).eval()
    assert kept.config.num_key_value_heads == 2 and expanded.config.num_key_value_heads == 4
    assert sum(p.numel() for p in kept.parameters()) < sum(p.numel() for p in expanded.parameters())
    ids = torch.randint(3, 128, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, expanded(ids).logits, rtol=1e-5, atol=1e-5)


def test_every_teacher_tensor_is_mapped_or_dropped(pair):
    teacher, _ = pair
    family = family_for(teacher.config)
    for key in teacher.state_dict():
        assert family.match(key) is not None, key
    extra = dict(teacher.state_dict(), **{"model.layers.0.self_attn.mystery.weight": torch.zeros(1)})
    with pytest.raises(RetconvertError, match="no rule in the .* key table"):
        map_state_dict(family, extra, teacher.config)


def test_unknown_model_type_lists_supported():
    cfg = GPT2Config()
    cfg.model_type = "bert"
    with pytest.raises(RetconvertError, match="'bert' is not supported; convert a model of one of the supported "
                                              "families: gemma2, gemma3_text, gpt2, gpt_neox, llama, mistral, olmo2, "
                                              "phi3, qwen2, qwen3$"):
        family_for(cfg)


def _teacher_parts(teacher):
    """(embedding, per-layer (ln1, mlp, ln2), final norm) of a teacher, whatever its family."""
    if teacher.config.model_type == "gpt2":
        t = teacher.transformer
        return t.wte, [(b.ln_1, b.mlp, b.ln_2) for b in t.h], t.ln_f
    m = teacher.model
    return m.embed_tokens, [(b.input_layernorm, b.mlp, b.post_attention_layernorm) for b in m.layers], m.norm


@torch.no_grad()
def test_embeddings_mlps_and_norms_match_teacher(pair):
    teacher, student = pair
    ids = torch.randint(0, 128, (2, 11))
    emb, layers, final = _teacher_parts(teacher)
    torch.testing.assert_close(student.model.embed_tokens(ids), emb(ids), rtol=0, atol=0)
    x = torch.randn(2, 11, 64)
    for (ln1, mlp, ln2), block in zip(layers, student.model.layers):
        torch.testing.assert_close(block.input_layernorm(x), ln1(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(block.post_retention_layernorm(x), ln2(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(block.mlp(x), mlp(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(student.model.norm(x), final(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(student.lm_head(x), teacher.lm_head(x), rtol=0, atol=1e-6)
    if teacher.config.model_type == "gpt2":
        pos = torch.arange(11)
        torch.testing.assert_close(student.model.embed_positions(pos), teacher.transformer.wpe(pos), rtol=0, atol=0)


@torch.no_grad()
def _teacher_scores_and_values(teacher, x, pos):
    """The teacher's pre-softmax attention scores (B, H, T, T) and values (B, T, H, D), layer 0."""
    cfg = teacher.config
    if cfg.model_type == "gpt2":
        attn = teacher.transformer.h[0].attn
        q, k, v = attn.c_attn(x).split(cfg.n_embd, dim=-1)
        H = cfg.n_head
        q, k, v = (t.view(*x.shape[:2], H, -1) for t in (q, k, v))
        return torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5, v
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = teacher.model.layers[0].self_attn
    B, T, _ = x.shape
    D = cfg.hidden_size // cfg.num_attention_heads
    q = attn.q_proj(x).view(B, T, -1, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, D)
    cos, sin = teacher.model.rotary_emb(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=2)
    return q @ k.transpose(-1, -2) / D**0.5, v


@torch.no_grad()
def test_attention_scores_and_values_carry_over_exactly(pair):
    """q.k (with RoPE, GQA expansion, biases) and v of the student equal the teacher's."""
    teacher, student = pair
    x = torch.randn(2, 13, 64)
    pos = torch.arange(13).expand(2, 13)
    scores, v_teacher = _teacher_scores_and_values(teacher, x, pos)
    q, k, v = student.model.layers[0].retention.project(x, pos)
    torch.testing.assert_close(torch.einsum("bthd,bshd->bhts", q, k), scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_teacher, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags", [
    dict(scale_attn_by_inverse_layer_idx=True),  # layer i divides its scores by i + 1
    dict(scale_attn_weights=False),  # no 1/sqrt(d)
    dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),  # fp32 scores, same maths
])
@torch.no_grad()
def test_gpt2_attention_scaling_flags_carry_over(flags):
    """Softmax of the student's scores equals the teacher's attention weights in every layer."""
    teacher = tiny_gpt2(n_layer=3, attn_implementation="eager", **flags)
    assert_attention_matches(teacher, build_student(teacher, ConvertOptions()).eval(), what=str(flags))


@pytest.mark.parametrize("field, value", [("mystery_scale", 2.0), ("add_cross_attention", True),
                                          ("is_encoder_decoder", True)])
def test_config_field_the_converter_cannot_carry_is_refused_by_name(field, value):
    teacher = tiny_gpt2()
    setattr(teacher.config, field, value)
    with pytest.raises(RetconvertError, match=f"config field {field}={value!r}"):
        build_student(teacher, ConvertOptions())


def test_llama3_rope_scaling_carries_over():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    # rope_theta and rope_scaling: what transformers 4.x reads, and 5 folds into rope_parameters
    teacher = tiny_llama(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=512)
    student = build_student(teacher, ConvertOptions())
    from retconvert.models.modeling_retnet import rotary_inv_freq

    torch.testing.assert_close(rotary_inv_freq(student.config), teacher.model.rotary_emb.inv_freq.float())


def test_calibration_fits_and_never_worsens_a_layer():
    teacher = tiny_llama()
    student = build_student(teacher, ConvertOptions())
    ids = torch.randint(3, 128, (4, 48))
    fits = calibrate(student, teacher, family_for(teacher.config), ids, fit_decay=True, fit_bias=True,
                     log=lambda *a: None)
    assert len(fits) == 2
    for fit, block in zip(fits, student.model.layers):
        assert 0 <= fit.rel_error <= 1.0 + 1e-6  # the fitted scale alone can reach error 1 (output 0)
        assert all(0 < g < 1 for g in fit.gamma)
        torch.testing.assert_close(block.retention.gamma, torch.tensor(fit.gamma), rtol=1e-5, atol=1e-6)
    # Refitting from the fitted values cannot be worse: the current values are always candidates.
    from retconvert.convert.calibrate import capture_teacher

    inputs, outputs = capture_teacher(teacher, family_for(teacher.config), ids)
    block = student.model.layers[1]
    again = fit_layer(block.retention, block.input_layernorm(inputs[1]), outputs[1], True, True)
    assert again.rel_error <= fits[1].rel_error + 1e-6


def test_meta_device_shapes_gpt2_large_and_llama3_8b():
    """Shapes-only conversion of the real configurations: no weights, nothing downloaded."""
    gpt2_large = GPT2Config(n_embd=1280, n_layer=36, n_head=20, n_positions=1024, vocab_size=50257)
    llama3_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192},
                            tie_word_embeddings=False)
    for cfg, params in ((gpt2_large, 774e6), (llama3_8b, 8.0e9)):
        with torch.device("meta"):
            teacher = AutoModelForCausalLM.from_config(cfg)
            student = build_student(teacher, ConvertOptions(score_bias=False, sink=False))
        n = sum(p.numel() for p in student.parameters())
        assert 0.99 * params < n < 1.01 * params, n  # grouped-query K/V kept: the teacher's size


# --------------------------------------------------------------------------------------------
# The command line, end to end on a local folder
# --------------------------------------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path):
    return save_teacher(tiny_llama(), tmp_path / "teacher")


@pytest.fixture
def calib_file(tmp_path):
    return write_jsonl(tmp_path / "calib.jsonl", tiny_text())


def _from_hf(source, out, calib_file, *extra):
    return cli(["from-hf", str(source), "--out", str(out), "--calib-data", str(calib_file),
                "--calib-tokens", "256", "--calib-seq-len", "64", *map(str, extra)])


def test_from_hf_writes_a_loadable_checkpoint(llama_dir, calib_file, tmp_path):
    out = tmp_path / "student"
    assert _from_hf(llama_dir, out, calib_file) == 0
    files = {p.name for p in out.iterdir()}
    for name in ("model.safetensors", "config.json", "modeling_retnet.py", "configuration_retnet.py",
                 "retention.py", "tokenizer.json", "generation_config.json", "README.md"):
        assert name in files, name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_retnet.RetNetForCausalLM"
    assert config["conversion"]["options"]["decay"] == "calibrated"
    card = (out / "README.md").read_text()  # the card `retconvert push` renders (tests/test_push.py)
    assert "`teacher` (a local folder, not linked to a Hub model)" in card  # base_model: Hub ids only
    assert "base_model:" not in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".student")]  # no temp folder left
    assert_loads_with_remote_code(out, tmp_path, torch.randint(3, 40, (2, 9)))


def test_dtype_bfloat16_and_force(llama_dir, calib_file, tmp_path):
    out = tmp_path / "student"
    assert _from_hf(llama_dir, out, calib_file) == 0
    assert _from_hf(llama_dir, out, calib_file, "--dtype", "bfloat16") == 2  # exists, no --force
    assert _from_hf(llama_dir, out, calib_file, "--dtype", "bfloat16", "--force") == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def _corrupt(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: 200])


def _pickle_only(folder):
    state = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _bert(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))


def _unknown_field(folder):
    config = json.loads((folder / "config.json").read_text())
    config["attn_temperature"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("breakage, message", [
    (_corrupt, "corrupt"),
    (_unknown_field, "config field attn_temperature=0.5 is unknown"),
    (_pickle_only, "--allow-pickle"),
    (_bert, "not supported; convert a model of one of the supported families"),
])
def test_bad_teacher_folder_is_one_line_error(llama_dir, calib_file, tmp_path, capsys, breakage, message):
    breakage(llama_dir)
    out = tmp_path / "student"
    assert _from_hf(llama_dir, out, calib_file) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".student")]


def test_pickle_only_loads_with_allow_pickle(llama_dir, calib_file, tmp_path):
    _pickle_only(llama_dir)
    assert _from_hf(llama_dir, tmp_path / "student", calib_file, "--allow-pickle") == 0


@pytest.mark.parametrize("source, message", [
    ("does/not/exist/anywhere", "neither an existing folder"),
    ("missing.gguf", "does not exist"),
])
def test_missing_source_is_one_line_error(tmp_path, calib_file, capsys, source, message):
    assert _from_hf(source, tmp_path / "out", calib_file) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_gguf_that_is_not_a_causal_lm(tmp_path, calib_file, capsys):
    bogus = tmp_path / "vision.gguf"
    bogus.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    assert _from_hf(bogus, tmp_path / "out", calib_file) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load") and "GGUF" in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_offline_hub_id_is_one_line_error(tmp_path, calib_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert _from_hf("gpt2-large", tmp_path / "out", calib_file) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot download 'gpt2-large'" in err and "\n" not in err, err


def test_gpt2_and_qwen2_convert_and_generate(tmp_path, calib_file):
    for name, build in (("gpt2", tiny_gpt2), ("qwen2", tiny_qwen2)):
        folder = save_teacher(build(), tmp_path / name)
        out = tmp_path / f"{name}-student"
        assert _from_hf(folder, out, calib_file) == 0
        model = AutoModelForCausalLM.from_pretrained(out)
        gen = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=5, do_sample=False, pad_token_id=2)
        assert gen.shape == (1, 8)


@pytest.mark.slow
@pytest.mark.ci
def test_real_smollm2_conversion(tmp_path, shared_data):
    """The embedded default end to end: convert SmolLM2, compare perplexity, generate."""
    from retconvert.convert.student import convert
    from retconvert.convert.sources import load_teacher
    from retconvert.eval.compare import heldout_ids
    from retconvert.eval.perplexity import perplexity

    teacher = load_teacher("smollm2-135m")
    student, report = convert(teacher, ConvertOptions(calib_tokens=2048), log=lambda *a: None)
    ids = heldout_ids(teacher.tokenizer, 1024)
    t, s = perplexity(teacher.model, ids).ppl, perplexity(student, ids).ppl
    assert 5 < t < 60, t
    assert t < s < 30 * t, (t, s)  # untrained: worse than the teacher, far from random (~49k)
    assert report["mean_rel_error"] < 0.8
