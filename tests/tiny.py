"""Tiny random teachers and a tiny tokenizer, built offline from configs (nothing downloaded)."""

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from retconvert.models import RetNetConfig, RetNetForCausalLM

WORDS = ("the a of to and in is was for on with as by at from city history river year people new "
         "first world war state king church water music school team game north south").split()


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer over WORDS plus special tokens, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def tiny_text(n_docs: int = 40, words: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (words,), generator=g).tolist())
            for _ in range(n_docs)]


def tiny_llama(**overrides) -> LlamaForCausalLM:
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
               pad_token_id=2, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen2(**overrides) -> Qwen2ForCausalLM:
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=True)
    cfg.update(overrides)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def tiny_gpt2(**overrides) -> GPT2LMHeadModel:
    cfg = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def save_teacher(model, folder: Path, tokenizer=None) -> Path:
    """A local HF folder (safetensors) with a tokenizer, as a user would have."""
    model.save_pretrained(folder, safe_serialization=True)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, texts) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def assert_loads_with_remote_code(ckpt: Path, workdir: Path, ids: torch.Tensor, new_tokens: int = 8,
                                  packed: bool = True):
    """Load `ckpt` with trust_remote_code in a fresh Python where retconvert is NOT importable,
    and check its logits and greedy tokens against the same checkpoint loaded here (and those of
    its packed decoder, with `packed`)."""
    import os
    import subprocess
    import sys
    import textwrap

    import retconvert  # noqa: F401  (registers the classes for the in-process reference)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.save({"ids": ids, "logits": logits, "generated": generated}, workdir / "expected.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["retconvert"] = None  # any `import retconvert` now raises ImportError
        try:
            import retconvert
        except ImportError:
            pass
        else:
            raise SystemExit("retconvert is importable")
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert "retconvert" not in type(model).__module__, type(model).__module__
        expected = torch.load({str(workdir / "expected.pt")!r})
        with torch.no_grad():
            got = model(expected["ids"], use_cache=False).logits
        err = ((got - expected["logits"]).abs().max() / expected["logits"].abs().max()).item()
        assert err <= 1e-6, err
        new = model.generate(expected["ids"], max_new_tokens={new_tokens}, do_sample=False, pad_token_id=0)
        assert torch.equal(new, expected["generated"]), (new, expected["generated"])
        if {packed}:
            packed = model.packed_decoder(batch_size=expected["ids"].shape[0]).generate(
                expected["ids"], {new_tokens}, eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
            n = expected["generated"].shape[1]  # transformers stops early when every row has ended
            assert torch.equal(packed[:, :n], expected["generated"]) and (packed[:, n:] == 0).all(), packed
        print("REMOTE-CODE-OK")
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(workdir / "modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REMOTE-CODE-OK" in proc.stdout


# ------------------------------------------------------------------------------------------
# Tiny RetNets: one config per feature combination, parameters that start at 0/1 randomised
# ------------------------------------------------------------------------------------------


TOL = 1e-5  # fp32, relative to the largest logit


def tiny_config(**overrides) -> RetNetConfig:
    kwargs = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        chunk_size=8,  # test sequences span several chunks, the last one partial
        initializer_range=0.2,  # large enough that retention visibly shapes the logits
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return RetNetConfig(**kwargs)


def tiny_model(**overrides) -> RetNetForCausalLM:
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(**overrides)).eval()
    # Parameters that start at 0 or 1 get random values, so that they are actually tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("score_bias", "head_norm_weight", "head_norm_bias", "norm.weight", "norm.bias",
                              "sink_key", "sink_value", "sink_weight")):
                p.add_(torch.randn_like(p) * 0.5)
    return model


def assert_close(got, want, tol=TOL, what="logits"):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def random_ids(B, T, seed=1):
    return torch.randint(1, 100, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "default": {},  # xpos, groupnorm, paper normalisation, value_factor 2, mlp, layernorm
    "rotary": dict(position_embedding_type="rotary"),
    "rotary-llama3": dict(position_embedding_type="rotary", rotary_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "no-positions": dict(position_embedding_type="none"),
    "head-rmsnorm": dict(head_norm="rmsnorm"),
    "head-norm-affine": dict(head_norm_affine=True),
    "head-norm-none": dict(head_norm="none"),
    "normalization-none": dict(retention_normalization="none"),
    "score-bias": dict(score_bias=True),
    "attention-sink": dict(attention_sink=True),
    "converted-like": dict(position_embedding_type="rotary", value_factor=1, head_norm="none", head_norm_affine=True,
                           score_bias=True, attention_sink=True, use_output_gate=False, learnable_decay=True),
    "gqa": dict(num_key_value_heads=2),
    "converted-gqa": dict(position_embedding_type="rotary", value_factor=1, head_norm="none", head_norm_affine=True,
                          score_bias=True, attention_sink=True, use_output_gate=False, num_key_value_heads=2,
                          mlp_type="glu", hidden_act="silu", norm_type="rmsnorm"),
    "value-factor-1": dict(value_factor=1),
    "glu": dict(mlp_type="glu", hidden_act="silu"),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "learned-positions": dict(position_embedding_type="none", learned_position_embeddings=True),
    "parallel-residual": dict(parallel_residual=True),
    "no-output-gate": dict(use_output_gate=False),
    "per-layer-decay": dict(decay_gammas=[[0.5, 0.8, 0.95, 0.99], [0.6, 0.9, 0.97, 0.995]]),
    "llama-like": dict(position_embedding_type="rotary", head_norm="rmsnorm", num_key_value_heads=1,
                       value_factor=1, mlp_type="glu", hidden_act="silu", norm_type="rmsnorm",
                       use_output_gate=False, score_bias=True, attention_bias=True, embed_scale=2.0),
}


def left_padded_batch(rows, pad_id=0):
    """Left-pad a list of 1-D id tensors into (ids, attention_mask)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


def tiny_distill_overrides(teacher: Path, train: Path, heldout: Path, out_dir: Path, **extra) -> list:
    """`section.key=value` overrides of a two-stage distillation of `teacher` (a folder) that runs
    in about a second: the student converted on the fly, stage 1 for 2 steps of 2 x 32 tokens,
    stage 2 for 3 steps of 4 x 2 x 32 tokens (micro-batch x accumulation x sequence length)."""
    overrides = {
        "run.out_dir": out_dir, "run.progress": False, "run.tensorboard": False, "run.checkpoint_every": 0,
        "run.threads": 1, "model.teacher": teacher, "model.convert.calib_tokens": 128,
        "model.convert.calib_seq_len": 32, "model.convert.chunk_size": 8,
        "data.train": f"[{train}]", "data.eval": f"[{heldout}]", "data.seq_len": 32, "data.shuffle_buffer": 4,
        "data.eval_tokens": 128, "data.eval_window": 32, "data.eval_stride": 16,
        "stage1.steps": 2, "stage1.seq_len": 32, "stage1.micro_batch_size": 2,
        "stage2.steps": 3, "stage2.micro_batch_size": 4, "stage2.grad_accum": 2, "stage2.warmup_steps": 1,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def write_gguf(model, path, arch: str):
    """A float32 llama.cpp GGUF of a transformers model, written as llama.cpp's convert_hf_to_gguf.py
    writes one: tensors named by gguf's own name map for `arch`, Llama's q and k rows permuted
    per head (by the key/value head count for k), Gemma norms stored as 1 + w, a placeholder
    'gpt2' vocabulary."""
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}  # transformers 5, or 4.x
    rope = rope.get("full_attention", rope)  # Gemma 3: the global theta
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    tokens = [f"t{i}" for i in range(cfg.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch.startswith("gemma") and key.endswith("norm.weight"):
            tensor = tensor + 1
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's permute
            heads = cfg.num_attention_heads if key.endswith("q_proj.weight") else cfg.num_key_value_heads
            tensor = tensor.reshape(heads, 2, -1, tensor.shape[-1]).transpose(1, 2).reshape(tensor.shape)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@torch.no_grad()
def assert_attention_matches(teacher, student, rtol=1e-5, atol=1e-6, what=""):
    """softmax of each student layer's q.k, given that layer's teacher input, equals the teacher's
    attention weights (an eager teacher: it returns them). Ids (2, 9) from a fixed seed."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    out = teacher(ids, output_attentions=True, output_hidden_states=True)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    for i, block in enumerate(student.model.layers):
        q, k, _ = block.retention.project(block.input_layernorm(out.hidden_states[i]), torch.arange(9).expand(2, 9))
        scores = torch.einsum("bthd,bshd->bhts", q, k).masked_fill(~causal, float("-inf"))
        torch.testing.assert_close(scores.softmax(-1), out.attentions[i], rtol=rtol, atol=atol,
                                   msg=f"{what} layer {i}")
