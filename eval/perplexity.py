"""Sliding-window perplexity on held-out text, identical for teacher and student.

Documents are joined with the tokenizer's EOS between them into one token stream; windows
of `window` tokens advance by `stride`, and each window scores only the tokens that the
previous window did not (each scored token sees at least `window - stride` of context,
except at the very start). This is the protocol transformers documents for fixed-length
models, with one correction: a window cannot score its own first token (nothing before it
in the window predicts it), so the advance is at most `window - 1`. With stride = window
the documented loop skips the first token of every later window; here every token after
the first is scored exactly once, whatever the window and stride.
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored: every token of the stream but the first
    window: int
    stride: int  # the advance used: the stride asked for, at most window - 1

    def to_dict(self):
        return asdict(self)


def score_windows(n_tokens: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """Windows over a stream of `n_tokens` as (start, end, first): the window holds tokens
    [start, end) and scores those from start + first on (first >= 1: each is predicted from
    the tokens before it in the window). Windows start every min(stride, window - 1) tokens;
    together they score tokens 1 .. n_tokens - 1 exactly once. ValueError for a window under
    2 tokens or a stride under 1."""
    if window < 2 or stride < 1:
        raise ValueError(f"perplexity needs window >= 2 and stride >= 1 (got window={window}, stride={stride})")
    step = min(stride, window - 1)
    out, scored_to = [], 1  # tokens before scored_to are scored (token 0 never is)
    for start in range(0, n_tokens - 1, step):
        end = min(start + window, n_tokens)
        out.append((start, end, scored_to - start))
        scored_to = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(model, ids: List[int], window: int = 512, stride: int = 256, batch_size: int = 4) -> Perplexity:
    """Perplexity of `model` on the token stream `ids`, scoring every token after the first
    once (see `score_windows`). ValueError for fewer than 2 tokens or a window under 2."""
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens (got {len(ids)})")
    device = next(model.parameters()).device
    stream = torch.tensor(ids, dtype=torch.long)
    spans = score_windows(len(ids), window, stride)  # (start, end, first scored position inside the window)
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
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total, window=window, stride=min(stride, window - 1))
