"""Long-range memory: passkey retrieval vs distance, and mean loss per position on long documents."""

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from retconvert.eval.quality import ppl_ids, ppl_source

INTRO = "A pass key is hidden in the long text below. Find it and remember it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def _ids(tokenizer, text: str, special: bool = False) -> List[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@dataclass
class PasskeyPrompt:
    """One passkey prompt: `ids` (exactly the requested length, in tokens), the 5-digit `key`,
    `key_span` ([start, end) token positions of the key sentence) and `distance` (tokens from the
    end of the key sentence to the end of the prompt)."""

    ids: List[int]
    key: str
    key_span: Tuple[int, int]
    distance: int


def _fixed_parts(tok, key: str) -> Tuple[List[int], List[int], List[int]]:
    """The token ids a passkey prompt holds besides its filler: intro, key sentence, question."""
    return _ids(tok, INTRO, special=True), _ids(tok, KEY.format(key=key)), _ids(tok, QUESTION)


def passkey_prompt(tok, length: int, trial: int, trials: int, rng: random.Random) -> Optional[PasskeyPrompt]:
    """Trial `trial` of `trials` at `length` tokens: intro, filler, the key sentence, filler,
    question; the key a little deeper each trial. None when `length` cannot hold the prompt
    without filler. Draws one key from `rng` either way, so a run's keys depend on the seed only."""
    key = f"{rng.randint(10000, 99999)}"
    intro, key_ids, question = _fixed_parts(tok, key)
    unit = _ids(tok, FILLER)
    filler_total = length - len(intro) - len(key_ids) - len(question)
    if filler_total < 0:
        return None
    before = (filler_total // 8) * trial // max(1, trials - 1)
    after = filler_total - before
    filler = unit * (filler_total // max(1, len(unit)) + 1)
    start = len(intro) + before
    ids = intro + filler[:before] + key_ids + filler[:after] + question
    return PasskeyPrompt(ids, key, (start, start + len(key_ids)), after + len(question))


@torch.no_grad()
def passkey(m, lengths: List[int], trials: int, new_tokens: int = 10, seed: int = 0, log=print) -> dict:
    """Accuracy of greedy retrieval of a 5-digit key, per prompt length.

    Each prompt is exactly `length` tokens (`passkey_prompt`). The key sits at `distance_tokens`
    (from the end of the key sentence to the end of the prompt); trials vary its depth a little
    (a few filler tokens before it) and the key.
    """
    tok = m.tokenizer
    rng = random.Random(seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    points, skipped = [], []
    for length in lengths:
        correct, distances, answers = 0, [], []
        for t in range(trials):
            p = passkey_prompt(tok, length, t, trials, rng)
            if p is None:
                break
            ids = torch.tensor([p.ids], device=m.device)
            out = m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=pad_id)
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            correct += p.key in answer
            distances.append(p.distance)
            answers.append({"key": p.key, "answer": answer})
        if not distances:
            need = sum(len(part) for part in _fixed_parts(tok, "00000"))
            skipped.append({"context_tokens": length, "reason": f"the prompt without filler needs "
                            f"about {need} tokens, more than {length}"})
            continue
        points.append({"context_tokens": length, "distance_tokens": round(sum(distances) / len(distances), 1),
                       "accuracy": correct / len(distances), "n": len(distances), "answers": answers})
        log(f"  {m.name}: passkey at {length} tokens: {correct}/{len(distances)}")
    return {"points": points, "skipped_points": skipped, "new_tokens": new_tokens,
            "unit": "accuracy: fraction of trials whose greedy answer contains the key (answers: each trial's "
                    "key and greedy continuation); "
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
