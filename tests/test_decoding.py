"""The packed decoder (models/decoding_retnet.py) against the module path, for every feature."""

import pytest
from tiny import VARIANTS, assert_close, random_ids, tiny_model
import torch

from retconvert.models import kernels
from retconvert.models.decoding_retnet import RetNetDecoder
from retconvert.models.kernels import BACKENDS, HugePageArena, kernels_for
from retconvert.models.modeling_retnet import CACHE_NAME
from retconvert.models.retention import WindowState

OPS = {"numpy": kernels.NumpyOps, "torch": kernels.TorchOps}


@torch.no_grad()
def module_path(model, ids, prefix, attention_mask=None):
    """Logits of positions prefix-1 ... T-1 from a chunkwise prefill plus single-token steps."""
    model.config.retention_mode = "chunkwise"
    mask = attention_mask
    out = model(ids[:, :prefix], attention_mask=None if mask is None else mask[:, :prefix], use_cache=True)
    state, steps = out.past_key_values, [out.logits[:, -1]]
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=None if mask is None else mask[:, :t + 1],
                    past_key_values=state, use_cache=True)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), state


def decoder_path(decoder, ids, prefix, attention_mask=None):
    mask = None if attention_mask is None else attention_mask[:, :prefix]
    steps = [decoder.prefill(ids[:, :prefix], mask).clone()]
    for t in range(prefix, ids.shape[1]):
        steps.append(decoder.step(ids[:, t]).clone())
    return torch.stack(steps, 1)


CASES = [(variant, "auto", backend) for variant in VARIANTS for backend in BACKENDS] + [
    (variant, kernel, backend) for variant in ("converted-gqa", "default") for backend in BACKENDS
    for kernel in kernels_for(torch.float32, torch.device("cpu"), OPS[backend])]


@pytest.mark.parametrize("variant,kernel,backend", CASES)
def test_decoder_matches_module_path(variant, kernel, backend):
    model = tiny_model(**VARIANTS[variant])
    ids = random_ids(2, 23)
    want, want_state = module_path(model, ids, prefix=9)
    decoder = RetNetDecoder(model, batch_size=2, kernel=kernel, backend=backend)
    assert_close(decoder_path(decoder, ids, prefix=9), want, what=variant)
    # The exported state continues the module path exactly.
    got_state = decoder.export_state()
    assert got_state.seen_tokens == want_state.seen_tokens == 23
    for got, exp in zip(got_state.states, want_state.states):
        assert_close(got, exp, what="state")


# The features of the Qwen3, OLMo 2 and Gemma 2/3 students (their norm weights are randomised by
# tiny_model, so their affines are tested; the soft-cap is small enough to bend the logits).
LOCAL_GLOBAL_ROPE = [{"rope_theta": 1e4}, {"rope_theta": 1e6, "rotary_scaling": {"rope_type": "linear", "factor": 8.0}}]
GEMMA3_LIKE = dict(position_embedding_type="rotary", qk_norm="head", block_norms="sandwich", value_factor=1,
                   head_norm="none", score_bias=True, layer_rope=LOCAL_GLOBAL_ROPE)
FEATURES = {
    "qk-norm-head": dict(position_embedding_type="rotary", qk_norm="head", num_key_value_heads=2, score_bias=True,
                         norm_type="rmsnorm", mlp_type="glu", hidden_act="silu"),
    "qk-norm-full-post-norms": dict(position_embedding_type="rotary", qk_norm="full", block_norms="post",
                                    num_key_value_heads=2, score_bias=True, attention_sink=True, norm_type="rmsnorm"),
    "sandwich-layernorms": dict(block_norms="sandwich"),  # LayerNorm: the output norms' shifts too
    "logit-softcap": dict(final_logit_softcapping=0.5),
    "layer-rope": dict(position_embedding_type="rotary", layer_rope=LOCAL_GLOBAL_ROPE),
    "gemma3-like": dict(GEMMA3_LIKE, attention_sink=True, use_output_gate=False, num_key_value_heads=2,
                        mlp_type="glu", hidden_act="gelu_pytorch_tanh", norm_type="rmsnorm", embed_scale=32 ** 0.5,
                        final_logit_softcapping=1.0),
    "gemma3-like-windowed": dict(GEMMA3_LIKE, retention_window=4),
    "span-capped-windowed": dict(retention_window=4, max_retention_span=40),  # paper decays: 32..256 tokens
    "sink-distance-capped": dict(position_embedding_type="rotary", attention_sink=True, score_bias=True,
                                 num_key_value_heads=2, max_sink_distance=5),
    "sink-distance-capped-windowed": dict(position_embedding_type="rotary", attention_sink=True, score_bias=True,
                                          retention_window=4, max_sink_distance=11),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_decoder_packs_the_family_features(feature, backend):
    """q/k norms, post and sandwich block norms, logit soft-capping and per-layer RoPE: step logits
    and the exported state equal the module path's."""
    model = tiny_model(**FEATURES[feature])
    ids = random_ids(2, 23)
    want, want_state = module_path(model, ids, prefix=9)
    decoder = RetNetDecoder(model, batch_size=2, backend=backend)
    assert_close(decoder_path(decoder, ids, prefix=9), want, what=feature)
    for got, exp in zip(decoder.export_state().states, want_state.states):
        if isinstance(got, WindowState):
            assert torch.equal(got.mask, exp.mask)
            got, exp = (torch.cat([t.flatten() for t in s[:3]]) for s in (got, exp))  # state, keys, values
        assert_close(got, exp, what="state")


@pytest.mark.parametrize("feature", list(FEATURES))
def test_generate_steps_the_family_features_in_the_packed_decoder(feature):
    from test_generate import run

    model = tiny_model(**FEATURES[feature])
    ids = random_ids(2, 13)
    want, _ = run(model, False, ids, max_new_tokens=8, do_sample=False)
    got, lengths = run(model, True, ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want)
    assert lengths == [13] + [1] * 7  # one prompt pass, then one token per step
    assert got[CACHE_NAME].packed is not None  # the steps ran in the packed decoder


@pytest.mark.parametrize("variant", ["converted-gqa", "llama-like", "default"])
def test_decoder_left_padded_batch(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = random_ids(3, 20, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    want, _ = module_path(model, ids, prefix=12, attention_mask=mask)
    got = decoder_path(RetNetDecoder(model, batch_size=3), ids, prefix=12, attention_mask=mask)
    assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_stay_close(dtype, backend):
    model = tiny_model(**VARIANTS["converted-gqa"])
    ids = random_ids(1, 30)
    want, _ = module_path(model, ids, prefix=10)
    got = decoder_path(RetNetDecoder(model, dtype=dtype, backend=backend), ids, prefix=10)
    assert got.dtype == torch.float32
    # Weights rounded to 8 (bf16) or 11 (fp16) significant bits; the tiny model's large
    # random weights (std 0.2) amplify that more than a trained model does.
    assert_close(got, want, tol=6e-2 if dtype == torch.bfloat16 else 1e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_generate_matches_hf_generate():
    model = tiny_model(**VARIANTS["converted-gqa"])
    ids = random_ids(2, 13)
    want = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = RetNetDecoder(model, batch_size=2).generate(ids, max_new_tokens=10)
    assert torch.equal(got, want)


class Recorder:
    """A transformers-style streamer that keeps what it is given."""

    def __init__(self):
        self.parts, self.ended = [], False

    def put(self, value):
        self.parts.append(value.reshape(-1))

    def end(self):
        self.ended = True


def test_streamer_gets_what_transformers_streamers_get():
    model = tiny_model()
    ids = random_ids(1, 9)
    theirs, ours = Recorder(), Recorder()
    model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=theirs)
    RetNetDecoder(model).generate(ids, max_new_tokens=6, streamer=ours)
    assert ours.ended and len(ours.parts) == len(theirs.parts) == 7
    assert all(torch.equal(a, b) for a, b in zip(ours.parts, theirs.parts))


def test_generate_stops_rows_at_eos():
    model = tiny_model(**VARIANTS["converted-gqa"])
    ids = random_ids(2, 8)
    free = RetNetDecoder(model, batch_size=2).generate(ids, max_new_tokens=12)
    eos = int(free[0, 10])  # a token row 0 emits at its third step
    got = RetNetDecoder(model, batch_size=2).generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    first = (got[0, 8:] == eos).nonzero()[0].item()
    assert (got[0, 9 + first:] == 0).all()  # padded after its end token
    assert torch.equal(got[:, :8 + first + 1], free[:, :8 + first + 1])
    want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got[:, :want.shape[1]], want)  # transformers stops when every row is done


def test_sampling_is_seeded():
    model = tiny_model(**VARIANTS["converted-gqa"])
    ids = random_ids(1, 8)
    dec = RetNetDecoder(model)
    runs = [dec.generate(ids, 10, do_sample=True, top_k=5, temperature=0.8,
                         generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_state_buffer_is_fixed_and_reused():
    model = tiny_model(**VARIANTS["converted-gqa"])
    dec = RetNetDecoder(model)
    dec.prefill(random_ids(1, 50))
    buffer, nbytes = dec.state.data_ptr(), dec.state.nbytes
    for t in range(20):
        dec.step(torch.tensor([t + 1]))
    assert dec.state.data_ptr() == buffer and dec.state.nbytes == nbytes


def test_bad_kernel_or_backend_is_an_error():
    with pytest.raises(ValueError, match="kernel"):
        RetNetDecoder(tiny_model(), kernel="numpy:rows")
    with pytest.raises(ValueError, match="kernel='numpy:in_out' is not available"):
        RetNetDecoder(tiny_model(), kernel="numpy:in_out", backend="torch")
    with pytest.raises(ValueError, match="backend"):
        RetNetDecoder(tiny_model(), backend="jax")


def test_huge_page_arena_packs_aligned_tensors_that_outlive_it():
    arena = HugePageArena(block_bytes=4 << 20)
    a = arena.empty((1024, 1536), torch.float32)  # 6 MiB: a block of its own
    b = arena.empty((7, 3), torch.float16)
    c = arena.empty((5,), torch.float32)  # after b, on the next cache line
    if hasattr(kernels.mmap, "MADV_HUGEPAGE"):
        assert a.data_ptr() % (2 << 20) == 0
    assert c.data_ptr() - b.data_ptr() == 64
    a.copy_(torch.arange(a.numel(), dtype=torch.float32).view_as(a))
    b.fill_(2), c.fill_(3)
    assert a[3, 5] == 3 * 1536 + 5 and (b == 2).all() and (c == 3).all()
    view = a[1:].t()
    del a, arena
    assert view[0, 0] == 1536  # the mapping lives as long as a view of it


def test_kernel_choices_persist_between_processes(tmp_path, monkeypatch):
    """Timing the candidates costs seconds; a later process (here: an emptied in-memory cache)
    reads the choice from the file instead of timing again."""
    monkeypatch.setenv("RETCONVERT_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    monkeypatch.setattr(kernels, "_KERNEL_CACHE", {})
    cpu = torch.device("cpu")
    chosen = kernels.fastest_kernel((48, 32), torch.float32, cpu)
    assert chosen in kernels_for(torch.float32, cpu)
    monkeypatch.setattr(kernels, "_KERNEL_CACHE", {})

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again instead of reading the cache")

    monkeypatch.setattr(kernels, "PackedMatrix", no_timing)
    assert kernels.fastest_kernel((48, 32), torch.float32, cpu) == chosen
    (tmp_path / "kernels.json").write_text("{not json")  # a corrupt file is ignored, not fatal
    monkeypatch.setattr(kernels, "_KERNEL_CACHE", {})
    with pytest.raises(AssertionError, match="timed again"):
        kernels.fastest_kernel((48, 32), torch.float32, cpu)
