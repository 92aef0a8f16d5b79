"""The window baseline (eval/window_baseline.py): the teacher over its last W tokens and its first token."""

import copy

import pytest
import torch
from tiny import random_ids, tiny_llama, tiny_model

from retconvert.errors import RetconvertError
from retconvert.eval.window_baseline import apply_window_baseline


def windowed(model, window):
    m = copy.deepcopy(model)
    apply_window_baseline(m, window)
    return m


@torch.no_grad()
def test_a_window_longer_than_the_row_changes_nothing():
    teacher = tiny_llama()
    ids = random_ids(2, 20)
    assert torch.allclose(windowed(teacher, 64)(ids).logits, teacher(ids).logits, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("window", [1, 4, 7])
def test_one_layer_sees_exactly_the_sink_and_the_window(window):
    """With one layer, position t's output depends only on tokens 0 and t-W+1..t: the same model run
    on those tokens alone, at their own positions (RoPE is relative), gives the same logits."""
    teacher = tiny_llama(num_hidden_layers=1)
    base = windowed(teacher, window)
    ids = random_ids(1, 19, seed=3)
    got = base(ids).logits[0]
    for t in range(ids.shape[1]):
        keep = sorted({0, *range(max(0, t - window + 1), t + 1)})
        want = teacher(ids[:, keep], position_ids=torch.tensor([keep])).logits[0, -1]
        assert torch.allclose(got[t], want, atol=1e-5), t


@torch.no_grad()
def test_the_sink_is_the_first_real_token_under_left_padding():
    teacher = tiny_llama()
    base = windowed(teacher, 3)
    ids = random_ids(1, 12, seed=5)
    padded = torch.cat([torch.full((1, 4), 2), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    got = base(padded, attention_mask=mask, position_ids=position_ids).logits[0, 4:]
    assert torch.allclose(got, base(ids).logits[0], atol=1e-5)


@torch.no_grad()
def test_generate_with_a_cache_equals_recomputing_every_step():
    base = windowed(tiny_llama(), 4)
    ids = random_ids(1, 10, seed=7)
    got = base.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    seq = ids
    for _ in range(6):  # greedy, the whole row each step: no cache involved
        seq = torch.cat([seq, base(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq)


def test_refuses_a_retnet_a_sliding_teacher_and_a_bad_window():
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=6))
    with pytest.raises(RetconvertError, match="already slides on layers"):
        apply_window_baseline(mistral, 3)
    with pytest.raises(RetconvertError, match="RetNet"):
        apply_window_baseline(tiny_model(), 64)
    with pytest.raises(RetconvertError, match="positive"):
        apply_window_baseline(tiny_llama(), 0)
