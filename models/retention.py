"""Retention as pure functions: one naive reference and three equivalent forms.

Layout everywhere (as in fla):
    q, k:           [B, T, H, Dk]
    v:              [B, T, H, Dv]
    gamma:          [H]             per-head decay, 0 < gamma < 1
    state:          [B, H, Dk, Dv]  S_t = gamma * S_{t-1} + k_t^T v_t
    output:         [B, T, H, Dv]   o_t = q_t S_t

so that, with an initial state S_{-1}, position t (counted from 0) sees

    o_t = sum_{s <= t} gamma^(t-s) (q_t . k_s) v_s  +  gamma^(t+1) q_t S_{-1}.

No scaling, normalisation or gating happens here; the layer in `modeling_retnet.py` does
that. Every function returns `(output, final_state)`; the three forms skip the final state
(and return None for it) with `output_final_state=False`, as training without a cache
does. Decay powers are computed in fp32 (or fp64 for fp64 inputs) as exp(n * log gamma),
never as a division by gamma^n.
"""

import os
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _log_gamma(gamma: Tensor, like: Tensor) -> Tensor:
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return gamma.to(device=like.device, dtype=dtype).log()  # (H,)


def retention_naive(q, k, v, gamma, initial_state=None) -> Tuple[Tensor, Tensor]:
    """Reference: the recurrence written out, one token at a time, in fp64."""
    B, T, H, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        S = S + initial_state.double()
    g = gamma.double().view(1, H, 1, 1)
    outs = []
    for t in range(T):
        kv = k[:, t].double().unsqueeze(-1) * v[:, t].double().unsqueeze(-2)  # (B, H, Dk, Dv)
        S = g * S + kv
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].double(), S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1]).double()
    return o.to(v.dtype), S.to(v.dtype)


def decay_matrix(gamma: Tensor, T: int, like: Tensor) -> Tensor:
    """D[h, n, m] = gamma_h^(n - m) for n >= m, else 0.  Shape (H, T, T).

    Toeplitz: every diagonal is one power of gamma, so only the T powers are exponentiated
    and the matrix is a strided view of them (zero-padded on the left for n < m), copied once.
    """
    log_g = _log_gamma(gamma, like)
    powers = torch.exp(torch.arange(T, device=like.device, dtype=log_g.dtype)[None, :] * log_g[:, None])  # (H, T)
    padded = torch.nn.functional.pad(powers, (T - 1, 0)).flip(-1)  # (H, 2T - 1): [g^(T-1) ... g^0, 0 ... 0]
    # window s holds padded[s : s + T]; row n of D is window T - 1 - n.
    return padded.unfold(-1, T, 1).flip(-2)


def _masked(scores: Tensor, D: Tensor) -> Tensor:
    """scores * D, in place when nothing needs the raw scores for a backward pass (one
    scores-sized buffer fewer, and no pass to allocate it)."""
    if torch.is_grad_enabled() and (scores.requires_grad or D.requires_grad):
        return scores * D
    return scores.mul_(D)


def retention_parallel(q, k, v, gamma, initial_state=None, output_final_state: bool = True) -> Tuple[Tensor, Tensor]:
    """O(T^2) form: O = (Q K^T * D) V, the training form of the paper."""
    B, T, H, _ = q.shape
    D = decay_matrix(gamma, T, q).to(q.dtype)  # (H, T, T)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    o = _masked(qh @ kh.transpose(-1, -2), D) @ vh  # (B, H, T, Dv)

    log_g = _log_gamma(gamma, q)
    pos = torch.arange(T, device=q.device, dtype=log_g.dtype)
    state = None
    if output_final_state:  # weight of token s in the final state: gamma^(T-1-s)
        w_state = torch.exp((T - 1 - pos)[None, :] * log_g[:, None]).to(q.dtype)  # (H, T)
        state = (kh * w_state[None, :, :, None]).transpose(-1, -2) @ vh  # (B, H, Dk, Dv)
    if initial_state is not None:
        w_in = torch.exp((pos + 1)[None, :] * log_g[:, None]).to(q.dtype)  # (H, T)
        o = o + (qh @ initial_state) * w_in[None, :, :, None]
        if output_final_state:
            state = state + initial_state * torch.exp(T * log_g).to(q.dtype)[None, :, None, None]
    return o.transpose(1, 2), state


def retention_chunkwise(q, k, v, gamma, chunk_size: int = 64, initial_state=None,
                        output_final_state: bool = True) -> Tuple[Tensor, Tensor]:
    """O(T * C) form: parallel inside chunks of `chunk_size`, recurrent across them.

    One chunk at a time: a chunk's products (B x H matrices of C x C and C x D) stay in the
    core's cache, where the same products batched over all chunks at once stream their
    intermediates through memory (1.4-1.8x slower on CPU, forward and backward).
    Handles any T: the last chunk may be shorter, and its decay uses its true length, so
    the final state is exact (a zero-padded tail must not decay the state further).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)  # number of chunks
    last = T - (N - 1) * C  # length of the last chunk
    if last < C:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, C - last)) for x in (q, k, v))
    # (B, H, N, C, D) views: a chunk's (B, H, C, D) slice is read in place by the products
    # (copying q, k, v into this layout first measured 5-30% slower).
    qc, kc, vc = (x.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))

    log_g = _log_gamma(gamma, q)  # (H,)
    j = torch.arange(C, device=q.device, dtype=log_g.dtype)
    D = decay_matrix(gamma, C, q).to(q.dtype)  # (H, C, C)
    # Position j of a chunk sees the incoming state decayed by gamma^(j+1).
    w_q = torch.exp((j + 1)[None, :] * log_g[:, None]).to(q.dtype)[:, :, None]  # (H, C, 1)

    def state_weights(length: int):
        """(decay of the state over a chunk of `length`, weight of its key j in the state at
        its end: gamma^(length-1-j), 0 for padded positions j >= length)."""
        expo = length - 1 - j
        w_k = torch.exp(expo.clamp(min=0)[None, :] * log_g[:, None]).masked_fill(expo[None] < 0, 0.0)
        return torch.exp(length * log_g).to(q.dtype)[:, None, None], w_k.to(q.dtype)[:, :, None]  # (H,1,1), (H,C,1)

    decay, w_k = state_weights(C)
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    # unbind, not indexing in the loop: the backward of x[:, :, n] writes a zero tensor the
    # size of x for every n, which makes the backward pass quadratic in T.
    for n, (q_n, k_n, v_n) in enumerate(zip(qc.unbind(2), kc.unbind(2), vc.unbind(2))):  # (B, H, C, D)
        o_n = _masked(q_n @ k_n.transpose(-1, -2), D) @ v_n  # inside the chunk
        outs.append((o_n + (q_n * w_q) @ S).transpose(1, 2))  # + from earlier chunks, through the state
        if n == N - 1:
            if not output_final_state:
                S = None
                break
            if last < C:
                decay, w_k = state_weights(last)
        S = S * decay + (k_n * w_k).transpose(-1, -2) @ v_n
    return torch.cat(outs, dim=1)[:, :T], S  # (B, T, H, Dv): one copy, straight into the layout


def retention_recurrent(q, k, v, gamma, initial_state=None, output_final_state: bool = True) -> Tuple[Tensor, Tensor]:
    """O(1)-state form, one token at a time: the decoding form."""
    B, T, H, Dk = q.shape
    g = gamma.to(q.dtype).view(1, H, 1, 1)
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1)):  # unbind: see retention_chunkwise
        S = g * S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # (B, H, Dk, Dv)
        outs.append((q_t.unsqueeze(-2) @ S).squeeze(-2))  # (B, H, Dv)
    return torch.stack(outs, dim=1), S if output_final_state else None


RETENTION_FORMS = {
    "parallel": retention_parallel,
    "chunkwise": retention_chunkwise,
    "recurrent": retention_recurrent,
}

# --------------------------------------------------------------------------------------------
# CUDA: fla's Triton kernels, when flash-linear-attention is installed (optional)
# --------------------------------------------------------------------------------------------

_FLA = None  # (chunk_simple_gla, fused_recurrent_simple_gla), or False once found missing


def fla_kernels():
    """fla's simple-GLA kernels, or None. Retention is simple GLA with a constant log-decay
    per head; fla's own `chunk_retention` hard-codes the paper's decays, so it is not used."""
    global _FLA
    if _FLA is None:
        try:
            from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
            _FLA = (chunk_simple_gla, fused_recurrent_simple_gla)
        except Exception:  # not installed, or no triton / GPU support
            _FLA = False
    return _FLA or None


def use_fla(q: Tensor) -> bool:
    """On CUDA with fla installed, unless RETCONVERT_FLA=0."""
    return q.is_cuda and os.environ.get("RETCONVERT_FLA", "1") != "0" and fla_kernels() is not None


def retention_fla(q, k, v, gamma, mode: str, initial_state=None, output_final_state: bool = True) -> Tuple[Tensor, Tensor]:
    """The same maths through fla's kernels ([B, T, H, D] layout, state [B, H, Dk, Dv]).
    The decay goes in as a per-token log gate so that a learnable decay gets its gradient."""
    chunk, recurrent = fla_kernels()
    B, T, H, _ = q.shape
    g = _log_gamma(gamma, q).float().view(1, 1, H).expand(B, T, H).contiguous()  # (B, T, H)
    fn = recurrent if mode == "recurrent" else chunk
    state = None if initial_state is None else initial_state.to(q.dtype)
    return fn(q, k, v, g=g, scale=1.0, initial_state=state, output_final_state=output_final_state)


def retention(q, k, v, gamma, mode: str, chunk_size: int = 64, initial_state: Optional[Tensor] = None,
              output_final_state: bool = True):
    """Dispatch to one of the three forms by name (on CUDA with fla installed: its kernels).
    With `output_final_state=False` the state is not computed and None is returned for it."""
    if mode not in RETENTION_FORMS:
        raise ValueError(f"unknown retention mode {mode!r}; choose one of {sorted(RETENTION_FORMS)}")
    kwargs = {"initial_state": initial_state, "output_final_state": output_final_state}
    if use_fla(q):
        return retention_fla(q, k, v, gamma, mode, **kwargs)
    if mode == "chunkwise":
        return retention_chunkwise(q, k, v, gamma, chunk_size=chunk_size, **kwargs)
    return RETENTION_FORMS[mode](q, k, v, gamma, **kwargs)
