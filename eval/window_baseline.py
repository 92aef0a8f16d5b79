"""The window baseline: the teacher attending only to its last W tokens and its row's first token.

A windowed student (`--window W`) keeps exact softmax over the last W tokens and adds a decayed
state for everything older. The teacher restricted the same way, with its first token kept
visible as an attention sink (StreamingLLM, arXiv 2309.17453), is what the window alone buys
with nothing trained (`../shared/notes/window-baseline.md`: 1.15x the teacher's C4 perplexity at
W = 64 on 512-token rows). A windowed student is worth its state only where it beats this.

The restriction goes through transformers' attention interface (`AttentionInterface`,
`AttentionMaskInterface`): a registered attention function that narrows the usual causal and
padding mask, then runs transformers' own SDPA attention. The weights are the teacher's.
"""

from functools import partial

import torch

from retconvert.errors import RetconvertError


def window_sink_attention(module, query, key, value, attention_mask, *, window: int, **kwargs):
    """SDPA attention over the last `window` keys and the row's first key.

    query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D), the Tq queries being the last Tq of the Tk
    positions (a prompt, or one step after a dynamic cache; a static cache, whose keys run past the
    queries, is not supported). attention_mask: None (causal, no padding) or
    bool (B, 1, Tq, Tk), True where a query may attend (transformers' `sdpa_mask`). The row's
    first token is its first key that the last query may see (the first non-padding token).
    Returns transformers' `sdpa_attention_forward` output: ((B, Tq, H, D), None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Tq, Tk = query.shape[0], query.shape[-2], key.shape[-2]
    q_pos = torch.arange(Tk - Tq, Tk, device=query.device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=query.device)[None, :]  # (1, Tk)
    if attention_mask is None:
        allowed = (k_pos <= q_pos).expand(B, 1, Tq, Tk)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        raise RetconvertError(f"the window baseline needs a boolean attention mask, got {attention_mask.dtype}; "
                              "pass a 2D attention_mask (batch, tokens), not a prepared 4D one")
    first = allowed[:, :, -1, :].int().argmax(-1)  # (B, 1): the row's first visible key
    sink = k_pos.view(1, 1, 1, Tk) == first[:, :, None, None]  # (B, 1, 1, Tk)
    mask = allowed & ((q_pos - k_pos < window) | sink)  # (B, 1, Tq, Tk)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


def apply_window_baseline(model, window: int) -> str:
    """Make a transformers causal LM attend to its last `window` tokens and its first token, in place.

    Registers the attention function under `retconvert_window{window}_sink` (once per window) and
    switches `model` to it. Returns that name. Raises RetconvertError for a window < 1 or a model
    without transformers attention (a RetNet).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(window, int) or window < 1:
        raise RetconvertError(f"window baseline {window!r} must be a positive number of tokens, e.g. 64")
    if getattr(model.config, "model_type", None) == "retnet":
        raise RetconvertError("the window baseline restricts a Transformer's attention; the first --model "
                              "(the teacher) is a RetNet")
    from retconvert.convert.families import teacher_windows

    sliding = [i for i, w in enumerate(teacher_windows(model.config)) if w]
    if sliding:  # the sink rule below reads the first key a query may see, a mid-row token there
        raise RetconvertError(f"the window baseline narrows full-attention layers, but this teacher already slides "
                              f"on layers {sliding[:4]}{'...' if len(sliding) > 4 else ''}; compare with a "
                              "full-attention teacher")
    name = f"retconvert_window{window}_sink"
    AttentionInterface.register(name, partial(window_sink_attention, window=window))
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, NotImplementedError) as e:
        raise RetconvertError(f"{type(model).__name__} cannot take a custom attention function ({e}); "
                              "the window baseline needs a transformers model with the attention interface") from None
    return name
