"""Windowed retention (exact softmax over the last W tokens beside the decayed state): the three
forms against the naive definition, padding, the model, generation and what refuses it."""

import pytest
import torch
from tiny import assert_close, random_ids, tiny_model

from retconvert.models import RetNetConfig
from retconvert.models.retention import (
    WindowState,
    windowed_retention,
    windowed_retention_naive,
)

GAMMAS = [0.5, 0.9, 0.99]
B, DK, DV = 2, 5, 4  # Dk != Dv so that a transposed state cannot pass
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_near(got, want, tol, what):
    """Max error relative to the largest reference entry, or absolute below 1 (a state may be 0)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max() / want.abs().max().clamp(min=1.0)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def make_leaves(T, W, dtype, initial_state, sink, seed=0, device="cpu"):
    """Leaf tensors on `device`: q, k, v, gamma, optionally a sink (score, value) and a
    WindowState whose cache is part full in row 0 and full in row 1 (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    H = len(GAMMAS)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    leaves = {"q": randn(B, T, H, DK, scale=0.7), "k": randn(B, T, H, DK, scale=0.7), "v": randn(B, T, H, DV),
              "gamma": torch.tensor(GAMMAS, dtype=torch.float64)}
    if sink:
        leaves["sink_score"], leaves["sink_value"] = randn(B, T, H), randn(H, DV)
    if initial_state:
        mask = torch.ones(B, W, dtype=torch.bool)
        mask[0, : W // 2 + 1] = False
        leaves["state"] = randn(B, H, DK, DV + 1, scale=0.3)
        leaves["keys"] = randn(B, W, H, DK, scale=0.7) * mask[:, :, None, None]
        leaves["values"] = randn(B, W, H, DV) * mask[:, :, None, None]
        leaves["_mask"] = mask
    return {n: (x.to(device) if n == "_mask" else x.to(device, dtype).requires_grad_()) for n, x in leaves.items()}


def call(form, leaves, W, token_mask=None, **kwargs):
    """Output and final state of `form`, and the gradients of a fixed random projection of both."""
    L = leaves
    state = WindowState(L["state"], L["keys"], L["values"], L["_mask"]) if "state" in L else None
    sink = (L["sink_score"], L["sink_value"]) if "sink_score" in L else None
    o, s = form(L["q"], L["k"], L["v"], L["gamma"], W, initial_state=state, token_mask=token_mask, sink=sink,
                **kwargs)
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()  # o's dtype and device
    for x in s[:3]:
        loss = loss + (x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)).sum()
    names = [n for n in L if n != "_mask"]
    grads = torch.autograd.grad(loss, [L[n] for n in names], allow_unused=True)
    return o, s, dict(zip(names, grads))


def check(mode, chunk_size, T, W, dtype=torch.float64, initial_state=True, sink=True, token_mask=None,
          device="cpu", **kwargs):
    """The form on `device` against the naive definition on the CPU in fp64; `kwargs` (the
    soft-cap) go to both."""
    leaves = make_leaves(T, W, dtype, initial_state, sink, device=device)
    mask = None if token_mask is None else token_mask.to(device)
    o, s, grads = call(windowed_retention, leaves, W, mask, mode=mode, chunk_size=chunk_size, **kwargs)
    o, s = o.cpu(), [x.cpu() for x in s]
    grads = {n: None if x is None else x.cpu() for n, x in grads.items()}
    ref = {n: x.cpu() if n == "_mask" else x.detach().cpu().double().requires_grad_() for n, x in leaves.items()}
    o_ref, s_ref, grads_ref = call(windowed_retention_naive, ref, W, token_mask, **kwargs)
    tol = TOL[dtype]
    assert o.dtype == dtype
    assert_near(o, o_ref, tol, "output")
    for name, got, want in zip(WindowState._fields, s, s_ref):
        if name == "mask":
            assert torch.equal(got, want), (got, want)
        else:
            assert_near(got, want, tol, f"final {name}")
    for name, want in grads_ref.items():
        if want is None:  # a leaf the output does not depend on (e.g. no cache token is ever seen)
            assert grads[name] is None or grads[name].abs().max() == 0, name
        else:
            assert_near(grads[name], want, tol, f"d/d{name}")


MODES = [("parallel", 64), ("recurrent", 1), ("chunkwise", 1), ("chunkwise", 5), ("chunkwise", 16),
         ("chunkwise", 64)]


@pytest.mark.parametrize("T", [1, 13, 30])
@pytest.mark.parametrize("mode,chunk_size", MODES, ids=[f"{m}{c}" for m, c in MODES])
def test_forms_match_naive(mode, chunk_size, T):
    """Outputs, all four state parts and every gradient (q, k, v, gamma, sink, initial state),
    odd lengths, several chunk sizes, a cache part full in one row and full in the other."""
    check(mode, chunk_size, T, W=4)


@pytest.mark.parametrize("W", [1, 7, 40, 1000])
@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 8), ("recurrent", 1)])
def test_window_sizes_fp32_and_empty_start(mode, chunk_size, W):
    """A window of 1, shorter than a chunk, longer than the sequence, far longer (a layer widened
    to full attention: the empty cache slots are skipped); fp32; no initial state."""
    check(mode, chunk_size, 23, W, dtype=torch.float32, initial_state=False, sink=False)
    check(mode, chunk_size, 23, W, initial_state=False, sink=True)


def padded_mask(T: int) -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:5] = 0  # inside, across the 5-token chunk boundary
    mask[0, 11:18] = 0  # longer than the window
    mask[1, :4] = 0  # leading
    mask[1, -3:] = 0  # trailing
    return mask


@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 5), ("recurrent", 1)])
def test_padding_matches_naive(mode, chunk_size):
    check(mode, chunk_size, 26, W=4, token_mask=padded_mask(26))
    # no initial state: the empty cache slots are skipped, a window far past the text included
    check(mode, chunk_size, 26, W=1000, initial_state=False, token_mask=padded_mask(26))


@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 5), ("recurrent", 1)])
def test_padding_is_invisible(mode, chunk_size):
    """A row with pads gives its real tokens the outputs, and ends in the state, of the same row
    with the pads removed: a pad is in no window, adds no key and does not decay the state."""
    T, W = 26, 4
    leaves = {n: x.detach() for n, x in make_leaves(T, W, torch.float64, True, True).items()}
    mask = padded_mask(T)
    state = WindowState(leaves["state"], leaves["keys"], leaves["values"], leaves["_mask"])
    args = (leaves["gamma"], W, mode)
    o, s = windowed_retention(leaves["q"], leaves["k"], leaves["v"], *args, chunk_size=chunk_size,
                              initial_state=state, token_mask=mask,
                              sink=(leaves["sink_score"], leaves["sink_value"]))
    for b in range(B):
        real = mask[b].bool()
        row = lambda x: x[b:b + 1, real]  # noqa: E731
        o_b, s_b = windowed_retention(row(leaves["q"]), row(leaves["k"]), row(leaves["v"]), *args,
                                      chunk_size=chunk_size, initial_state=WindowState(*(x[b:b + 1] for x in state)),
                                      sink=(row(leaves["sink_score"]), leaves["sink_value"]))
        assert_near(o[b:b + 1, real], o_b, 1e-12, f"row {b} output")
        for name, got, want in zip(WindowState._fields, s, s_b):
            assert torch.equal(got[b:b + 1], want) if name == "mask" else True
            if name != "mask":
                assert_near(got[b:b + 1], want, 1e-12, f"row {b} {name}")


def test_state_continues_across_calls_and_stays_constant():
    """Chunkwise over a prefix, then token by token from its state, equals one parallel call; the
    state's size does not grow with the context."""
    T, W = 40, 6
    L = {n: x.detach() for n, x in make_leaves(T, W, torch.float64, False, False).items()}
    q, k, v, gamma = L["q"], L["k"], L["v"], L["gamma"]
    o_full, s_full = windowed_retention(q, k, v, gamma, W, "parallel")
    o1, s = windowed_retention(q[:, :17], k[:, :17], v[:, :17], gamma, W, "chunkwise", chunk_size=5)
    outs, sizes = [o1], set()
    for t in range(17, T):
        o_t, s = windowed_retention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], gamma, W, "recurrent",
                                    initial_state=s)
        outs.append(o_t)
        sizes.add(tuple(tuple(x.shape) for x in s))
    assert_near(torch.cat(outs, 1), o_full, 1e-12, "split output")
    for name, got, want in zip(WindowState._fields, s, s_full):
        assert torch.equal(got, want) if name == "mask" else True
        if name != "mask":
            assert_near(got, want, 1e-12, f"split {name}")
    assert len(sizes) == 1  # constant in the context


def test_softmax_inside_the_window_and_decay_beyond():
    """Direct checks of the definition: with every token inside the window the output is exact
    softmax attention; a token just beyond it enters with weight gamma^W (q . k)."""
    T, W, H = 5, 8, 1
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, T, H, DK, generator=g, dtype=torch.float64), torch.randn(1, T, H, DK, generator=g,
                                                                                  dtype=torch.float64)
    v = torch.randn(1, T, H, DV, generator=g, dtype=torch.float64)
    gamma = torch.tensor([0.8], dtype=torch.float64)
    o, _ = windowed_retention(q, k, v, gamma, W, "parallel")
    scores = torch.einsum("bthd,bshd->bhts", q, k).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    want = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    assert_near(o, want, 1e-12, "softmax")
    # Window 1: position 1 sees itself through softmax and token 0 through gamma^1 (q1 . k0).
    o, _ = windowed_retention(q[:, :2], k[:, :2], v[:, :2], gamma, 1, "parallel")
    e = torch.exp((q[0, 1, 0] * k[0, 1, 0]).sum())
    lin = 0.8 * (q[0, 1, 0] * k[0, 0, 0]).sum()
    assert_near(o[0, 1, 0], (e * v[0, 1, 0] + lin * v[0, 0, 0]) / (e + lin.abs()), 1e-12, "window 1")


# the scores q.k here are ~N(0, 1.2): a cap of 1 bends most of them
CAPS = [dict(softcap=1.0), dict(softcap=1.0, softcap_channels=DK - 1)]  # the second: the last channel a bias feature


@pytest.mark.parametrize("cap", CAPS, ids=["all-channels", "bias-channel"])
@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 5), ("recurrent", 1)])
def test_softcapped_forms_match_naive(mode, chunk_size, cap):
    """With the window's scores soft-capped: outputs, states and gradients of every form equal the
    naive definition, with a cache, a sink and padding."""
    check(mode, chunk_size, 26, W=4, token_mask=padded_mask(26), **cap)
    check(mode, chunk_size, 13, W=4, **cap)


def test_softcap_bends_the_window_scores_only():
    """Every token inside the window: exact softmax of c tanh(q.k / c), not of q.k; the uncapped
    output differs (the test can fail). Window 1: the token beyond enters with its raw score
    gamma (q . k), uncapped. A score-bias channel adds after the cap."""
    T, W, H, c = 6, 8, 1, 1.0
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, T, H, DK, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, T, H, DV, generator=g, dtype=torch.float64)
    gamma = torch.tensor([0.8], dtype=torch.float64)
    causal = torch.ones(T, T).triu(1).bool()
    scores = torch.einsum("bthd,bshd->bhts", q, k)
    assert scores.abs().max() > 2 * c  # the cap is active

    def softmax_out(s):
        return torch.einsum("bhts,bshd->bthd", s.masked_fill(causal, float("-inf")).softmax(-1), v)

    o, _ = windowed_retention(q, k, v, gamma, W, "parallel", softcap=c)
    assert_near(o, softmax_out(c * torch.tanh(scores / c)), 1e-12, "capped softmax")
    assert not torch.allclose(o, softmax_out(scores), atol=1e-3)
    # a bias feature b (q gets b, k gets 1): the softmax over the window ignores b, capped or not
    b = 3.0
    qb, kb = torch.cat([q, torch.full_like(q[..., :1], b)], -1), torch.cat([k, torch.ones_like(k[..., :1])], -1)
    o_b, _ = windowed_retention(qb, kb, v, gamma, W, "parallel", softcap=c, softcap_channels=DK)
    assert_near(o_b, o, 1e-12, "capped softmax with a bias feature")
    o, _ = windowed_retention(q[:, :2], k[:, :2], v[:, :2], gamma, 1, "parallel", softcap=c)
    e = torch.exp(c * torch.tanh(scores[0, 0, 1, 1] / c))
    lin = 0.8 * scores[0, 0, 1, 0]
    assert_near(o[0, 1, 0], (e * v[0, 1, 0] + lin * v[0, 0, 0]) / (e + lin.abs()), 1e-12, "window 1, capped")


def test_bad_window_and_state_are_one_line_errors():
    L = {n: x.detach() for n, x in make_leaves(5, 4, torch.float64, True, False).items()}
    state = WindowState(L["state"], L["keys"], L["values"], L["_mask"])
    with pytest.raises(ValueError, match="window of at least 1 token, got 0"):
        windowed_retention(L["q"], L["k"], L["v"], L["gamma"], 0, "parallel")
    with pytest.raises(ValueError, match="holds 4 tokens but the window is 3"):
        windowed_retention(L["q"], L["k"], L["v"], L["gamma"], 3, "parallel", initial_state=state)
    with pytest.raises(ValueError, match="unknown retention mode 'fused'"):
        windowed_retention(L["q"], L["k"], L["v"], L["gamma"], 4, "fused")
    with pytest.raises(ValueError, match="the window's score soft-cap must be positive, got -1.0"):
        windowed_retention(L["q"], L["k"], L["v"], L["gamma"], 4, "parallel", softcap=-1.0)


@pytest.mark.parametrize("value, message", [
    (-1, "retention_window=-1 must be an integer >= 0"),
    (2.5, "retention_window=2.5 must be an integer >= 0"),
])
def test_config_validates_the_window(value, message):
    with pytest.raises(ValueError, match=message):
        RetNetConfig(retention_window=value)
    with pytest.raises(ValueError, match="needs retention_normalization='paper'"):
        RetNetConfig(retention_window=8, retention_normalization="none")
    assert RetNetConfig().retention_window == 0  # pure retention stays the default


@pytest.mark.parametrize("value, message", [
    ([4, 0], r"retention_window has 2 entries for 3 layers; give one window per layer"),
    ([4, -1, 0], r"retention_window\[1\]=-1 must be an integer >= 0"),
    ([4, 2.5, 0], r"retention_window\[1\]=2.5 must be an integer >= 0"),
    ([True, 0, 0], r"retention_window\[0\]=True must be an integer >= 0"),
])
def test_config_validates_per_layer_windows(value, message):
    with pytest.raises(ValueError, match=message) as err:
        RetNetConfig(num_hidden_layers=3, retention_window=value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs retention_normalization='paper'"):
        RetNetConfig(num_hidden_layers=3, retention_window=[0, 8, 0], retention_normalization="none")
    config = RetNetConfig(num_hidden_layers=3, retention_window=(4, 0, 4))  # a tuple is stored as a list
    assert config.retention_window == [4, 0, 4] and config.layer_windows == [4, 0, 4] and config.layer_window(1) == 0
    assert RetNetConfig(num_hidden_layers=3, retention_window=8).layer_windows == [8, 8, 8]
    assert RetNetConfig.from_dict(config.to_dict()).layer_windows == [4, 0, 4]  # survives config.json


@pytest.mark.parametrize("value", [0, -5.0, float("inf"), float("nan"), "50", True])
def test_config_validates_the_window_softcap(value):
    with pytest.raises(ValueError) as err:
        RetNetConfig(retention_window=4, window_logit_softcapping=value)
    assert str(err.value) == (f"RetNetConfig: window_logit_softcapping={value!r} must be a positive number; set it > 0 "
                               "(the teacher's attn_logit_softcapping, e.g. 50.0) or None for uncapped window scores")
    config = RetNetConfig(retention_window=4, window_logit_softcapping=50.0)
    assert RetNetConfig.from_dict(config.to_dict()).window_logit_softcapping == 50.0  # survives config.json
    assert RetNetConfig().window_logit_softcapping is None  # no cap by default


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------

WINDOWED = {  # window 5 < the test sequences; chunk_size 8 (tiny_config) spans several chunks
    "default": dict(retention_window=5),
    "converted-gqa": dict(retention_window=5, position_embedding_type="rotary", value_factor=1, head_norm="none",
                          head_norm_affine=True, score_bias=True, attention_sink=True, use_output_gate=False,
                          num_key_value_heads=2, mlp_type="glu", hidden_act="silu", norm_type="rmsnorm",
                          learnable_decay=True),
    # per-layer windows: two window lengths (two caches in the packed decoder) and a pure layer between
    "mixed": dict(retention_window=[3, 0, 5], num_hidden_layers=3, position_embedding_type="rotary", value_factor=1,
                  head_norm="none", head_norm_affine=True, score_bias=True, attention_sink=True,
                  use_output_gate=False, num_key_value_heads=2, mlp_type="glu", hidden_act="silu",
                  norm_type="rmsnorm", learnable_decay=True),
}
# the window's scores soft-capped at 1 (this model's scores reach ~9): bias feature, sink, a pure layer
WINDOWED["capped"] = dict(WINDOWED["mixed"], window_logit_softcapping=1.0)
# a hybrid: its last layer widened far past the text (full attention), its cache never full
WINDOWED["hybrid"] = dict(WINDOWED["mixed"], retention_window=[3, 0, 1000])


@torch.no_grad()
def logits(model, ids, mode, **kwargs):
    model.config.retention_mode = mode
    return model(ids, **kwargs).logits


@pytest.mark.parametrize("variant", list(WINDOWED))
def test_model_forms_agree_and_state_decodes(variant):
    model = tiny_model(**WINDOWED[variant])
    ids = random_ids(2, 21)
    want = logits(model, ids, "parallel", use_cache=False)
    assert_close(logits(model, ids, "chunkwise", use_cache=False), want, what="chunkwise")
    assert_close(logits(model, ids, "recurrent", use_cache=False), want, what="recurrent")
    # prefill 9 tokens, then one token at a time from the state
    model.config.retention_mode = "chunkwise"
    with torch.no_grad():
        out = model(ids[:, :9], use_cache=True)
        state, steps = out.past_key_values, [out.logits]
        windows = model.config.layer_windows
        assert [isinstance(s, WindowState) for s in state.states] == [w > 0 for w in windows]
        assert [s.keys.shape[1] for s in state.states if isinstance(s, WindowState)] == [w for w in windows if w]
        for t in range(9, 21):
            out = model(ids[:, t:t + 1], past_key_values=state, use_cache=True)
            state = out.past_key_values
            steps.append(out.logits)
    assert_close(torch.cat(steps, 1), want, what="prefill + steps")
    # the window changes the model (it is not pure retention under another name), and so does the cap
    pure = tiny_model(**dict(WINDOWED[variant], retention_window=0))
    assert not torch.allclose(logits(pure, ids, "parallel", use_cache=False), want, atol=1e-3)
    if model.config.window_logit_softcapping is not None:
        uncapped = tiny_model(**dict(WINDOWED[variant], window_logit_softcapping=None))
        assert not torch.allclose(logits(uncapped, ids, "parallel", use_cache=False), want, atol=1e-3)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_mixed_layers_equal_uniform_models_layer_by_layer(mode):
    """A model with per-layer windows computes, layer by layer, what a model with that layer's
    window on every layer computes (same weights), in each form; and its state after a prefill
    continues it token by token."""
    variant = WINDOWED["mixed"]
    model = tiny_model(**variant)
    ids = random_ids(2, 13)
    uniform = {w: tiny_model(**dict(variant, retention_window=w)) for w in set(model.config.layer_windows)}
    for m in uniform.values():
        m.load_state_dict(model.state_dict())
        m.config.retention_mode = mode
    model.config.retention_mode = mode
    pos = torch.arange(13).expand(2, 13)
    with torch.no_grad():
        hidden = model(ids, use_cache=False, output_hidden_states=True).hidden_states
        last = len(model.model.layers) - 1  # hidden: each layer's input, then the final norm's output
        for i, w in enumerate(model.config.layer_windows):
            want, _ = uniform[w].model.layers[i](hidden[i], pos, output_final_state=False)
            want = model.model.norm(want) if i == last else want
            assert_close(hidden[i + 1], want, what=f"layer {i} (window {w})")
        got = model(ids, use_cache=False).logits
        state = model(ids[:, :6], use_cache=True).past_key_values
        steps = [model(ids[:, t:t + 1], past_key_values=state, use_cache=True).logits for t in range(6, 13)]
    assert_close(torch.cat(steps, 1), got[:, 6:], what="prefill + steps")


def test_training_gradients_match_across_forms():
    model = tiny_model(**WINDOWED["converted-gqa"]).train()
    ids = random_ids(2, 19)
    grads = {}
    for mode in ("parallel", "chunkwise"):
        model.zero_grad()
        model.config.retention_mode = mode
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "model.layers.0.retention.decay_logit" in grads["parallel"]
    for name, g in grads["parallel"].items():
        assert_close(grads["chunkwise"][name], g, what=name)


@pytest.mark.parametrize("variant", list(WINDOWED))
def test_left_padded_batch_equals_single_rows(variant):
    model = tiny_model(**WINDOWED[variant])
    ids = random_ids(3, 14, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0  # the row is shorter than... longer than the window: 5 real tokens
    model.config.retention_mode = "chunkwise"
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for b in range(3):
            real = mask[b].bool()
            single = model(ids[b:b + 1, real]).logits
            assert_close(batched[b:b + 1, real], single, what=f"row {b}")


@pytest.mark.parametrize("variant", ["converted-gqa", "mixed", "hybrid"])
def test_generate_greedy_left_padded_and_beam_search(variant):
    model = tiny_model(**WINDOWED[variant])
    model.config.retention_mode = "chunkwise"
    ids = random_ids(2, 7, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    # greedy by hand, each row alone, every step through the full parallel forward
    for b in range(2):
        row = ids[b:b + 1, mask[b].bool()]
        for _ in range(9):
            row = torch.cat([row, logits(model, row, "parallel", use_cache=False)[:, -1:].argmax(-1)], 1)
        assert torch.equal(gen[b, -9:], row[0, -9:]), (b, gen[b], row)
    # beam search reorders and expands the window caches (RetNetState.reorder_cache etc.): the same
    # beams as without any state (every step recomputes the whole sequence)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0)
    with_state = model.generate(ids, attention_mask=mask, **kwargs)
    without = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(with_state, without), (with_state, without)


def test_state_helpers_handle_window_caches():
    model = tiny_model(**WINDOWED["default"])
    with torch.no_grad():
        state = model(random_ids(2, 9), use_cache=True).past_key_values
    s0 = state.states[0]
    nbytes = state.nbytes()
    assert nbytes == sum(t.numel() * t.element_size() for s in state.states for t in s)
    copy = state.copy()
    state.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(state.states[0].keys[0], s0.keys[1]) and torch.equal(state.states[0].mask[0], s0.mask[1])
    assert torch.equal(copy.states[0].keys, s0.keys)  # the copy is independent
    copy.batch_repeat_interleave(2)
    assert copy.states[1].values.shape[0] == 4 and copy.nbytes() == 2 * nbytes
    copy.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(copy.states[0].state[1], s0.state[1])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("variant", list(WINDOWED))
@pytest.mark.parametrize("prefix", [3, 9])  # the cache part full, then full, when the decoder takes over
def test_packed_decoder_matches_module_path(variant, backend, prefix):
    from test_decoding import decoder_path, module_path

    from retconvert.models.decoding_retnet import RetNetDecoder

    model = tiny_model(**WINDOWED[variant])
    ids = random_ids(2, 17)
    want, want_state = module_path(model, ids, prefix=prefix)
    decoder = RetNetDecoder(model, batch_size=2, backend=backend)
    assert_close(decoder_path(decoder, ids, prefix=prefix), want, what=variant)
    got_state = decoder.export_state()  # continues the module path exactly
    for got, exp in zip(got_state.states, want_state.states):
        for name, g, e in zip(WindowState._fields, got, exp):
            if name == "mask":
                assert torch.equal(g, e)
            elif not e.any():  # nothing has left a full-attention layer's window: zero, up to fp32 rounding
                assert g.abs().max() <= 1e-6, f"state {name}"
            else:
                assert_close(g, e, what=f"state {name}")


@pytest.mark.parametrize("variant", ["converted-gqa", "mixed", "hybrid"])
def test_packed_decoder_left_padded_and_generate_paths_agree(variant):
    from test_decoding import decoder_path, module_path

    from retconvert.models.decoding_retnet import RetNetDecoder

    model = tiny_model(**WINDOWED[variant])
    ids = random_ids(3, 16, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :8] = 0
    want, _ = module_path(model, ids, prefix=10, attention_mask=mask)
    assert_close(decoder_path(RetNetDecoder(model, batch_size=3), ids, 10, mask), want, what="left padded")
    # generate(): steps in the packed decoder (the default) or through the modules, same tokens
    kwargs = dict(attention_mask=mask[:, :10], max_new_tokens=8, do_sample=False, pad_token_id=0)
    packed = model.generate(ids[:, :10], **kwargs)
    model.packed_generation = False
    try:
        modules = model.generate(ids[:, :10], **kwargs)
    finally:
        model.packed_generation = True
    assert torch.equal(packed, modules), (packed, modules)


def test_generate_follows_a_window_changed_between_calls():
    """The packed decoder kept for generate() is rebuilt when the windows change (e.g. a layer
    widened to full softmax), not only when a weight does: same tokens as a model built so."""
    model = tiny_model(**WINDOWED["mixed"])
    ids = random_ids(1, 12, seed=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.generate(ids, **kwargs)  # builds and keeps the decoder for windows [3, 0, 5]
    model.config.retention_window = [3, 64, 5]  # layer 1: every earlier token in its window
    got = model.generate(ids, **kwargs)
    want = tiny_model(**dict(WINDOWED["mixed"], retention_window=[3, 64, 5])).generate(ids, **kwargs)
    assert torch.equal(got, want), (got, want)


def test_torchscale_export_refuses_a_windowed_model():
    from retconvert.convert.torchscale_export import TorchscaleExportError, to_torchscale

    with pytest.raises(TorchscaleExportError, match=r"retention_window=5 \(torchscale's retention has no"):
        to_torchscale(tiny_model(**WINDOWED["default"]))
    with pytest.raises(TorchscaleExportError, match=r"retention_window=\[3, 0, 5\] \(torchscale's retention has no"):
        to_torchscale(tiny_model(**WINDOWED["mixed"]))


@pytest.mark.parametrize("variant", ["converted-gqa", "mixed", "capped", "hybrid"])
def test_a_windowed_checkpoint_loads_with_remote_code(variant, tmp_path):
    from tiny import assert_loads_with_remote_code

    model = tiny_model(**WINDOWED[variant])
    model.save_pretrained(tmp_path / "ckpt")
    assert_loads_with_remote_code(tmp_path / "ckpt", tmp_path, random_ids(2, 11))


# ------------------------------------------------------------------------------------------
# Conversion: --window, and calibration of a windowed student
# ------------------------------------------------------------------------------------------


def test_calibration_decomposition_is_the_layer_output():
    """What calibration computes once per (gamma) and combines per (b, w): the window's terms
    with scores q.k and the linear part A + b Z + sink, shifted by b, equal the windowed output
    with scores b + q.k, also with the window's scores soft-capped."""
    from retconvert.models.retention import combine_window, windowed_retention_terms

    L = {n: x.detach() for n, x in make_leaves(19, 4, torch.float64, False, True).items()}
    q, k, v, gamma = L["q"], L["k"], L["v"], L["gamma"]
    b = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    ones = torch.ones_like(q[..., :1])
    soft, shift, A, _ = windowed_retention_terms(q, k, v, gamma, 4, 5)
    Z = windowed_retention_terms(ones, ones, v, gamma, 4, 5)[2]
    sink = (L["sink_score"], L["sink_value"])
    got = combine_window(soft, shift + b[:, None], A + b[:, None] * Z, sink)
    qb = torch.cat([q, b.view(1, 1, -1, 1).expand_as(q[..., :1])], -1)
    kb = torch.cat([k, ones], -1)
    want, _ = windowed_retention(qb, kb, v, gamma, 4, "chunkwise", chunk_size=5, sink=sink)
    assert_near(got, want, 1e-12, "decomposition")
    # soft-capped: the cap acts on q.k and b adds after it, so e^b still factors out of the window
    soft, shift = windowed_retention_terms(q, k, v, gamma, 4, 5, softcap=1.0)[:2]
    got = combine_window(soft, shift + b[:, None], A + b[:, None] * Z, sink)
    want, _ = windowed_retention(qb, kb, v, gamma, 4, "chunkwise", chunk_size=5, sink=sink, softcap=1.0,
                                 softcap_channels=q.shape[-1])
    assert_near(got, want, 1e-12, "decomposition, soft-capped")
    # what conversion runs per candidate decay: the linear part alone, the same numbers
    none_soft, none_shift, A_only, _ = windowed_retention_terms(q, k, v, gamma, 4, 5, window_terms=False)
    assert none_soft is None and none_shift is None
    assert_near(A_only, A, 1e-12, "linear part alone")


def test_from_hf_window_calibrates_and_loads(tmp_path):
    import json

    from tiny import save_teacher, tiny_llama, tiny_text, write_jsonl

    from retconvert.cli import main as cli

    teacher_dir = save_teacher(tiny_llama(), tmp_path / "teacher")
    calib = write_jsonl(tmp_path / "calib.jsonl", tiny_text())
    out = tmp_path / "student"
    args = ["from-hf", str(teacher_dir), "--out", str(out), "--calib-data", str(calib), "--calib-tokens", "256",
            "--calib-seq-len", "64", "--window", "8"]
    assert cli(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["retention_window"] == 8 and config["conversion"]["options"]["window"] == 8
    report = json.loads((out / "conversion_report.json").read_text())
    assert all(0 <= layer["rel_error"] <= 1 + 1e-6 for layer in report["layers"])
    from transformers import AutoModelForCausalLM

    import retconvert  # noqa: F401

    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.retention_window == 8
    ids = torch.randint(3, 40, (2, 21))
    with torch.no_grad():  # decoding from the state equals the full forward
        full = student(ids, use_cache=False).logits
        state = student(ids[:, :10], use_cache=True).past_key_values
        step = [student(ids[:, t:t + 1], past_key_values=state, use_cache=True).logits for t in range(10, 21)]
    assert_close(torch.cat(step, 1), full[:, 10:], what="decode")


def test_bad_window_option_is_one_line_error(tmp_path, capsys):
    from retconvert.cli import main as cli

    assert cli(["from-hf", "smollm2-135m", "--out", str(tmp_path / "x"), "--window", "-3"]) == 2
    err = capsys.readouterr().err
    assert "--window -3 must be 0 (pure RetNet), a token count such as 64, one per layer, or 'teacher'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_eval_suite_runs_a_windowed_student(tmp_path, monkeypatch):
    """The eval suite on a windowed student: quality, long range, speed (its packed decoder
    included) and memory, whose decoding cache stays the same size at every context."""
    import json
    import math

    from test_eval import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from retconvert.cli import main as cli
    from retconvert.convert.student import ConvertOptions, build_student

    data = tmp_path / "data"  # the shared layout, a few rows
    sentences = ["the quick brown fox jumps over the lazy dog and runs far away"] * 6
    for rel, rows in {"c4/c4_heldout.jsonl": [{"text": " ".join(sentences)}] * 4,
                      "eval/lambada_openai_test.jsonl": [{"text": s} for s in sentences]}.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "ppl").mkdir()
    (data / "ppl/wikitext-2-raw-test.txt").write_text("\n".join(sentences * 4) + "\n")
    monkeypatch.setenv("RETCONVERT_DATA", str(data))
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    student = build_student(LlamaForCausalLM(config).eval(), ConvertOptions(chunk_size=8, window=8)).eval()
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    out = tmp_path / "report"
    rc = cli(["eval", "--model", str(tmp_path / "student"), "--out", str(out), "--suite",
              "quality,longrange,speed,memory", "--tasks", "lambada_openai", "--limit", "3", "--contexts", "16,32",
              "--batch-sizes", "1,2", "--passkey-lengths", "96", "--passkey-trials", "1", "--position-docs", "1",
              "--position-length", "64", "--ppl-tokens", "200", "--ppl-window", "32", "--ppl-stride", "16",
              "--decode-steps", "2", "--prefill-repeats", "1"])
    assert rc == 0
    (m,) = json.loads((out / "results.json").read_text())["models"]
    r = m["results"]
    assert m["is_retnet"] and math.isfinite(r["quality"]["perplexity"]["c4"]["ppl"])
    assert len(r["speed"]["decode_packed"]["points"]) == 4
    cache = [p["cache_bytes"] for p in r["memory"]["points"]]
    assert cache[0] == cache[1] > 0  # the W-token cache and the state: constant in the context


def test_half_precision_keeps_an_fp32_state():
    """bf16 inputs over 256 tokens, every form: the decayed state stays fp32 (bf16 would round
    a decay of 0.99 to 0.988 and drop small updates), the output within bf16's rounding of the
    fp64 reference on the same rounded inputs."""
    leaves = make_leaves(256, 4, torch.bfloat16, initial_state=False, sink=False)
    ref = {n: x.detach().double().requires_grad_() for n, x in leaves.items()}
    o_ref, s_ref, _ = call(windowed_retention_naive, ref, 4)
    for mode, chunk_size in (("parallel", 64), ("chunkwise", 16), ("recurrent", 1)):
        o, s, _ = call(windowed_retention, leaves, 4, mode=mode, chunk_size=chunk_size)
        assert o.dtype == torch.bfloat16 and s.state.dtype == torch.float32, mode
        assert_near(o, o_ref, 3e-2, f"{mode} output")
        assert_near(s.state, s_ref.state, 3e-2, f"{mode} final state")
