"""Sliding-window perplexity on held-out text, identical for teacher and student.

Documents are joined with the tokenizer's EOS between them into one token stream; windows
of `window` tokens advance by `stride`, and each window scores only the tokens that the
previous window did not (each scored token sees at least `window - stride` of context,
except at the very start). This is the protocol transformers documents for fixed-length
models.
"""

import math
from dataclasses import asdict, dataclass
from typing import List

import torch
import torch.nn.functional as F


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    window: int
    stride: int

    def to_dict(self):
        return asdict(self)


@torch.no_grad()
def perplexity(model, ids: List[int], window: int = 512, stride: int = 256, batch_size: int = 4) -> Perplexity:
    """Perplexity of `model` on the token stream `ids`."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = next(model.parameters()).device
    stream = torch.tensor(ids, dtype=torch.long)
    # (start, end, first scored position inside the window)
    spans = []
    prev_end = 0
    for start in range(0, len(ids) - 1, stride):
        end = min(start + window, len(ids))
        spans.append((start, end, max(prev_end - start, 1)))
        prev_end = end
        if end == len(ids):
            break
    total_nll, total = 0.0, 0
    for i in range(0, len(spans), batch_size):
        group = spans[i:i + batch_size]
        width = max(e - s for s, e, _ in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), -100, dtype=torch.long)
        for r, (s, e, first) in enumerate(group):
            batch[r, :e - s] = stream[s:e]
            mask[r, :e - s] = 1
            targets[r, first:e - s] = stream[s + first:e]
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten().to(device),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total += int((targets[:, 1:] != -100).sum())
    mean = total_nll / total
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total, window=window, stride=stride)
