"""A quick side-by-side: held-out perplexity and a greedy continuation of each model."""

from pathlib import Path

import torch

from retconvert.errors import RetconvertError
from retconvert.eval.perplexity import perplexity
from retconvert.eval.quality import ppl_ids

PROMPT = "The history of the city begins"


def load_student(path: str):
    """A converted or distilled checkpoint folder (loaded with retconvert's own classes)."""
    import retconvert  # noqa: F401  (registers the RetNet classes)
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise RetconvertError(f"{path} is not a checkpoint folder (no config.json); pass a `retconvert from-hf` output")
    return AutoModelForCausalLM.from_pretrained(path).eval()


def heldout_ids(tokenizer, max_tokens: int):
    """Held-out C4 (offline file, else the real validation split), documents joined by EOS."""
    return ppl_ids("c4", tokenizer, max_tokens)


@torch.no_grad()
def greedy(model, tokenizer, prompt: str = PROMPT, new_tokens: int = 24) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def compare_models(teacher, student, tokenizer, max_tokens: int = 8192, print_fn=print) -> dict:
    ids = heldout_ids(tokenizer, max_tokens)
    t, s = perplexity(teacher, ids), perplexity(student, ids)
    print_fn(f"held-out C4 perplexity ({t.tokens} tokens, window {t.window}, stride {t.stride}):")
    print_fn(f"  teacher {t.ppl:10.2f}")
    print_fn(f"  student {s.ppl:10.2f}   ({s.ppl / t.ppl:.2f}x teacher)")
    print_fn(f"greedy continuation of {PROMPT!r}:")
    print_fn(f"  teacher: {greedy(teacher, tokenizer)!r}")
    print_fn(f"  student: {greedy(student, tokenizer)!r}")
    return {"teacher_ppl": t.ppl, "student_ppl": s.ppl, "tokens": t.tokens}
