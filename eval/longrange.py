"""Long-range memory: passkey retrieval vs distance, and mean loss per position on long documents."""

import random
from typing import List, Optional

import torch
import torch.nn.functional as F

from retconvert.eval.quality import ppl_ids, ppl_source

INTRO = "A pass key is hidden in the long text below. Find it and remember it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def _ids(tokenizer, text: str, special: bool = False) -> List[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@torch.no_grad()
def passkey(m, lengths: List[int], trials: int, new_tokens: int = 10, seed: int = 0, log=print) -> dict:
    """Accuracy of greedy retrieval of a 5-digit key, per prompt length.

    Each prompt is exactly `length` tokens: intro, filler, the key sentence, filler, question.
    The key sits at `distance_tokens` (from the end of the key sentence to the end of the
    prompt); trials vary its depth a little (a few filler tokens before it) and the key.
    """
    tok = m.tokenizer
    rng = random.Random(seed)
    intro, question = _ids(tok, INTRO, special=True), _ids(tok, QUESTION)
    unit = _ids(tok, FILLER)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    points, skipped = [], []
    for length in lengths:
        correct, distances = 0, []
        for t in range(trials):
            key = f"{rng.randint(10000, 99999)}"
            key_ids = _ids(tok, KEY.format(key=key))
            filler_total = length - len(intro) - len(key_ids) - len(question)
            if filler_total < 0:
                break
            before = (filler_total // 8) * t // max(1, trials - 1)  # the key a little deeper each trial
            after = filler_total - before
            filler = unit * (filler_total // max(1, len(unit)) + 1)
            prompt = intro + filler[:before] + key_ids + filler[:after] + question
            ids = torch.tensor([prompt], device=m.device)
            out = m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=pad_id)
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            correct += key in answer
            distances.append(after + len(question))
        if not distances:
            skipped.append({"context_tokens": length, "reason": f"the prompt without filler needs "
                            f"{len(intro) + len(key_ids) + len(question)} tokens, more than {length}"})
            continue
        points.append({"context_tokens": length, "distance_tokens": round(sum(distances) / len(distances), 1),
                       "accuracy": correct / len(distances), "n": len(distances)})
        log(f"  {m.name}: passkey at {length} tokens: {correct}/{len(distances)}")
    return {"points": points, "skipped_points": skipped, "new_tokens": new_tokens,
            "unit": "accuracy: fraction of trials whose greedy answer contains the key; "
                    "context_tokens, distance_tokens: tokens (distance: key sentence end to prompt end)"}


def position_buckets(length: int) -> List[int]:
    """Bucket edges 0, 16, 32, 64, ... length (target positions)."""
    edges, e = [0], 16
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length]


@torch.no_grad()
def position_loss(m, length: int, docs: int, max_docs: Optional[int] = None, log=print) -> dict:
    """Mean NLL per position bucket over `docs` rows of `length` tokens of concatenated held-out C4."""
    ids = ppl_ids("c4", m.tokenizer, length * docs, max_docs)
    rows = len(ids) // length
    if rows == 0:
        raise ValueError(f"held-out C4 gave {len(ids)} tokens, fewer than one row of {length}")
    data = torch.tensor(ids[: rows * length]).view(rows, length)
    sums = torch.zeros(length - 1, dtype=torch.float64)
    for r in range(rows):
        x = data[r:r + 1].to(m.device)
        logits = m.model(input_ids=x, use_cache=False).logits[0, :-1].float()
        sums += F.cross_entropy(logits, x[0, 1:], reduction="none").double().cpu()
        del logits
    nll = sums / rows  # target position p + 1 for p in 0..length-2
    edges = position_buckets(length)
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        part = nll[max(lo - 1, 0):hi - 1]  # targets at positions lo..hi-1 (position 0 has no target)
        if len(part):
            buckets.append({"start_position": lo, "end_position": hi, "nll": float(part.mean())})
    log(f"  {m.name}: per-position loss on {rows} x {length} tokens of held-out C4 ({ppl_source('c4')[1]})")
    return {"buckets": buckets, "rows": rows, "row_tokens": length, "data": "c4",
            "unit": "nll: mean nats per token over the targets in [start_position, end_position)"}
