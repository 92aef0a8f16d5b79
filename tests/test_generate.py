"""generate() decodes with the recurrent state: one prompt pass, then one token per step, through
the packed decoder by default, on every transformers in the supported range.

A spy on the model's forward calls records how many positions each call feeds; a decoding that
re-reads the prefix (what transformers 5.24 did to this model before) shows up as growing lengths.
"""

import logging

import pytest
from tiny import VARIANTS, left_padded_batch, random_ids, tiny_model
import torch
from transformers.utils import logging as hf_logging

from retconvert.models.modeling_retnet import CACHE_NAME

NEW = 5


class ForwardSpy:
    """Records the number of positions fed by each forward call of a model."""

    def __init__(self, model):
        self.lengths = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs["inputs_embeds"] if x is None else x
        self.lengths.append(x.shape[1])

    def pop(self):
        lengths, self.lengths = self.lengths, []
        return lengths


def run(model, packed, *args, **kwargs):
    """generate() with the packed decoder on or off; returns (sequences, forward lengths)."""
    model.packed_generation = packed
    spy = ForwardSpy(model)
    try:
        out = model.generate(*args, pad_token_id=0, **kwargs)
    finally:
        spy.handle.remove()
    return out, spy.pop()


@pytest.fixture
def model():
    return tiny_model()


@pytest.mark.parametrize("packed", [True, False])
def test_one_prompt_pass_then_one_token_per_step(model, packed):
    ids = random_ids(2, 10)
    out, lengths = run(model, packed, ids, max_new_tokens=NEW, do_sample=False)
    assert out.shape == (2, 10 + NEW)
    assert lengths == [10] + [1] * (NEW - 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_steps_give_the_module_path_tokens(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = random_ids(2, 13)
    want, _ = run(model, False, ids, max_new_tokens=8, do_sample=False)
    got, _ = run(model, True, ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    no_state, lengths = run(model, False, ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(no_state, want) and lengths == list(range(13, 21))


def test_packed_steps_are_used(model):
    ids = random_ids(1, 9)
    model.packed_generation = True
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    state = out[CACHE_NAME]
    assert state.packed is not None and state.seen_tokens == 9 + 3


@pytest.mark.parametrize("packed", [True, False])
def test_prompt_as_inputs_embeds(model, packed):
    ids = random_ids(2, 11)
    want, _ = run(model, packed, ids, max_new_tokens=NEW, do_sample=False)
    embeds = model.get_input_embeddings()(ids).detach()
    got, lengths = run(model, packed, inputs_embeds=embeds, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got[:, -NEW:], want[:, -NEW:])
    assert lengths == [11] + [1] * (NEW - 1)


@pytest.mark.parametrize("packed", [True, False])
def test_left_padded_batch(model, packed):
    rows = [random_ids(1, n, seed=s)[0] for n, s in ((15, 5), (8, 6), (3, 7))]
    ids, mask = left_padded_batch(rows)
    batch, lengths = run(model, packed, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert lengths == [15] + [1] * (NEW - 1)
    for i, r in enumerate(rows):
        alone, _ = run(model, packed, r[None], max_new_tokens=NEW, do_sample=False)
        assert torch.equal(batch[i, -NEW:], alone[0, -NEW:]), i


@pytest.mark.parametrize("name", [CACHE_NAME, "past_key_values"])
@pytest.mark.parametrize("packed", [True, False])
def test_continue_from_a_returned_state(model, packed, name):
    ids = random_ids(2, 12)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    state = first[CACHE_NAME]
    held = [s.clone() for s in state.copy().states]
    seen = state.seen_tokens
    seq = first.sequences  # the state has read all but the last generated token
    want, _ = run(model, packed, seq, max_new_tokens=NEW, do_sample=False)
    got, lengths = run(model, packed, seq, max_new_tokens=NEW, do_sample=False, **{name: state})
    assert torch.equal(got, want)
    assert lengths == [1] * NEW  # only the token the state had not read, then one per step
    # The state the caller holds is unchanged: it can seed another continuation.
    assert state.seen_tokens == seen
    assert all(torch.equal(a, b) for a, b in zip(state.copy().states, held))
    again, _ = run(model, packed, seq, max_new_tokens=NEW, do_sample=False, **{name: state})
    assert torch.equal(again, want)


def test_state_that_read_more_than_the_inputs_is_refused(model):
    ids = random_ids(1, 12)
    state = model.generate(ids, max_new_tokens=3, pad_token_id=0, return_dict_in_generate=True)[CACHE_NAME]
    with pytest.raises(ValueError, match="pass the whole sequence"):
        model.generate(ids[:, :5], cache=state, max_new_tokens=2, pad_token_id=0)


def test_both_cache_names_at_once_is_refused(model):
    ids = random_ids(1, 6)
    state = model.generate(ids, max_new_tokens=2, pad_token_id=0, return_dict_in_generate=True)[CACHE_NAME]
    with pytest.raises(ValueError, match="pass the decoding state once"):
        model.generate(ids, cache=state, past_key_values=state, max_new_tokens=2, pad_token_id=0)


@pytest.mark.parametrize("packed", [True, False])
def test_sampling(model, packed):
    ids = random_ids(2, 10)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        out, lengths = run(model, packed, ids, max_new_tokens=NEW, do_sample=True, top_k=20, use_cache=use_cache)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert lengths == list(range(10, 10 + NEW))  # the last run had no state


@pytest.mark.parametrize("packed", [True, False])
def test_beam_search_reorders_the_state(model, packed):
    ids = random_ids(2, 9)
    kw = dict(max_new_tokens=NEW, do_sample=False, num_beams=3, num_return_sequences=2)
    want, _ = run(model, packed, ids, use_cache=False, **kw)
    got, lengths = run(model, packed, ids, **kw)
    assert torch.equal(got, want)
    assert lengths == [9] + [1] * (NEW - 1)


def test_packed_decoder_is_rebuilt_when_weights_change(model):
    ids = random_ids(1, 7)
    model.generate(ids, max_new_tokens=2, pad_token_id=0)
    decoder = model._generation_decoder()
    assert model._generation_decoder() is decoder  # kept between calls
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # in place: same data pointer, new version
    assert model._generation_decoder() is not decoder
    want, _ = run(model, False, ids, max_new_tokens=4, do_sample=False)
    got, _ = run(model, True, ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_no_deprecation_warnings(model, caplog):
    hf_logging.enable_propagation()
    type(logging.getLogger()).warning_once.cache_clear()  # transformers warns once per process
    ids = random_ids(1, 6)
    with caplog.at_level(logging.WARNING):
        out = model.generate(ids, max_new_tokens=3, pad_token_id=0, return_dict_in_generate=True)
        model.generate(out.sequences, max_new_tokens=2, pad_token_id=0, **{CACHE_NAME: out[CACHE_NAME]})
        model(ids, use_cache=True)
    assert "deprecated" not in caplog.text


def test_generate_leaves_the_thread_count_as_it_found_it(model):
    """Packed steps run torch on one thread beside OpenBLAS's; generate() restores the count."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model.generate(random_ids(1, 6), max_new_tokens=4, pad_token_id=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
