"""The RetNet model: forms agree, decoding matches the full forward, checkpoints load anywhere."""

import importlib
import json
import math
import os

import pytest
from tiny import (VARIANTS, assert_close, assert_loads_with_remote_code, left_padded_batch, random_ids, tiny_config,
                  tiny_model)
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import retconvert  # noqa: F401  (registers the Auto classes)
from retconvert.models import RetNetConfig, RetNetForCausalLM, RetNetState

retention_module = importlib.import_module("retconvert.models.retention")  # the package exports a same-named function

MODES = ("parallel", "chunkwise", "recurrent")


@torch.no_grad()
def logits(model, ids, mode=None, **kwargs):
    if mode is not None:
        model.config.retention_mode = mode
    return model(ids, use_cache=False, **kwargs).logits


# ------------------------------------------------------------------------------------------
# The three forms
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forms_agree(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = random_ids(2, 21)
    want = logits(model, ids, "parallel")
    for mode in ("chunkwise", "recurrent"):
        assert_close(logits(model, ids, mode), want, what=f"{variant} {mode}")


@pytest.mark.parametrize("window", [0, 4])
def test_max_retention_span_caps_the_decays_only(window):
    """max_retention_span=S runs every form as a model whose decays were clamped to 1 - 1/S,
    with the stored decay untouched; heads that already remember fewer tokens do not change."""
    capped = tiny_model(max_retention_span=48, retention_window=window, learnable_decay=True)
    clamped = tiny_model(retention_window=window, learnable_decay=True)
    with torch.no_grad():
        for layer in clamped.model.layers:
            layer.retention.decay_logit.clamp_(max=math.log(48 - 1))
    stored = [layer.retention.decay_logit.detach().clone() for layer in capped.model.layers]
    gamma = capped.model.layers[0].retention.gamma
    assert gamma.max() <= 1 - 1 / 48 + 1e-7 and (gamma < 1 - 1 / 48 - 1e-4).any()  # paper decays: 32, 64, ... tokens
    ids = random_ids(2, 21)
    want = logits(clamped, ids, "parallel")
    for mode in ("parallel", "chunkwise", "recurrent"):
        assert_close(logits(capped, ids, mode), want, what=f"window {window} {mode}")
    assert all(torch.equal(a, layer.retention.decay_logit) for a, layer in zip(stored, capped.model.layers))
    assert not torch.allclose(logits(tiny_model(retention_window=window), ids, "parallel"), want)


@pytest.mark.parametrize("window", [0, 4])
def test_max_sink_distance_changes_only_the_positions_past_it(window):
    """max_sink_distance=D: every form agrees; logits up to position D are the uncapped model's,
    past it they differ (the sink scored as from position D)."""
    opts = dict(position_embedding_type="rotary", attention_sink=True, score_bias=True, retention_window=window)
    capped, plain = tiny_model(max_sink_distance=6, **opts), tiny_model(**opts)
    ids = random_ids(2, 21)
    want = logits(capped, ids, "parallel")
    for mode in ("chunkwise", "recurrent"):
        assert_close(logits(capped, ids, mode), want, what=f"window {window} {mode}")
    base = logits(plain, ids, "parallel")
    assert_close(want[:, :7], base[:, :7], what="positions 0..6")
    assert (want[:, 7:] - base[:, 7:]).abs().amax(-1).min() > 1e-4  # every later position moves


class FormSpy:
    """Wraps the retention forms (the originals still do the work) and records which ran."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name, fn in list(retention_module.RETENTION_FORMS.items()):
            monkeypatch.setitem(retention_module.RETENTION_FORMS, name, self.wrap(name, fn))
        monkeypatch.setattr(retention_module, "retention_chunkwise",
                            self.wrap("chunkwise", retention_module.retention_chunkwise))

    def wrap(self, name, fn):
        def spy(q, *args, **kwargs):
            self.calls.append((name, q.shape[1], kwargs.get("chunk_size")))
            return fn(q, *args, **kwargs)
        return spy

    def pop(self):
        calls, self.calls = self.calls, []
        return calls


def test_retention_mode_read_at_every_forward(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config.retention_mode == "parallel"
    spy = FormSpy(monkeypatch)
    ids = random_ids(1, 20)

    want = logits(model, ids)
    assert spy.pop() == [("parallel", 20, None)] * 2  # one call per layer

    model.config.retention_mode = "chunkwise"
    model.config.chunk_size = 5
    assert_close(logits(model, ids), want)
    assert spy.pop() == [("chunkwise", 20, 5)] * 2

    model.config.retention_mode = "recurrent"
    assert_close(logits(model, ids), want)
    assert spy.pop() == [("recurrent", 20, None)] * 2

    # A single new token always takes the recurrent form, whatever the configured mode.
    model.config.retention_mode = "parallel"
    with torch.no_grad():
        state = model(ids[:, :19], use_cache=True).past_key_values
        model(ids[:, 19:], past_key_values=state, use_cache=True)
    assert [c[0] for c in spy.pop()] == ["parallel", "parallel", "recurrent", "recurrent"]


# ------------------------------------------------------------------------------------------
# Decoding with the recurrent state
# ------------------------------------------------------------------------------------------

DECODE_VARIANTS = ["default", "llama-like", "learned-positions"]


@pytest.mark.parametrize("prefill_mode", ["parallel", "chunkwise"])
@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_prefill_then_decode_matches_full_forward(variant, prefill_mode):
    model = tiny_model(**VARIANTS[variant])
    ids = random_ids(2, 20)
    want = logits(model, ids, "parallel")

    model.config.retention_mode = prefill_mode
    with torch.no_grad():
        out = model(ids[:, :11], use_cache=True)
        state = out.past_key_values
        assert isinstance(state, RetNetState) and state.seen_tokens == 11
        steps = [out.logits]
        for t in range(11, 20):
            out = model(ids[:, t:t + 1], past_key_values=state, use_cache=True)
            assert out.past_key_values is state
            steps.append(out.logits)
    assert state.seen_tokens == 20
    assert_close(torch.cat(steps, 1), want)


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_left_padded_batch_decoding(variant):
    model = tiny_model(**VARIANTS[variant])
    model.config.retention_mode = "chunkwise"
    rows = [random_ids(1, 18, seed=2)[0], random_ids(1, 13, seed=3)[0], random_ids(1, 6, seed=4)[0]]
    ids, mask = left_padded_batch(rows)
    alone = [logits(model, r[None], "parallel")[0] for r in rows]

    full = logits(model, ids, "chunkwise", attention_mask=mask)
    with torch.no_grad():
        out = model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
        state, steps = out.past_key_values, [out.logits]
        for t in range(12, ids.shape[1]):  # generate() passes the mask of the whole context
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=state, use_cache=True)
            steps.append(out.logits)
    decoded = torch.cat(steps, 1)
    for i, r in enumerate(rows):
        real = slice(ids.shape[1] - len(r), None)
        assert_close(full[i, real], alone[i], what=f"row {i} full forward")
        assert_close(decoded[i, real], alone[i], what=f"row {i} decoded")


def greedy(model, ids, mode, **kwargs):
    model.config.retention_mode = mode
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("variant", ["default", "llama-like"])
def test_greedy_generate(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = random_ids(2, 19)
    want = greedy(model, ids, "parallel")
    assert want.shape == (2, 8)
    for mode in ("chunkwise", "recurrent"):
        assert torch.equal(greedy(model, ids, mode), want), mode
    # Without the state generate() re-reads the whole sequence each step: same tokens.
    assert torch.equal(greedy(model, ids, "parallel", use_cache=False), want)


def test_greedy_generate_from_inputs_embeds():
    """A prompt given as embeddings is not in input_ids: decoding must still feed the new token."""
    model = tiny_model()
    ids = random_ids(2, 11)
    want = greedy(model, ids, "chunkwise")
    embeds = model.get_input_embeddings()(ids).detach()
    got = model.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:, -8:], want)


def test_greedy_generate_left_padded():
    model = tiny_model()
    rows = [random_ids(1, 17, seed=5)[0], random_ids(1, 9, seed=6)[0], random_ids(1, 4, seed=7)[0]]
    ids, mask = left_padded_batch(rows)
    for mode in MODES:
        batch = greedy(model, ids, mode, attention_mask=mask)
        for i, r in enumerate(rows):
            assert torch.equal(batch[i], greedy(model, r[None], mode)[0]), (mode, i)


def test_state_size_is_constant():
    model = tiny_model()
    ids = random_ids(2, 100)
    with torch.no_grad():
        state = model(ids[:, :10], use_cache=True).past_key_values
        after_10 = state.nbytes()
        for t in range(10, 100):
            model(ids[:, t:t + 1], past_key_values=state, use_cache=True)
        prefilled_100 = model(ids, use_cache=True).past_key_values.nbytes()
    assert state.seen_tokens == 100
    cfg = model.config
    # One (B, H, Dk, Dv + 1) fp32 matrix per layer; the extra column carries the score sums.
    expected = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * cfg.qk_head_dim * (cfg.v_head_dim + 1) * 4
    assert after_10 == state.nbytes() == prefilled_100 == expected


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_same_grads(monkeypatch):
    model = tiny_model(score_bias=True, learnable_decay=True).train()
    ids = random_ids(2, 20)

    def grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, want = grads()
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model.gradient_checkpointing_enable()
    loss_ckpt, got = grads()
    assert len(calls) == model.config.num_hidden_layers  # the checkpointed path really ran
    assert "model.layers.0.retention.decay_logit" in want
    assert set(got) == set(want) and len(want) == len(list(model.parameters()))
    assert torch.allclose(loss_ckpt, loss, rtol=1e-6)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = tiny_model(**VARIANTS["llama-like"])
    ids = random_ids(2, 15)
    want = logits(model, ids)
    model.save_pretrained(tmp_path)

    for cls in (RetNetForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, RetNetForCausalLM)
        assert torch.equal(logits(loaded, ids), want)
    assert loaded.config.to_dict()["score_bias"] is True

    files = set(os.listdir(tmp_path))
    assert {"modeling_retnet.py", "configuration_retnet.py", "retention.py", "config.json"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_retnet.RetNetConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_retnet.RetNetForCausalLM"


def test_auto_classes_registered():
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("retnet", hidden_size=32, num_attention_heads=4), RetNetConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is RetNetForCausalLM


def test_trust_remote_code_without_retconvert(tmp_path):
    """The checkpoint's own code loads, runs and generates where retconvert is not importable."""
    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    assert_loads_with_remote_code(ckpt, tmp_path, random_ids(2, 13))


# ------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30), "hidden_size=30 is not divisible by num_attention_heads=4"),
        (dict(retention_mode="fast"), "retention_mode='fast' is not supported"),
        (dict(chunk_size=0), "chunk_size=0 must be a positive integer"),
        (dict(chunk_size=-1), "chunk_size=-1 must be a positive integer"),
        (dict(decay_gammas=[0.0, 0.5, 0.9, 0.99]), r"decay 0\.0 is outside \(0, 1\)"),
        (dict(decay_gammas=[0.5, 0.9, 0.99, 1.0]), r"decay 1\.0 is outside \(0, 1\)"),
        (dict(decay_gammas=[0.5, 1.5, 0.9, 0.99]), r"decay 1\.5 is outside \(0, 1\)"),
        (dict(decay_gammas=[-0.1, 0.5, 0.9, 0.99]), r"decay -0\.1 is outside \(0, 1\)"),
        (dict(decay_gammas=[0.5, 0.9, 0.99]), "decay_gammas row has 3 values for 4 heads"),
        (dict(decay_gammas=[[0.5] * 4] * 3), "decay_gammas has 3 rows for 2 layers"),
        (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (dict(head_norm="layernorm"), "head_norm='layernorm' is not supported"),
        (dict(hidden_size=36, position_embedding_type="rotary"), "head_dim=9 is odd"),
        (dict(hidden_size=36), "head_dim=9 is odd"),
        (dict(max_retention_span=1), "max_retention_span=1 must be an integer >= 2"),
        (dict(max_retention_span=64.0), "max_retention_span=64.0 must be an integer >= 2"),
        (dict(max_sink_distance=-1), "max_sink_distance=-1 must be an integer >= 0"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_odd_head_dim_allowed_without_rotation():
    assert tiny_config(hidden_size=36, position_embedding_type="none").qk_head_dim == 9
