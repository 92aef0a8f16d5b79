"""Tiny random teachers and a tiny tokenizer, built offline from configs (nothing downloaded)."""

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

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


def assert_loads_with_remote_code(ckpt: Path, workdir: Path, ids: torch.Tensor, new_tokens: int = 8):
    """Load `ckpt` with trust_remote_code in a fresh Python where retconvert is NOT importable,
    and check its logits and greedy tokens against the same checkpoint loaded here."""
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
        print("REMOTE-CODE-OK")
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(workdir / "modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REMOTE-CODE-OK" in proc.stdout
