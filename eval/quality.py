"""Quality: sliding-window perplexity on held-out C4 and WikiText-2, zero-shot tasks via lm-eval."""

import math
from typing import Iterator, List, Optional, Tuple

from retconvert.data import iter_texts, token_stream
from retconvert.eval.perplexity import perplexity
from retconvert.paths import shared_data_dir

# name: (offline file under the data folder, online spec, text field)
PPL_SETS = {
    "c4": ("c4/c4_heldout.jsonl", "hf:allenai/c4:en:validation"),
    "wikitext2": ("ppl/wikitext-2-raw-test.txt", "hf:Salesforce/wikitext:wikitext-2-raw-v1:test"),
}


def ppl_source(name: str) -> Tuple[str, str]:
    """(spec for retconvert.data.iter_texts, "offline" | "online")."""
    local, online = PPL_SETS[name]
    path = shared_data_dir() / local
    return (str(path), "offline") if path.is_file() else (online, "online")


def ppl_ids(name: str, tokenizer, max_tokens: int, max_docs: Optional[int] = None) -> List[int]:
    """The token stream of a perplexity set: C4 documents joined by EOS; WikiText lines by newlines."""
    spec, _ = ppl_source(name)
    texts: Iterator[str] = (t for t in iter_texts(spec) if t.strip())
    if max_docs is not None:
        texts = (t for i, t in zip(range(max_docs), texts))
    if name == "wikitext2":  # one article stream, the usual WikiText protocol ("\n".join of the rows)
        texts = (t + "\n" for t in texts)
        return token_stream(texts, tokenizer, max_tokens)
    return token_stream(texts, tokenizer, max_tokens, separator_id=tokenizer.eos_token_id)


def perplexities(m, max_tokens: int, window: int, stride: int, batch_size: int, max_docs=None, log=print) -> dict:
    out = {}
    for name in PPL_SETS:
        spec, source = ppl_source(name)
        ids = ppl_ids(name, m.tokenizer, max_tokens, max_docs)
        w = min(window, len(ids))
        s = max(1, min(stride, w))
        log(f"  {m.name}: perplexity on {name} ({source}, {len(ids)} tokens, window {w}, stride {s})")
        r = perplexity(m.model, ids, window=w, stride=s, batch_size=batch_size).to_dict()
        if not math.isfinite(r["ppl"]):
            raise ArithmeticError(f"perplexity on {name} is not finite ({r['ppl']})")
        r.update(source=source, data=PPL_SETS[name][0] if source == "offline" else spec,
                 unit="ppl: exp(nll); nll: nats per token; tokens, window, stride: tokens")
        out[name] = r
    return out
