"""Training data: documents -> teacher tokens -> EOS-separated packed rows, in a resumable order.

The order is a pure function of (sources, tokenizer, seq_len, seed): sources are interleaved
one document each in turn (an exhausted source drops out; when all are exhausted the next
epoch starts over), documents are tokenised and joined with EOS, cut into rows of `seq_len`
tokens, and rows pass through a seeded shuffle buffer. `state_dict()` captures the exact
position (documents consumed per source, the partial row, the shuffle buffer and its RNG),
so a resumed run sees the very rows an uninterrupted run would have seen. Resuming skips the
consumed documents without tokenising them (for a streamed `hf:` source they are re-read).
"""

from typing import Dict, List, Optional, Tuple

import torch

from retconvert.data import iter_texts, token_stream
from retconvert.distill.config import resolve_path, weights_problem
from retconvert.errors import RetconvertError


class PackedStream:
    def __init__(self, specs: List[str], tokenizer, seq_len: int, seed: int = 0, shuffle_buffer: int = 0,
                 text_field: str = "text", weights: Optional[List[float]] = None):
        if not specs:
            raise RetconvertError("no training sources given; set data.train")
        self.specs = [resolve_path(s) for s in specs]
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise RetconvertError("the tokenizer has no EOS token; packing needs one to separate documents")
        self.seq_len = seq_len
        self.weights = None if weights is None else [float(w) for w in weights]
        problem = weights_problem(self.weights, len(self.specs))
        if problem:
            raise RetconvertError(f"weights {problem}")
        self.shuffle_buffer = shuffle_buffer
        self.text_field = text_field
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.consumed = [0] * len(self.specs)  # documents per source, this epoch
        self.tokens = [0] * len(self.specs)  # tokens per source (with EOS): this epoch; with weights, all along
        self.source_epochs = [0] * len(self.specs)  # with weights: times each source started over
        self.exhausted = [False] * len(self.specs)
        self.turn = 0
        self.carry: List[int] = []
        self.buffer: List[List[int]] = []
        self.rows_served = 0
        self._iters: List[Optional[object]] = [None] * len(self.specs)

    # Documents --------------------------------------------------------------------------------
    def _iter(self, i):
        if self._iters[i] is None:
            it = iter_texts(self.specs[i], self.text_field)
            for _ in range(self.consumed[i]):  # resume: skip what was already used
                next(it)
            self._iters[i] = it
        return self._iters[i]

    def _pick_source(self) -> int:
        """Without weights, each source in turn (an epoch ends when all are used up); with weights,
        the source whose tokens so far are furthest below its share (the lowest tokens / weight;
        ties to the first), each source starting over on its own when used up."""
        if self.weights is None:
            i = self.turn
            self.turn = (self.turn + 1) % len(self.specs)
            return i
        return min(range(len(self.specs)), key=lambda i: self.tokens[i] / self.weights[i])  # none is exhausted

    def _next_document(self) -> Tuple[int, str]:
        """(source index, text) of the next training document."""
        for _ in range(2 * len(self.specs) + 1):
            if all(self.exhausted):
                self.epoch += 1
                self.consumed = [0] * len(self.specs)
                self.tokens = [0] * len(self.specs)
                self.exhausted = [False] * len(self.specs)
                self._iters = [None] * len(self.specs)
                self.turn = 0
            i = self._pick_source()
            if self.exhausted[i]:
                continue
            try:
                text = next(self._iter(i))
            except StopIteration:
                self._iters[i] = None
                if self.weights is not None:  # shares hold: this source alone starts over
                    if self.consumed[i] == 0:
                        raise RetconvertError(f"training source {self.specs[i]} holds no documents") from None
                    self.consumed[i] = 0
                    self.source_epochs[i] += 1
                    continue
                self.exhausted[i] = True
                if all(self.exhausted) and sum(self.consumed) == 0:
                    raise RetconvertError(f"training sources {self.specs} hold no documents") from None
                continue
            self.consumed[i] += 1
            return i, text
        raise RetconvertError(f"training sources {self.specs} hold no documents")

    def _packed_row(self) -> List[int]:
        while len(self.carry) < self.seq_len:
            i, text = self._next_document()
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self.carry.extend(ids)
            self.carry.append(self.eos_id)
            self.tokens[i] += len(ids) + 1
        row, self.carry = self.carry[: self.seq_len], self.carry[self.seq_len:]
        return row

    # Rows -------------------------------------------------------------------------------------
    def next_row(self) -> List[int]:
        self.rows_served += 1
        if self.shuffle_buffer <= 1:
            return self._packed_row()
        while len(self.buffer) < self.shuffle_buffer:
            self.buffer.append(self._packed_row())
        j = int(torch.randint(len(self.buffer), (1,), generator=self.generator))
        row = self.buffer[j]
        self.buffer[j] = self.buffer[-1]
        self.buffer.pop()
        return row

    def next_rows(self, n: int) -> torch.Tensor:
        """(n, seq_len) token ids."""
        return torch.tensor([self.next_row() for _ in range(n)], dtype=torch.long)

    # Exact position ---------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"specs": list(self.specs), "seq_len": self.seq_len, "seed": self.seed, "epoch": self.epoch,
                "consumed": list(self.consumed), "tokens": list(self.tokens),
                "source_epochs": list(self.source_epochs), "exhausted": list(self.exhausted),
                "turn": self.turn,
                "carry": list(self.carry), "buffer": [list(r) for r in self.buffer],
                "rows_served": self.rows_served, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict):
        if state["seq_len"] != self.seq_len or len(state["consumed"]) != len(self.specs):
            raise RetconvertError("the checkpoint's data position belongs to other data settings "
                                  "(sources or seq_len changed); resume with the original config")
        self.epoch, self.turn, self.rows_served = state["epoch"], state["turn"], state["rows_served"]
        self.consumed, self.exhausted = list(state["consumed"]), list(state["exhausted"])
        # checkpoints written before token counts were kept: weights balance from here on
        self.tokens = list(state.get("tokens", [0] * len(self.specs)))
        self.source_epochs = list(state.get("source_epochs", [0] * len(self.specs)))
        self.carry, self.buffer = list(state["carry"]), [list(r) for r in state["buffer"]]
        self.generator.set_state(state["generator"])
        self._iters = [None] * len(self.specs)


def make_labels(input_ids: torch.Tensor, eos_id: int, attention_mask: Optional[torch.Tensor] = None,
                mask_doc_boundaries: bool = True) -> torch.Tensor:
    """HF-style labels (B, T): the inputs, with -100 where a prediction must not be scored.

    labels[:, t] is the target of the prediction made at position t-1 (the loss shifts).
    Masked: padding (attention_mask 0) and, with `mask_doc_boundaries`, the first token of a
    document, whose prediction from the previous document's EOS is noise.
    """
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    if mask_doc_boundaries:
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 1:] = input_ids[:, :-1] == eos_id
        labels[starts] = -100
    return labels


EVAL_MIN_TOKENS = 2  # perplexity scores every token after the first


def _source_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".")[0] if not path.startswith("hf:") else path[3:].replace("/", "_")


def eval_token_ids(specs: List[str], tokenizer, max_tokens: int, text_field: str = "text") -> Dict[str, List[int]]:
    """Held-out token streams (documents joined by EOS), one per source, keyed by file name.
    RetconvertError naming the source when one gives fewer than EVAL_MIN_TOKENS tokens."""
    out = {}
    for spec in specs:
        path = resolve_path(spec)
        ids = token_stream(iter_texts(path, text_field), tokenizer, max_tokens, separator_id=tokenizer.eos_token_id)
        if len(ids) < EVAL_MIN_TOKENS:
            raise RetconvertError(f"data.eval: {path} gives {len(ids)} tokens; perplexity needs at least "
                                  f"{EVAL_MIN_TOKENS} (a document with text in field {text_field!r})")
        out[_source_name(path)] = ids
    return out


def check_train_sources(specs: List[str], tokenizer, text_field: str = "text"):
    """RetconvertError naming the first training source with no document that has a token
    (reads each source up to its first such document; the stream repeats, so one suffices)."""
    if not specs:
        raise RetconvertError("no training sources given; set data.train")
    for spec in specs:
        path = resolve_path(spec)
        if not any(tokenizer(text, add_special_tokens=False)["input_ids"] for text in iter_texts(path, text_field)):
            raise RetconvertError(f"data.train: {path} holds no text; training needs at least one document "
                                  f"with at least 1 token in field {text_field!r}")
