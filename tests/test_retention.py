"""The three retention forms against the naive recurrence: outputs, final states and gradients."""

import functools

import pytest
import torch

from retconvert.models.retention import (
    retention,
    retention_chunkwise,
    retention_naive,
    retention_parallel,
    retention_recurrent,
)

GAMMAS = [0.5, 0.9, 0.99, 0.999]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
B, DK, DV = 2, 8, 6  # Dk != Dv so that a transposed state cannot pass


def make_inputs(T, dtype, initial_state, kv_heads=None, seed=0):
    """Leaf tensors q, k, v (k, v possibly with fewer heads) and an optional initial state."""
    g = torch.Generator().manual_seed(seed)
    H = len(GAMMAS)
    Hkv = kv_heads or H
    leaves = {
        "q": torch.randn(B, T, H, DK, generator=g, dtype=torch.float64) * 0.3,
        "k": torch.randn(B, T, Hkv, DK, generator=g, dtype=torch.float64) * 0.3,
        "v": torch.randn(B, T, Hkv, DV, generator=g, dtype=torch.float64),
    }
    if initial_state:
        leaves["initial_state"] = torch.randn(B, H, DK, DV, generator=g, dtype=torch.float64) * 0.3
    return {name: x.to(dtype).requires_grad_() for name, x in leaves.items()}


def run(form, leaves, gamma, **kwargs):
    """Output, final state and the gradients of a fixed random projection of both."""
    H = gamma.shape[0]
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if k.shape[2] != H:  # grouped-query: expand, gradients go back to the shared heads
        k = k.repeat_interleave(H // k.shape[2], dim=2)
        v = v.repeat_interleave(H // v.shape[2], dim=2)
    o, state = form(q, k, v, gamma, initial_state=leaves.get("initial_state"), **kwargs)
    g = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)  # o's dtype and device
    w_s = torch.randn(state.shape, generator=g, dtype=torch.float64).to(o)
    loss = (o * w_o).sum() + (state * w_s).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, state, dict(zip(leaves, grads))


def assert_close(name, got, want, tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().clamp(min=1.0)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def check_against_naive(form, T, dtype, initial_state, kv_heads=None, token_mask=None):
    gamma = torch.tensor(GAMMAS, dtype=dtype)
    leaves = make_inputs(T, dtype, initial_state, kv_heads)
    o, s, grads = run(form, leaves, gamma, token_mask=token_mask)
    # The reference always runs in fp64, from the same (possibly fp32-rounded) inputs.
    ref_leaves = {n: x.detach().double().requires_grad_() for n, x in leaves.items()}
    o_ref, s_ref, grads_ref = run(retention_naive, ref_leaves, gamma.double(), token_mask=token_mask)
    assert o.dtype == dtype and s.dtype == dtype
    tol = TOL[dtype]
    assert_close("output", o, o_ref, tol)
    assert_close("final state", s, s_ref, tol)
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert_close(f"d/d{name}", grads[name], grads_ref[name], tol)


FORMS = {
    "parallel": retention_parallel,
    "recurrent": retention_recurrent,
    "chunkwise16": functools.partial(retention_chunkwise, chunk_size=16),
}


@pytest.mark.parametrize("initial_state", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("form", list(FORMS))
def test_form_matches_naive(form, T, dtype, initial_state):
    check_against_naive(FORMS[form], T, dtype, initial_state)


@pytest.mark.parametrize("initial_state", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("chunk_size", [1, 16, 64, 100])
def test_chunkwise_any_chunk_size(chunk_size, T, initial_state):
    form = functools.partial(retention_chunkwise, chunk_size=chunk_size)
    check_against_naive(form, T, torch.float64, initial_state)


LONG_CASES = {  # T = 257 is slow-ish with every combination: a few representative ones
    "parallel-fp64": (retention_parallel, torch.float64),
    "recurrent-fp64": (retention_recurrent, torch.float64),
    "chunkwise64-fp64": (functools.partial(retention_chunkwise, chunk_size=64), torch.float64),
    "chunkwise100-fp32": (functools.partial(retention_chunkwise, chunk_size=100), torch.float32),
}


@pytest.mark.parametrize("case", list(LONG_CASES))
def test_long_sequence(case):
    form, dtype = LONG_CASES[case]
    check_against_naive(form, 257, dtype, initial_state=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("form", list(FORMS))
def test_grouped_query(form, dtype):
    """k, v with 2 heads serving 4 query heads; their gradients sum over the served heads."""
    check_against_naive(FORMS[form], 37, dtype, initial_state=True, kv_heads=2)


def test_dispatcher():
    leaves = make_inputs(20, torch.float64, initial_state=True)
    q, k, v, s0 = (leaves[n].detach() for n in ("q", "k", "v", "initial_state"))
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    want = retention_naive(q, k, v, gamma, initial_state=s0)
    for mode in ("parallel", "chunkwise", "recurrent"):
        o, s = retention(q, k, v, gamma, mode, chunk_size=8, initial_state=s0)
        assert_close(mode, o, want[0], 1e-10)
        assert_close(mode + " state", s, want[1], 1e-10)
    with pytest.raises(ValueError, match="unknown retention mode 'fused'"):
        retention(q, k, v, gamma, "fused")


@pytest.mark.parametrize("initial_state", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_without_final_state(mode, T, initial_state):
    """output_final_state=False returns None for the state and the same output and gradients."""
    leaves = make_inputs(T, torch.float64, initial_state)
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    args = (leaves["q"], leaves["k"], leaves["v"], gamma, mode)
    kwargs = {"chunk_size": 16, "initial_state": leaves.get("initial_state")}
    o, _ = retention(*args, **kwargs)
    o_only, s = retention(*args, **kwargs, output_final_state=False)
    assert s is None
    assert_close("output", o_only, o, 1e-12)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=o.dtype)
    for name, g_only, g in zip(leaves, torch.autograd.grad((o_only * w).sum(), list(leaves.values())),
                               torch.autograd.grad((o * w).sum(), list(leaves.values()))):
        assert_close(f"d/d{name}", g_only, g, 1e-12)


def test_state_continues_across_calls():
    """Splitting a sequence and passing the state along equals one call (the decoding contract)."""
    leaves = make_inputs(50, torch.float64, initial_state=False)
    q, k, v = (leaves[n].detach() for n in ("q", "k", "v"))
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    o_full, s_full = retention_parallel(q, k, v, gamma)
    o1, s1 = retention_chunkwise(q[:, :30], k[:, :30], v[:, :30], gamma, chunk_size=7)
    o2, s2 = retention_recurrent(q[:, 30:], k[:, 30:], v[:, 30:], gamma, initial_state=s1)
    assert_close("split output", torch.cat([o1, o2], 1), o_full, 1e-10)
    assert_close("split state", s2, s_full, 1e-10)


# --------------------------------------------------------------------------------------------
# Padding: a masked position adds no key and does not decay the state
# --------------------------------------------------------------------------------------------


def padded_mask(T: int) -> torch.Tensor:
    """(B, T) masks with pads inside (row 0: two runs, one across a chunk boundary of 8 and 16)
    and at both ends (row 1: leading, trailing and a whole 8-chunk in the middle)."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:7] = 0
    mask[0, 14:18] = 0
    mask[1, :3] = 0
    mask[1, 16:24] = 0
    mask[1, -2:] = 0
    return mask


MASKED_FORMS = dict(FORMS, chunkwise8=functools.partial(retention_chunkwise, chunk_size=8),
                    chunkwise1=functools.partial(retention_chunkwise, chunk_size=1))


@pytest.mark.parametrize("initial_state", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("form", list(MASKED_FORMS))
def test_padding_leaves_the_state_unchanged(form, initial_state):
    """Each row with its pads gives its real tokens exactly the outputs, and ends in exactly the
    state, of the same row with the pads removed (keys masked but decay running through the
    pads, as before, is off by up to 0.26 relative here)."""
    T = 37
    leaves = make_inputs(T, torch.float64, initial_state)
    q, k, v = (leaves[n].detach() for n in ("q", "k", "v"))
    s0 = leaves["initial_state"].detach() if initial_state else None
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    mask = padded_mask(T)
    o, s = MASKED_FORMS[form](q, k, v, gamma, initial_state=s0, token_mask=mask)
    for b in range(B):
        real = mask[b].bool()
        o_b, s_b = retention_naive(q[b:b + 1, real], k[b:b + 1, real], v[b:b + 1, real], gamma,
                                   initial_state=None if s0 is None else s0[b:b + 1])
        assert_close(f"row {b} output", o[b:b + 1, real], o_b, 1e-12)
        assert_close(f"row {b} state", s[b:b + 1], s_b, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("form", list(MASKED_FORMS))
def test_padded_form_matches_naive(form, dtype):
    """Outputs (pads included), states and gradients of the masked forms against the masked
    recurrence, grouped-query heads and an initial state included."""
    check_against_naive(MASKED_FORMS[form], 37, dtype, initial_state=True, kv_heads=2, token_mask=padded_mask(37))


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_dispatcher_padding(mode):
    """The dispatcher passes the mask on; a mask without zeros is the same as none."""
    leaves = make_inputs(29, torch.float64, initial_state=True)
    q, k, v, s0 = (leaves[n].detach() for n in ("q", "k", "v", "initial_state"))
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    mask = padded_mask(29)
    want = retention_naive(q, k, v, gamma, initial_state=s0, token_mask=mask)
    got = retention(q, k, v, gamma, mode, chunk_size=8, initial_state=s0, token_mask=mask)
    assert_close(mode, got[0], want[0], 1e-10)
    assert_close(mode + " state", got[1], want[1], 1e-10)
    plain = retention(q, k, v, gamma, mode, chunk_size=8, initial_state=s0)
    ones = retention(q, k, v, gamma, mode, chunk_size=8, initial_state=s0, token_mask=torch.ones_like(mask))
    assert_close(mode + " all-ones mask", ones[0], plain[0], 1e-12)


# --------------------------------------------------------------------------------------------
# CUDA dispatch to fla's kernels (wiring only: no GPU here; a stand-in with fla's signature)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_cuda_dispatch_to_fla_kernels(monkeypatch, mode):
    import importlib

    module = importlib.import_module("retconvert.models.retention")
    calls = []

    def stand_in(name):
        def kernel(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
            calls.append(name)
            assert scale == 1.0 and output_final_state  # the layer scales k itself; the state is kept
            assert g.shape == q.shape[:3] and g.dtype == torch.float32  # per-token log gate (B, T, H)
            assert torch.equal(g, g[:1, :1].expand_as(g))  # constant per head
            return retention_naive(q, k, v, g[0, 0].exp().to(q.dtype), initial_state)
        return kernel

    monkeypatch.setattr(module, "_FLA", (stand_in("chunk"), stand_in("recurrent")))
    monkeypatch.setattr(module, "use_fla", lambda q: True)
    q, k, v, s0 = (make_inputs(13, torch.float64, True)[name] for name in ("q", "k", "v", "initial_state"))
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    out, state = retention(q, k, v, gamma, mode, initial_state=s0)
    want_out, want_state = retention_parallel(q, k, v, gamma, initial_state=s0)
    assert_close("fla output", out, want_out, 1e-6)  # the gate goes in as fp32: gamma rounded to 24 bits
    assert_close("fla state", state, want_state, 1e-6)
    assert calls == ["recurrent" if mode == "recurrent" else "chunk"]


def test_cuda_fla_padding_is_a_zero_gate(monkeypatch):
    """With fla, a pad goes in as log gate 0 (decay 1) and a zero key."""
    import importlib

    module = importlib.import_module("retconvert.models.retention")

    def gated_recurrence(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
        S, outs = initial_state.clone(), []
        for t in range(q.shape[1]):  # fla's simple GLA: S_t = exp(g_t) S_{t-1} + k_t^T v_t
            S = g[:, t, :, None, None].exp().to(S.dtype) * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, 1), S

    monkeypatch.setattr(module, "_FLA", (gated_recurrence, gated_recurrence))
    monkeypatch.setattr(module, "use_fla", lambda q: True)
    q, k, v, s0 = (make_inputs(29, torch.float64, True)[name].detach() for name in ("q", "k", "v", "initial_state"))
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    mask = padded_mask(29)
    out, state = retention(q, k, v, gamma, "chunkwise", initial_state=s0, token_mask=mask)
    want_out, want_state = retention_naive(q, k, v, gamma, initial_state=s0, token_mask=mask)
    assert_close("fla output", out, want_out, 1e-6)  # the gate goes in as fp32
    assert_close("fla state", state, want_state, 1e-6)


def test_fla_not_used_on_cpu():
    from retconvert.models.retention import use_fla

    assert not use_fla(torch.zeros(1, 2, 3, 4))


# --------------------------------------------------------------------------------------------
# Half precision: states in fp32
# --------------------------------------------------------------------------------------------

HALF_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # the inputs' own rounding, relative to the largest


def on(leaves, device, dtype=None):
    """Fresh leaves (gradients tracked) on `device`, cast to `dtype` (None: as they are)."""
    return {n: x.detach().to(device=device, dtype=dtype or x.dtype).requires_grad_() for n, x in leaves.items()}


def check_half_precision(dtype, device="cpu", T=1000):
    """bf16 / fp16 inputs over T tokens with a slow decay (0.999: the state sums ~1,000 terms)
    in every form, against the fp64 reference on the same (rounded) inputs: outputs and final
    states stay within the inputs' rounding because states are kept in fp32."""
    leaves = make_inputs(T, torch.float64, initial_state=True)
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    rounded = on(on(leaves, "cpu", dtype), "cpu", torch.float64)
    want = run(retention_naive, rounded, gamma)
    for mode in ("parallel", "chunkwise", "recurrent"):
        half = on(leaves, device, dtype)
        got = run(lambda q, k, v, g, **kw: retention(q, k, v, g, mode, **kw), half, gamma.to(device))
        assert got[0].dtype == dtype and got[1].dtype == torch.float32, mode
        assert torch.isfinite(got[0]).all(), mode
        assert_close(f"{mode} output", got[0].cpu(), want[0], HALF_TOL[dtype])
        assert_close(f"{mode} state", got[1].cpu(), want[1], HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_fp32_states(dtype):
    check_half_precision(dtype)
