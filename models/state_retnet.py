"""The decoding state of a RetNet (`RetNetState`) and transformers' name for it.

This file travels inside every checkpoint (see `auto_map`): it imports only torch,
transformers and its sibling files, never retconvert.
"""

from typing import List, Optional, Tuple

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

# transformers 5.24 renamed the decoding cache from `past_key_values` to `cache`, in forward
# arguments and in output fields. This file speaks the installed version's name and accepts both.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def pick_cache(cache, past_key_values):
    """The state passed under either name (both at once is an error)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the decoding state once, as cache= (past_key_values= is its older name)")
    return cache if cache is not None else past_key_values


def layer_tensors(s) -> tuple:
    """The tensors of one layer's state: a matrix (retention), a `WindowState` (windowed retention:
    matrix, last keys, values and their mask, each batch-first) or None."""
    return () if s is None else (s,) if isinstance(s, torch.Tensor) else tuple(s)


def map_layer_state(fn, s):
    """One layer's state with `fn` applied to each of its tensors (same type; None stays None)."""
    return s if s is None else fn(s) if isinstance(s, torch.Tensor) else type(s)(*map(fn, s))


class RetNetState:
    """Decoding state of a RetNet: one (B, H, Dk', Dv') matrix per layer, whatever the context
    (a windowed layer's: a `WindowState`, the matrix plus its last W keys and values).

    transformers' `generate()` carries it from step to step (as `cache`, or `past_key_values`
    before transformers 5.24). `seen_tokens` counts the positions consumed (pads included), like
    a KV cache's length. A forward pass updates the state it is given in place.

    While `generate()` decodes, one-token steps run in the packed decoder (`decoder`, see
    decoding_retnet.py), which keeps the state in its own layout (`packed`: the (L, B, ...) state
    buffer and the next position of each row). Reading `states` converts it back, so module
    forwards, beam-search reordering and user code see the usual per-layer matrices.
    """

    is_linear = property(lambda self: [True] * len(self))  # generate(): no KV cache to slice
    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int, decoder=None):
        self._states: List[Optional[torch.Tensor]] = [None] * num_layers
        self.seen_tokens = 0
        self.decoder = decoder  # a RetNetDecoder for one-token steps, or None (module path)
        self.packed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def states(self) -> List[Optional[torch.Tensor]]:
        if self.packed is not None:
            self._states = self.decoder.unpack_state(self.packed[0], window=self.packed[2:], seen=self.seen_tokens)
            self.packed = None
        return self._states

    @states.setter
    def states(self, value: List[Optional[torch.Tensor]]):
        self._states, self.packed = value, None

    def use_decoder(self, decoder) -> "RetNetState":
        """Take later one-token steps through `decoder` (None: through the modules); a state
        packed by another decoder is unpacked first."""
        if decoder is not self.decoder:
            self._states = self.states
            self.decoder = decoder
        return self

    def __len__(self):
        return len(self._states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def copy(self) -> "RetNetState":
        """An independent copy (tensors cloned), in the same representation."""
        new = RetNetState(len(self), self.decoder)
        new.seen_tokens = self.seen_tokens
        new._states = [map_layer_state(torch.clone, s) for s in self._states]
        if self.packed is not None:
            new.packed = tuple(t.clone() for t in self.packed)
        return new

    def _select(self, fn) -> "RetNetState":
        """Apply `fn(tensor, batch_dim)` to every batch-indexed tensor (beam search, expansion)."""
        if self.packed is not None:  # (L, B, ...) buffer and (B,) positions
            # windowed: + per window group, an (L_g, B, ...) key/value cache and its (B, W) mask
            self.packed = tuple(fn(t, d) for t, d in zip(self.packed, (1, 0) * (len(self.packed) // 2)))
        self._states = [map_layer_state(lambda t: fn(t, 0), s) for s in self._states]
        return self

    def reorder_cache(self, beam_idx: torch.LongTensor) -> "RetNetState":
        """Select batch rows (beam search)."""
        return self._select(lambda t, d: t.index_select(d, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._select(lambda t, d: t.repeat_interleave(repeats, dim=d))

    def batch_select_indices(self, indices: torch.Tensor):
        self._select(lambda t, d: t.index_select(d, indices.to(t.device)))

    def nbytes(self) -> int:
        tensors = self.packed[:1] + self.packed[2:] if self.packed is not None else self._states
        return sum(t.numel() * t.element_size() for s in tensors for t in layer_tensors(s))
