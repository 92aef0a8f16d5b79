"""Retention as pure functions: one naive reference and three equivalent forms.

Layout everywhere (as in fla):
    q, k:           [B, T, H, Dk]
    v:              [B, T, H, Dv]
    gamma:          [H]             per-head decay, 0 < gamma < 1
    state:          [B, H, Dk, Dv]  S_t = gamma * S_{t-1} + k_t^T v_t
    output:         [B, T, H, Dv]   o_t = q_t S_t

so that, with an initial state S_{-1}, position t (counted from 0) sees

    o_t = sum_{s <= t} gamma^(t-s) (q_t . k_s) v_s  +  gamma^(t+1) q_t S_{-1}.

Padding (`token_mask` [B, T], 0 for a pad) leaves the state exactly as it was: a masked
position adds no key and has decay 1, i.e. S_t = S_{t-1}. Every exponent above then counts
real tokens only (t - s becomes n_t - n_s with n_t the real tokens in 0..t), so a row with
pads anywhere gives its real tokens the outputs of the same row without them.

No scaling, normalisation or gating happens here; the layer in `modeling_retnet.py` does
that. Every function returns `(output, final_state)`; the three forms skip the final state
(and return None for it) with `output_final_state=False`, as training without a cache
does. Decay powers are computed in fp32 (or fp64 for fp64 inputs) as exp(n * log gamma),
never as a division by gamma^n. States are kept in `state_dtype(q.dtype)`: fp32 for bf16 and
fp16 inputs (as fla does), whose products stay in half precision. A bf16 state would round a
decay of 0.999 to 1.0 (bf16's step below 1 is 2^-8) and drop every update smaller than 1/256 of
the state: one token at a time over 1,000 tokens that is a 40% error (tests/test_retention.py). (The RetNet layer calls
these functions in fp32 whatever the model's dtype: modeling_retnet.py.)
"""

import os
from typing import NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a retention state is kept in for inputs of `dtype`: at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def _log_gamma(gamma: Tensor, like: Tensor) -> Tensor:
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return gamma.to(device=like.device, dtype=dtype).log()  # (H,)


def _decay_counts(token_mask: Optional[Tensor], T: int, log_g: Tensor) -> Tensor:
    """n[b, t]: decay steps up to and including position t, i.e. real tokens in 0..t:
    (B, T) from a mask, (1, T) = 1..T without one. Position t sees key s with gamma^(n_t - n_s)."""
    if token_mask is None:
        return torch.arange(1, T + 1, device=log_g.device, dtype=log_g.dtype)[None]
    return token_mask.to(log_g.dtype).cumsum(-1)


def _decay_weights(log_g: Tensor, n: Tensor, dtype: torch.dtype):
    """Decay weights of one block of positions with decay counts n (B', C) (see `_decay_counts`,
    counted from the block's start), each (B', H, ...) in `dtype`:
        D      (B', H, C, C)  gamma^(n_i - n_j) for i >= j, else 0   (key j seen from query i)
        w_in   (B', H, C, 1)  gamma^(n_i)                            (the incoming state, at i)
        w_out  (B', H, C, 1)  gamma^(n_last - n_j)                   (key j in the outgoing state)
        decay  (B', H, 1, 1)  gamma^(n_last)                         (the state across the block),
                                                                     in log_g's dtype (the state's)
    """
    C = n.shape[-1]
    lg = log_g[None, :, None]  # (1, H, 1)
    diff = (n[:, :, None] - n[:, None, :]).clamp(min=0)  # (B', C, C); above the diagonal: masked below
    upper = torch.ones(C, C, dtype=torch.bool, device=n.device).triu(1)
    D = torch.exp(diff[:, None] * lg[..., None]).masked_fill(upper, 0.0)
    w_in = torch.exp(n[:, None, :] * lg)[..., None]
    w_out = torch.exp((n[:, -1:] - n)[:, None, :] * lg)[..., None]
    decay = torch.exp(n[:, -1:, None] * lg)[..., None]
    return D.to(dtype), w_in.to(dtype), w_out.to(dtype), decay


def _mask_keys(k: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """Padding (token_mask 0) contributes no key: neither to other tokens nor to the state."""
    return k if token_mask is None else k * token_mask[:, :, None, None].to(k.dtype)


def retention_naive(q, k, v, gamma, initial_state=None, token_mask=None) -> Tuple[Tensor, Tensor]:
    """Reference: the recurrence written out, one token at a time, in fp64. A masked position
    leaves the state as it was (no key, no decay)."""
    B, T, H, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        S = S + initial_state.double()
    g = gamma.double().view(1, H, 1, 1)
    outs = []
    for t in range(T):
        kv = k[:, t].double().unsqueeze(-1) * v[:, t].double().unsqueeze(-2)  # (B, H, Dk, Dv)
        S_next = g * S + kv
        S = S_next if token_mask is None else torch.where(token_mask[:, t].bool().view(B, 1, 1, 1), S_next, S)
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


def retention_parallel(q, k, v, gamma, initial_state=None, output_final_state: bool = True,
                       token_mask=None) -> Tuple[Tensor, Tensor]:
    """O(T^2) form: O = (Q K^T * D) V, the training form of the paper. With `token_mask`
    (B, T), D is per row, (B, H, T, T): its exponents count real tokens only."""
    B, T, H, _ = q.shape
    log_g = _log_gamma(gamma, q)  # in the state's dtype
    n = _decay_counts(token_mask, T, log_g)  # (B or 1, T)
    if token_mask is None:
        D = decay_matrix(gamma, T, q).to(q.dtype)  # (H, T, T): Toeplitz, T powers exponentiated
        w_in = w_out = decay = None
    else:
        D, w_in, w_out, decay = _decay_weights(log_g, n, q.dtype)  # (B, H, T, T), ...
    qh, kh, vh = (x.transpose(1, 2) for x in (q, _mask_keys(k, token_mask), v))  # (B, H, T, D)
    o = _masked(qh @ kh.transpose(-1, -2), D) @ vh  # (B, H, T, Dv)

    def powers(expo):  # gamma^expo for expo (B', T) -> (B', H, T, 1), in the state's dtype
        return torch.exp(expo[:, None, :] * log_g[None, :, None])[..., None]

    state = None
    if output_final_state:  # weight of key s in the final state: gamma^(n_last - n_s)
        w_out = powers(n[:, -1:] - n).to(q.dtype) if w_out is None else w_out
        state = ((kh * w_out).transpose(-1, -2) @ vh).to(log_g.dtype)  # (B, H, Dk, Dv)
    if initial_state is not None:
        w_in = powers(n).to(q.dtype) if w_in is None else w_in
        o = o + (qh @ initial_state.to(q.dtype)) * w_in
        if output_final_state:
            decay = powers(n[:, -1:]) if decay is None else decay  # (B', H, 1, 1)
            state = state + initial_state.to(log_g.dtype) * decay
    return o.transpose(1, 2), state


def retention_chunkwise(q, k, v, gamma, chunk_size: int = 64, initial_state=None,
                        output_final_state: bool = True, token_mask=None) -> Tuple[Tensor, Tensor]:
    """O(T * C) form: parallel inside chunks of `chunk_size`, recurrent across them.

    One chunk at a time: a chunk's products (B x H matrices of C x C and C x D) stay in the
    core's cache, where the same products batched over all chunks at once stream their
    intermediates through memory (1.4-1.8x slower on CPU, forward and backward).
    Handles any T: the last chunk is zero-padded and its decay counts only its true length,
    so the final state is exact (a padded tail must not decay the state further). With
    `token_mask` (B, T) the decay weights are per row and per chunk, counting real tokens.
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)  # number of chunks
    last = T - (N - 1) * C  # length of the last chunk
    k = _mask_keys(k, token_mask)
    if last < C:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, C - last)) for x in (q, k, v))
    # (B, H, N, C, D) views: a chunk's (B, H, C, D) slice is read in place by the products
    # (copying q, k, v into this layout first measured 5-30% slower).
    qc, kc, vc = (x.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))

    log_g = _log_gamma(gamma, q)  # (H,)
    if token_mask is None:  # the same weights for every chunk; the last one's counts stop at its length
        j1 = _decay_counts(None, C, log_g)  # (1, C): 1..C
        weights = _decay_weights(log_g, j1, q.dtype)
        tail = _decay_weights(log_g, j1.clamp(max=last), q.dtype) if last < C else weights
    else:  # (B, N, C): real tokens counted from each chunk's start
        counts = torch.nn.functional.pad(token_mask.to(log_g.dtype), (0, N * C - T)).view(B, N, C).cumsum(-1)

    acc = state_dtype(q.dtype)
    S = q.new_zeros(B, H, Dk, Dv, dtype=acc) if initial_state is None else initial_state.to(acc)
    outs = []
    # unbind, not indexing in the loop: the backward of x[:, :, n] writes a zero tensor the
    # size of x for every n, which makes the backward pass quadratic in T.
    for n, (q_n, k_n, v_n) in enumerate(zip(qc.unbind(2), kc.unbind(2), vc.unbind(2))):  # (B, H, C, D)
        if token_mask is not None:
            weights = _decay_weights(log_g, counts[:, n], q.dtype)
        elif n == N - 1:
            weights = tail
        D, w_in, w_out, decay = weights
        o_n = _masked(q_n @ k_n.transpose(-1, -2), D) @ v_n  # inside the chunk
        outs.append((o_n + (q_n * w_in) @ S.to(q.dtype)).transpose(1, 2))  # + earlier chunks, through the state
        if n == N - 1 and not output_final_state:
            S = None
            break
        S = S * decay + ((k_n * w_out).transpose(-1, -2) @ v_n).to(acc)
    return torch.cat(outs, dim=1)[:, :T], S  # (B, T, H, Dv): one copy, straight into the layout


def retention_recurrent(q, k, v, gamma, initial_state=None, output_final_state: bool = True,
                        token_mask=None) -> Tuple[Tensor, Tensor]:
    """O(1)-state form, one token at a time: the decoding form. A masked position has decay 1
    and a zero key, so the state stays exactly as it was (S * 1 + 0)."""
    B, T, H, Dk = q.shape
    acc = state_dtype(q.dtype)
    g = gamma.to(q.device, acc).view(1, H, 1, 1)
    if token_mask is None:
        decays = [g] * T
    else:  # (B, H, 1, 1) per step: gamma for a real token, 1 for a pad
        decays = torch.where(token_mask.bool().view(B, T, 1, 1, 1), g, torch.ones_like(g)).unbind(1)
        k = _mask_keys(k, token_mask)
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    outs = []
    for q_t, k_t, v_t, g_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), decays):  # unbind: see chunkwise
        S = g_t * S + (k_t.unsqueeze(-1) * v_t.unsqueeze(-2)).to(acc)  # (B, H, Dk, Dv)
        outs.append((q_t.unsqueeze(-2) @ S.to(q.dtype)).squeeze(-2))  # (B, H, Dv)
    return torch.stack(outs, dim=1), S if output_final_state else None


RETENTION_FORMS = {
    "parallel": retention_parallel,
    "chunkwise": retention_chunkwise,
    "recurrent": retention_recurrent,
}

# --------------------------------------------------------------------------------------------
# CUDA: fla's Triton kernels, opt-in (RETCONVERT_FLA=1) with flash-linear-attention installed
# --------------------------------------------------------------------------------------------
#
# Opt-in since the first check on a GPU (an H200, fla 0.6.0, docs/RESULTS.md "CUDA"): the forms
# above matched the fp64 reference there, and so did fla's recurrent kernel, but its chunk kernel
# missed the tolerance (5e-3, relative) in all 10 of its cases, with padding and without, and the
# machine's time ran out before TF32 rounding could be told from a real disagreement.

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
    """On CUDA with RETCONVERT_FLA=1 and fla installed."""
    return q.is_cuda and os.environ.get("RETCONVERT_FLA", "0") == "1" and fla_kernels() is not None


def retention_fla(q, k, v, gamma, mode: str, initial_state=None, output_final_state: bool = True,
                  token_mask=None) -> Tuple[Tensor, Tensor]:
    """The same maths through fla's kernels ([B, T, H, D] layout, state [B, H, Dk, Dv]).
    The decay goes in as a per-token log gate so that a learnable decay gets its gradient;
    a masked position gets gate 0 (decay 1) and no key."""
    chunk, recurrent = fla_kernels()
    B, T, H, _ = q.shape
    g = _log_gamma(gamma, q).float().view(1, 1, H).expand(B, T, H)  # (B, T, H)
    g = (g if token_mask is None else g * token_mask[:, :, None].float()).contiguous()
    fn = recurrent if mode == "recurrent" else chunk
    state = None if initial_state is None else initial_state.to(state_dtype(q.dtype))
    return fn(q, _mask_keys(k, token_mask), v, g=g, scale=1.0, initial_state=state,
              output_final_state=output_final_state)


def retention(q, k, v, gamma, mode: str, chunk_size: int = 64, initial_state: Optional[Tensor] = None,
              output_final_state: bool = True, token_mask: Optional[Tensor] = None):
    """Dispatch to one of the three forms by name (on CUDA with RETCONVERT_FLA=1: fla's kernels).
    With `output_final_state=False` the state is not computed and None is returned for it.
    `token_mask` (B, T), 0 for padding: a padded position adds no key and does not decay the
    state, wherever it sits, so the real tokens see exactly what they would without it."""
    if mode not in RETENTION_FORMS:
        raise ValueError(f"unknown retention mode {mode!r}; choose one of {sorted(RETENTION_FORMS)}")
    if token_mask is not None and mode != "recurrent" and not use_fla(q) and bool(token_mask.all()):
        token_mask = None  # no padding: the forms' shared (Toeplitz) decay weights
    kwargs = {"initial_state": initial_state, "output_final_state": output_final_state, "token_mask": token_mask}
    if use_fla(q):
        return retention_fla(q, k, v, gamma, mode, **kwargs)
    if mode == "chunkwise":
        return retention_chunkwise(q, k, v, gamma, chunk_size=chunk_size, **kwargs)
    return RETENTION_FORMS[mode](q, k, v, gamma, **kwargs)


# --------------------------------------------------------------------------------------------
# Windowed retention: exact softmax over the last W tokens, decayed retention beyond them
# --------------------------------------------------------------------------------------------
#
# Each position attends to its last W real tokens (itself included) with exact softmax
# scores exp(s), and to every older real token through decayed linear scores
# gamma^(n_t - n_s) s, both under one normaliser (the LoLCATs / Liger hybrid, with retention's
# decay as the linear part). With s_j = q_t . k_j and n_t the real tokens up to t:
#
#     num_t = sum_{j in window} exp(s_j) v_j  +  sum_{j older} gamma^(n_t - n_j) s_j v_j  (+ sink)
#     den_t = sum_{j in window} exp(s_j)      + |sum_{j older} gamma^(n_t - n_j) s_j     (+ sink)|
#     o_t   = num_t / den_t
#
# A padded position (token_mask 0) is in no window, adds no key and does not count in any
# distance, as in `retention()`. The linear part's row sum enters through |.| (as in the
# paper's normalisation of plain retention): linear scores can be negative, and a negative
# denominator would flip the output's sign. A real position's window holds the position
# itself, so its denominator stays positive (a pad's may be 0: its output is then 0). The decay
# counts from the token's own position, so the window replaces the nearest W terms of plain
# retention, and W = 0 would leave plain retention.
#
# The recurrent state is a `WindowState`: the decayed matrix state of the tokens that have
# left the window, plus the last W keys and values: decoding cost and memory are constant in
# the context. All forms run the same block kernel (`_window_block`) over blocks of T
# (parallel), `chunk_size` (chunkwise) or 1 (recurrent) positions; `windowed_retention_naive`
# is the definition above written out, one token at a time, in fp64.
#
# Soft-capping (`softcap` = c, Gemma 2's `attn_logit_softcapping`): the window's softmax scores
# become exp(c tanh(s_j / c)), as the teacher caps q.k * scale before its softmax; the linear
# part has no softmax and keeps s_j. The cap acts on the first `softcap_channels` channels of
# q and k (the teacher's q.k); later channels, the score-bias feature b, add uncapped, so the
# window's terms are e^b exp(c tanh(q.k / c)) and the softmax over the window stays the teacher's.


class WindowState(NamedTuple):
    """Recurrent state of windowed retention (one layer).

    state:  [B, H, Dk, Dv + 1]  sum over the real tokens that have left the window of
                                gamma^(n - n_j) k_j^T [v_j, 1], n the newest real token;
                                the last column carries the key sums of the normaliser;
                                in `state_dtype` (fp32 for half-precision inputs)
    keys:   [B, W, H, Dk]       the last W real tokens' keys, oldest first, zeros in empty slots
    values: [B, W, H, Dv]       their values
    mask:   [B, W] bool         True where a slot holds a token (empty slots come first)
    """

    state: Tensor
    keys: Tensor
    values: Tensor
    mask: Tensor


def empty_window_state(q: Tensor, v: Tensor, window: int) -> WindowState:
    """The state before any token, for q [B, T, H, Dk] and v [B, T, H, Dv]."""
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    return WindowState(q.new_zeros(B, H, Dk, Dv + 1, dtype=state_dtype(q.dtype)), q.new_zeros(B, window, H, Dk),
                       v.new_zeros(B, window, H, Dv), torch.zeros(B, window, dtype=torch.bool, device=q.device))


def _check_window(window: int, initial_state: Optional[WindowState], softcap: Optional[float] = None):
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"windowed retention needs a window of at least 1 token, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"the window's score soft-cap must be positive, got {softcap!r}; pass None for no cap")
    if initial_state is not None and initial_state.keys.shape[1] != window:
        raise ValueError(f"the window state holds {initial_state.keys.shape[1]} tokens but the window is "
                         f"{window}; pass a state made with the same window")


def _softcap(s: Tensor, softcap: float) -> Tensor:
    """c tanh(s / c): scores bent smoothly into (-c, c) (Gemma 2's attention-logit soft-capping)."""
    return torch.tanh(s / softcap) * softcap


def windowed_retention_naive(q, k, v, gamma, window: int, initial_state: Optional[WindowState] = None,
                             token_mask=None, sink=None, softcap: Optional[float] = None,
                             softcap_channels: Optional[int] = None) -> Tuple[Tensor, WindowState]:
    """Reference: the definition above, one row and one token at a time, in fp64.
    `sink` = (score [B, T, H], value [H, Dv]): a never-decaying extra term of the linear part.
    `softcap`, `softcap_channels`: the window's score soft-cap (see the section comment)."""
    _check_window(window, initial_state, softcap)
    n_cap = q.shape[-1] if softcap_channels is None else softcap_channels
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    s0 = initial_state if initial_state is not None else empty_window_state(q, v, window)
    log_g = gamma.double().log().view(H, 1)  # (H, 1)
    ones = torch.ones(H, 1, dtype=torch.float64)
    out = torch.zeros(B, T, H, Dv, dtype=torch.float64)
    states = []
    for b in range(B):
        cache = [(s0.keys[b, i].double(), s0.values[b, i].double()) for i in range(window) if s0.mask[b, i]]
        tokens = list(cache)  # every real token in order, the cache's first: rank j - len(cache)
        base = -len(cache)
        n = -1  # rank of the newest real token among the new ones (-1: none yet)
        for t in range(T):
            if token_mask is None or token_mask[b, t]:
                tokens.append((k[b, t].double(), v[b, t].double()))
                n += 1
            num = torch.zeros(H, Dv + 1, dtype=torch.float64)
            lin = torch.exp((n + 1) * log_g) * torch.einsum("hk,hkv->hv", q[b, t].double(), s0.state[b].double())
            for j, (k_j, v_j) in enumerate(tokens):
                qk = q[b, t].double() * k_j  # (H, Dk)
                s = qk.sum(-1, keepdim=True)  # (H, 1)
                v1 = torch.cat([v_j, ones], -1)
                dist = n - (j + base)
                if dist < window:
                    if softcap is not None:  # the teacher's channels capped, the bias feature after them not
                        s = _softcap(qk[:, :n_cap].sum(-1, keepdim=True), softcap) + qk[:, n_cap:].sum(-1, keepdim=True)
                    num = num + torch.exp(s) * v1
                else:
                    lin = lin + torch.exp(dist * log_g) * s * v1
            if sink is not None:
                lin = lin + sink[0][b, t].double()[:, None] * torch.cat([sink[1].double(), ones], -1)
            out[b, t] = (num[:, :Dv] + lin[:, :Dv]) / (num[:, Dv:] + lin[:, Dv:].abs())
        # final state: tokens older than the last W, decayed to the newest; the last W kept
        S = torch.exp((n + 1) * log_g)[..., None] * s0.state[b].double()  # (H, Dk, Dv + 1)
        for j, (k_j, v_j) in enumerate(tokens[: max(len(tokens) - window, 0)]):
            w = torch.exp((n - (j + base)) * log_g)[..., None]  # (H, 1, 1)
            S = S + w * k_j[:, :, None] * torch.cat([v_j, ones], -1)[:, None, :]
        kept = tokens[-window:]
        keys = torch.zeros(window, H, Dk, dtype=torch.float64)
        values = torch.zeros(window, H, Dv, dtype=torch.float64)
        mask = torch.zeros(window, dtype=torch.bool)
        for i, (k_j, v_j) in enumerate(kept):
            slot = window - len(kept) + i
            keys[slot], values[slot], mask[slot] = k_j, v_j, True
        states.append((S, keys, values, mask))
    S, keys, values, mask = (torch.stack(x) for x in zip(*states))
    return out.to(v.dtype), WindowState(S.to(v.dtype), keys.to(v.dtype), values.to(v.dtype), mask)


def _scores(qh: Tensor, kh: Tensor, softcap: Optional[float], channels: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Scores of queries qh [B, H, C, Dk] against keys kh [B, H, J, Dk], both [B, H, C, J]: those of
    the linear part, s = q.k, and those of the window's softmax, the same with the first `channels`
    channels' product soft-capped (None: all of them; no `softcap`: the same tensor)."""
    if softcap is None:
        s = qh @ kh.transpose(-1, -2)
        return s, s
    n = qh.shape[-1] if channels is None else channels
    s = qh[..., :n] @ kh[..., :n].transpose(-1, -2)
    capped = _softcap(s, softcap)
    if n < qh.shape[-1]:  # the score-bias feature: added to both, never capped
        extra = qh[..., n:] @ kh[..., n:].transpose(-1, -2)
        s, capped = s + extra, capped + extra
    return s, capped


def _window_block(q, k, v1, valid, log_g, window: int, state: WindowState, final_state: bool,
                  window_terms: bool = True, softcap: Optional[float] = None, softcap_channels: Optional[int] = None,
                  filled: Optional[int] = None):
    """New positions q, k [B, C, H, Dk], v1 = [v, 1] [B, C, H, Dv + 1], valid [B, C] bool, after
    `state`. Returns the window's softmax terms sum exp(s - m) [v, 1] [B, C, H, Dv + 1] (s
    soft-capped with `softcap`, see `_scores`), their shift m [B, C, H, 1] (>= 0, no gradient), the
    linear terms [B, C, H, Dv + 1] and the state after the block (None unless `final_state`); the
    first two are None without `window_terms`. `filled`: at most this many cache slots hold a
    token (None: all W may); the empty ones, which come first, are left out of the work, so a
    window much longer than the text so far (a layer widened to full attention) costs what the
    text costs, not what the window could hold."""
    B, C, H, _ = q.shape
    W = window
    L = W if filled is None else min(filled, W)  # cache slots that may hold a token: the last L
    dtype = q.dtype
    cache = WindowState(state.state, state.keys[:, W - L:], state.values[:, W - L:], state.mask[:, W - L:])
    k_x = torch.cat([cache.keys, k], 1)  # (B, J, H, Dk), J = L + C: the cache, then the block
    v_x = torch.cat([torch.nn.functional.pad(cache.values, (0, 1), value=1.0), v1], 1)  # (B, J, H, Dv + 1)
    valid_x = torch.cat([cache.mask, valid], 1)  # (B, J)
    # rank of each real token, counted so that the block's first real token is 0 (the cache's are < 0)
    rank = valid_x.cumsum(1) - cache.mask.sum(1, keepdim=True) - 1  # (B, J)
    n = rank[:, L:]  # (B, C): the newest real token at each position
    dist = n[:, :, None] - rank[:, None, :]  # (B, C, J)
    causal = torch.arange(L + C, device=q.device)[None, :] <= torch.arange(L, L + C, device=q.device)[:, None]
    seen = causal & valid_x[:, None, :]  # (B, C, J)
    in_window = (seen & (dist < W))[:, None]  # (B, 1, C, J)
    older = (seen & (dist >= W))[:, None]

    qh, kh, vh = q.transpose(1, 2), k_x.transpose(1, 2), v_x.transpose(1, 2)  # (B, H, ., D)
    # (B, H, C, J or C): the linear part reads the first C keys only (see below)
    scores, s_win = _scores(qh, kh if window_terms else kh[:, :, :C], softcap if window_terms else None,
                            softcap_channels)
    soft = m = None
    if window_terms:
        s_win = s_win.masked_fill(~in_window, float("-inf"))  # -inf first: exp gives exact zeros and zero gradients
        m = s_win.amax(-1, keepdim=True).clamp(min=0).detach()  # (B, H, C, 1)
        soft = (torch.exp(s_win - m) @ vh).transpose(1, 2)  # (B, C, H, Dv + 1)
        m = m.transpose(1, 2)
    # An older key is at least W real tokens, so at least W positions, before its query: among the
    # first C of the J (the cache, then the block), whatever the padding.
    lg = log_g[None, :, None, None]  # (1, H, 1, 1)
    decay = torch.exp(dist[..., :C].clamp(min=0)[:, None].to(log_g.dtype) * lg)
    decay = decay.masked_fill(~older[..., :C], 0.0).to(dtype)  # (B, H, C, C)
    w_in = torch.exp((n + 1)[:, None, :, None].to(log_g.dtype) * lg)  # (B, H, C, 1): the state, seen from n
    lin = (scores[..., :C] * decay) @ vh[:, :, :C] + (qh * w_in.to(dtype)) @ state.state.to(dtype)  # (B, H, C, Dv + 1)

    new_state = None
    if final_state:
        last = valid.sum(1, keepdim=True) - 1  # (B, 1): rank of the newest real token
        leaving = valid_x & (rank <= last - W)  # (B, J): real tokens beyond the window at the end
        w_out = torch.exp((last - rank).clamp(min=0)[:, None].to(log_g.dtype) * log_g[None, :, None])  # (B, H, J)
        w_out = w_out.masked_fill(~leaving[:, None], 0.0).to(dtype)
        S = state.state * torch.exp((last + 1)[:, :, None, None].to(log_g.dtype) * lg) \
            + ((kh * w_out[..., None]).transpose(-1, -2) @ vh).to(state.state.dtype)  # (B, H, Dk, Dv + 1)
        # slot i of the new cache holds the real token of rank last - (W - 1 - i): ranks only grow
        # along J, so the first index whose rank reaches it is that token, if it exists
        want = last - (W - 1) + torch.arange(W, device=q.device)[None, :]  # (B, W)
        idx = torch.searchsorted(rank, want).clamp(max=L + C - 1)  # (B, W)
        kept = (rank.gather(1, idx) == want) & valid_x.gather(1, idx)  # (B, W): False for empty slots

        def take(x):  # (B, J, H, D) -> (B, W, H, D), zeros in empty slots
            return x.gather(1, idx[:, :, None, None].expand(-1, -1, *x.shape[2:])) * kept[:, :, None, None].to(dtype)

        new_state = WindowState(S, take(k_x), take(v_x[..., :-1]), kept)
    return soft, m, lin.transpose(1, 2), new_state


def windowed_retention_terms(q, k, v, gamma, window: int, block_size: Optional[int] = None,
                             initial_state: Optional[WindowState] = None, output_final_state: bool = True,
                             token_mask=None, window_terms: bool = True, softcap: Optional[float] = None,
                             softcap_channels: Optional[int] = None):
    """The two parts of windowed retention, unnormalised, block by block.

    q, k [B, T, H, Dk], v [B, T, H, Dv], gamma [H]; `block_size` positions per block (None: one
    block of T). Returns (soft, m, lin, state): soft = sum over the window of exp(s - m) [v, 1]
    and lin = the linear terms, both [B, T, H, Dv + 1] (the last channel is the row sum), the
    shift m [B, T, H, 1], and the final `WindowState` (None with output_final_state=False).
    `combine_window` turns them into the output; conversion fits the parts separately (and
    skips the window's terms, None with `window_terms=False`, where it needs only the linear part).
    `softcap` c: the window's scores become c tanh(s / c) on the first `softcap_channels` q/k
    channels (None: all), the later ones (a score-bias feature) added uncapped.
    """
    _check_window(window, initial_state, softcap)
    B, T, H, _ = q.shape
    state = initial_state if initial_state is not None else empty_window_state(q, v, window)
    state = WindowState(state.state.to(state_dtype(q.dtype)), state.keys.to(q.dtype), state.values.to(q.dtype),
                        state.mask.to(q.device, torch.bool))
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if token_mask is None else token_mask.bool()
    v1 = torch.nn.functional.pad(v, (0, 1), value=1.0)
    log_g = _log_gamma(gamma, q)
    C = T if block_size is None else block_size
    parts = []
    # cache slots that may hold a token, known without reading the mask: none before the first
    # block when the call starts empty, then at most every position seen so far
    filled = 0 if initial_state is None else window
    blocks = list(zip(*(x.split(max(C, 1), 1) for x in (q, k, v1, valid))))
    for i, (q_c, k_c, v_c, valid_c) in enumerate(blocks):
        carry = output_final_state or i < len(blocks) - 1
        *out, state = _window_block(q_c, k_c, v_c, valid_c, log_g, window, state, carry, window_terms, softcap,
                                    softcap_channels, filled)
        filled = min(filled + q_c.shape[1], window)
        parts.append(out)
    if not parts:  # T = 0
        empty = v1.new_zeros(B, 0, H, v1.shape[-1])
        return empty, empty[..., :1], empty, state if output_final_state else None
    soft, m, lin = (None if x[0] is None else torch.cat(x, 1) for x in zip(*parts))
    return soft, m, lin, state


def combine_window(soft, m, lin, sink=None) -> Tensor:
    """Output [B, T, H, Dv] from `windowed_retention_terms`' parts: (window + linear) over
    (window row sum + |linear row sum|). `sink` = (score [B, T, H], value [H, Dv]) adds a
    never-decaying term to the linear part."""
    if sink is not None:
        score, value = sink
        lin = lin + score[..., None] * torch.nn.functional.pad(value.to(lin.dtype), (0, 1), value=1.0)
    scale = torch.exp(-m)  # (B, T, H, 1): the linear part in the window's shifted units
    num = soft[..., :-1] + scale * lin[..., :-1]
    den = soft[..., -1:] + scale * lin[..., -1:].abs()
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)  # 0 where nothing is seen at all


WINDOW_BLOCKS = {"parallel": None, "recurrent": 1}  # chunkwise: chunk_size


def windowed_retention(q, k, v, gamma, window: int, mode: str, chunk_size: int = 64,
                       initial_state: Optional[WindowState] = None, output_final_state: bool = True,
                       token_mask: Optional[Tensor] = None, sink=None, softcap: Optional[float] = None,
                       softcap_channels: Optional[int] = None) -> Tuple[Tensor, Optional[WindowState]]:
    """Windowed retention in one of the three forms: parallel (one block, O(T (T + W))),
    chunkwise (blocks of `chunk_size`, O(T (C + W))) or recurrent (one token at a time, O(W)
    per token and a constant-size state). Shapes as `retention()`; normalised output
    [B, T, H, Dv] and a `WindowState`. See the section comment for the definition, and for
    `softcap` (the window's scores c tanh(s / c), over the first `softcap_channels` channels)."""
    if mode not in RETENTION_FORMS:
        raise ValueError(f"unknown retention mode {mode!r}; choose one of {sorted(RETENTION_FORMS)}")
    block = chunk_size if mode == "chunkwise" else WINDOW_BLOCKS[mode]
    soft, m, lin, state = windowed_retention_terms(q, k, v, gamma, window, block, initial_state,
                                                   output_final_state, token_mask, softcap=softcap,
                                                   softcap_channels=softcap_channels)
    return combine_window(soft, m, lin, sink), state
