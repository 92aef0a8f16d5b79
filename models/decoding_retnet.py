"""A fast, static-shape decoder for a trained RetNetForCausalLM: one token per step, O(1) state.

Batch-1 decoding is bound by streaming the weights from memory once per token. What keeps
the plain module path (`model(input_ids=token, past_key_values=state)`) away from that bound
is everything around the matrix-vector products: ~100 small tensor ops per layer
(concatenations for the score-bias and normaliser features, the sink, rotary, casts) and
per-step allocations. This decoder packs the weights once and runs about 20 small ops per
layer:

* q, k, v (and the gate) come from one fused matrix product whose bias column adds the
  constant features retention needs (score bias b_h on q, 1 on k, 1 on v): no `cat`.
* Norm weights (and LayerNorm shifts) are folded into the matrix that follows the norm, so
  a norm is a bare normalisation. The key scale and the head-norm scale are folded too.
  Norms whose output is not a matrix's input keep their affine: those of the retention and
  MLP outputs (`block_norms` "post", OLMo 2; "sandwich", Gemma 2/3), which feed the residual,
  and the q/k RMSNorms (`qk_norm`, Qwen3, OLMo 2, Gemma 3), applied to q' and k' before the
  rotary with one weight array (the key scale folded into it).
* q/k channels are permuted inside each head so rotary pairs are adjacent; rotary is then
  one complex multiplication. Dot products are unchanged because q, k and the sink key
  are permuted alike. Per-layer RoPE (`layer_rope`, Gemma 3) computes each distinct table's
  phases once per step.
* The attention sink (a never-decaying rank-1 term) is folded into the state: the decoder
  keeps T = S + Sink and updates T <- gamma T + k^T v + (1 - gamma) Sink, so the output is a
  single q @ T. With `max_sink_distance` (a query past it turns back to it for the sink) the
  sink's score depends on the position, so it stays apart: one more dot product per head.
* The state lives in one preallocated buffer updated in place; logits are written into a
  preallocated buffer (soft-capped, Gemma 2: c * tanh(logits / c)).
* Each weight is stored for the matrix-vector kernel that streams it fastest (timed once per
  shape and dtype: torch in either layout, or numpy's OpenBLAS for fp32 on CPU; on one AMD
  EPYC the spread is 12 to 37 GB/s), optionally in bfloat16/float16 for half the bytes;
  states and normalisations stay fp32. On Linux CPUs the weights sit in transparent huge
  pages: with 4 KiB pages, TLB misses cap streaming well below the memory bandwidth.
* On CPU the small ops between the products run in numpy (the "numpy" backend), whose
  per-call overhead on tiny arrays is a fraction of torch's; tensors are shared, not copied.
  The "torch" backend runs the same code with torch ops, on any device.

State layout: (B, Hkv, G, Dk', Dv') per layer with H = Hkv * G query heads, Dk' = Dk (+2 with
score bias: the bias feature and a zero pad), Dv' = Dv (+1 with the paper normaliser).
`load_state`/`export_state` convert to and from the model's `RetNetState`.

Results match the module path to floating-point rounding (tests compare logits and states).
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .kernels import BACKENDS, HugePageArena, NumpyOps, PackedMatrix, TorchOps, default_ops, kernels_for
from .positions_retnet import check_position_table, paper_decay_norm, rotary_inv_freq
from .retention import WindowState
from .state_retnet import CACHE_NAME, RetNetState

# Model features this decoder does not pack yet, as (config field, the value it handles): a model
# with another value decodes through its modules (generate() checks `RetNetDecoder.supports`).
# None at present.
UNPACKED_FEATURES: Tuple[Tuple[str, object], ...] = ()


def _normalize(x, eps: float, center: bool):
    """Normalise over the last axis without affine: (x - mean) / std when `center` (LayerNorm,
    GroupNorm), else x / rms (RMSNorm). Written with operators numpy and torch share."""
    if center:
        x = x - x.sum(-1, keepdims=True) * (1 / x.shape[-1])
    return x * _inv_rms(x, eps)


def _inv_rms(x, eps: float, axes: int = 1):
    """1 / sqrt(mean(x^2) + eps) over the last `axes` axes, kept as size-1 axes (numpy or torch)."""
    ss, n = x * x, 1
    for a in range(1, axes + 1):
        ss, n = ss.sum(-a, keepdims=True), n * x.shape[-a]
    return 1 / (ss * (1 / n) + eps) ** 0.5


class _Norm(NamedTuple):
    """A norm module split into what `_normalize` applies (eps, centered) and the affine part
    (scale, shift) that `_fold` moves into the next matrix."""

    scale: torch.Tensor
    shift: Optional[torch.Tensor]
    eps: float
    centered: bool  # LayerNorm subtracts the mean; RMSNorm does not

    @classmethod
    def of(cls, module) -> Optional["_Norm"]:
        """The norm of a norm module; None for an identity (a block without that norm)."""
        if isinstance(module, torch.nn.Identity):
            return None
        shift = getattr(module, "bias", None)
        return cls(module.weight.detach().float(), None if shift is None else shift.detach().float(), module.eps,
                   isinstance(module, torch.nn.LayerNorm))


def _fold(norm: Optional[_Norm], weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """A matrix after a norm's affine, folded: W (s * x + t) + b = (W * s) x + (W t + b).
    No norm (None): the matrix as it is."""
    weight = weight.detach().float()
    if norm is None:
        return weight, bias
    if norm.shift is not None:
        bias = weight @ norm.shift + (0 if bias is None else bias.detach().float())
    return weight * norm.scale[None, :], bias


def _packed_norm(norm: Optional[_Norm], of=None):
    """A norm as `_apply_norm` takes it: (eps, centered, scale, shift). With `of` (a backend's
    array view) the affine stays, as arrays (a norm whose output feeds a residual add); without,
    it is None (folded into the next matrix by `_fold`). No norm: None."""
    if norm is None:
        return None
    if of is None:
        return norm.eps, norm.centered, None, None
    shift = None if norm.shift is None else of(norm.shift.contiguous())
    return norm.eps, norm.centered, of(norm.scale.contiguous()), shift


def _apply_norm(x, norm):
    """x (B, C) through a packed norm (`_packed_norm`): a new array; x itself when there is no norm."""
    if norm is None:
        return x
    eps, centered, scale, shift = norm
    x = _normalize(x, eps, centered)
    if scale is not None:
        x *= scale
    if shift is not None:
        x += shift
    return x


# ------------------------------------------------------------------------ the decoder


class RetNetDecoder:
    """Greedy or sampled generation with packed weights; see the module docstring.

    Usage:
        dec = RetNetDecoder(model, batch_size=1, dtype=torch.bfloat16)
        ids = dec.generate(prompt_ids, max_new_tokens=64)              # (B, P + 64)
        # or step by step:
        logits = dec.prefill(prompt_ids)                               # (B, V) for the last position
        logits = dec.step(next_ids)                                    # next_ids (B,)

    The model is not modified. The decoder holds its own copy of the weights (in `dtype`)
    and a fixed-size state for `batch_size` rows; its matrix kernels are chosen for that batch
    size (another batch size works, possibly with slower kernels). `backend` runs the small
    ops in numpy ("numpy", CPU only) or torch; "auto" picks numpy on CPU.
    """

    def __init__(self, model, batch_size: int = 1, dtype: Optional[torch.dtype] = None, kernel: str = "auto",
                 backend: str = "auto"):
        cfg = model.config
        if not self.supports(cfg):
            names = ", ".join(f"{k}={getattr(cfg, k)!r}" for k, v in UNPACKED_FEATURES if getattr(cfg, k, v) != v)
            raise ValueError(f"the packed decoder does not cover {names} yet; decode with model.generate(), "
                             "which runs such models through their modules")
        self.model, self.config = model, cfg
        self.device = model.lm_head.weight.device
        self.dtype = dtype or model.lm_head.weight.dtype  # weights; activations and state stay fp32
        if backend == "auto":
            backend = "numpy" if default_ops(self.device) is NumpyOps else "torch"
        if backend not in BACKENDS or (backend == "numpy" and self.device.type != "cpu"):
            choices = "'auto', 'torch' or 'numpy'" if self.device.type == "cpu" else "'auto' or 'torch'"
            raise ValueError(f"backend={backend!r} is not available on {self.device.type}; use {choices}")
        self.ops = NumpyOps if backend == "numpy" else TorchOps
        available = kernels_for(self.dtype, self.device, self.ops)
        if kernel != "auto" and kernel not in available:
            raise ValueError(f"kernel={kernel!r} is not available for {self.dtype} on {self.device.type} with the "
                             f"{backend} backend; use 'auto' (the fastest, measured per weight shape) or one of "
                             f"{', '.join(available)}")
        self.kernel = kernel
        self.B = batch_size
        self.arena = HugePageArena() if self.device.type == "cpu" else None  # where the packed weights live

        H, Hkv, Dk, Dv = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.qk_head_dim, cfg.v_head_dim
        self.H, self.Hkv, self.G, self.Dk, self.Dv = H, Hkv, H // Hkv, Dk, Dv
        self.rotary = cfg.position_embedding_type != "none"
        # the sink's distance capped (see RetNetConfig.max_sink_distance): the sink stays out of the state
        self.sink_distance = cfg.max_sink_distance if cfg.attention_sink and self.rotary else None
        # Read once: a transformers config attribute costs ~1 us per access, in the step's loop.
        self.gate, self.parallel_residual, self.embed_scale, self.qk_norm = (
            cfg.use_output_gate, cfg.parallel_residual, cfg.embed_scale, cfg.qk_norm)
        self.extra_k = 2 if cfg.score_bias else 0  # [bias feature, zero pad]: keeps Dk' even for rotary
        self.window_softcap = cfg.window_logit_softcapping  # the window's scores c tanh(q.k / c) + b
        self.extra_v = 1 if cfg.retention_normalization == "paper" else 0
        self.Dkp, self.Dvp = Dk + self.extra_k, Dv + self.extra_v
        # Channel order inside a head so that rotary pairs are adjacent: (0, D/2, 1, D/2 + 1, ...).
        if cfg.position_embedding_type == "rotary":
            self.perm = torch.arange(Dk).view(2, Dk // 2).t().flatten()
        else:
            self.perm = torch.arange(Dk)  # xpos pairs are interleaved already; none: any order
        with torch.no_grad():
            self.layers = [self._pack_layer(block) for block in model.model.layers]
            self._pack_embeddings(model)
        self.uses_numpy = any(m.w_numpy is not None for m in self._matrices())
        # (L, 1, Hkv, G)
        self.gamma = torch.stack([p["gamma_t"] for p in self.layers]).view(len(self.layers), 1, Hkv, self.G)
        self._group_windows(cfg.layer_windows)
        self.inv_freqs = []  # the distinct rotary tables (Gemma 3: local and global layers); p["rope"] picks one
        for layer_idx, p in enumerate(self.layers if self.rotary else ()):
            f = rotary_inv_freq(cfg, self.device, layer_idx)
            p["rope"] = next((i for i, g in enumerate(self.inv_freqs) if torch.equal(g, f)), len(self.inv_freqs))
            self.inv_freqs += [f] if p["rope"] == len(self.inv_freqs) else []
        self.reset()

    def _group_windows(self, windows):
        """Windowed layers (W > 0: the layer also keeps its last W keys and values) grouped by W:
        `window_groups` [(W, [layer, ...]), ...], one cache per group; each windowed layer's
        p["window"] = (group, index in the group's cache), None for a pure-retention layer."""
        self.window_groups = [(w, [i for i, wi in enumerate(windows) if wi == w]) for w in sorted(set(windows) - {0})]
        self.windowed = bool(self.window_groups)
        self.pure_layers = not all(windows)  # some layer is pure retention (the paper normaliser c_n)
        for p in self.layers:
            p["window"] = None
        for g, (w, members) in enumerate(self.window_groups):
            for j, i in enumerate(members):
                p = self.layers[i]  # a key leaving the window enters the state with weight gamma^W
                p["window"] = (g, j)
                p["gamma_w"] = self.ops.of((p["gamma_t"] ** w).view(1, self.Hkv, self.G, 1, 1).contiguous())

    @staticmethod
    def supports(config) -> bool:
        """Whether this decoder packs every feature of a model with this config."""
        return all(getattr(config, name, value) == value for name, value in UNPACKED_FEATURES)

    def _matrix(self, weight, bias=None) -> PackedMatrix:
        return PackedMatrix(weight, bias, self.dtype, self.kernel, self.ops, self.B, self.arena)

    # ---------------------------------------------------------------- packing

    def _pack_layer(self, block) -> dict:
        cfg, ret, of = self.config, block.retention, self.ops.of
        H, Hkv, Dk, Dv, C = self.H, self.Hkv, self.Dk, self.Dv, cfg.hidden_size
        dev = self.device

        def heads_qk(w, heads, extra_values):
            """(heads * Dk, C') -> (heads * Dk', C'): permuted channels plus the extra features."""
            w = w.view(heads, Dk, *w.shape[1:])[:, self.perm]
            if self.extra_k:
                pad = w.new_zeros(heads, self.extra_k, *w.shape[2:])
                if extra_values is not None:
                    pad[:, 0] = extra_values.view(heads, *([1] * (w.dim() - 2)))
                w = torch.cat([w, pad], 1)
            return w.flatten(0, 1)

        def vec_or_zeros(linear, n):
            return linear.bias.float() if linear.bias is not None else torch.zeros(n, device=dev)

        # Rows of the fused projection: q', k', v', gate. The key scale is folded into k's rows,
        # or, with a q/k norm (which would undo it), into the norm's weight.
        scale = 1.0 if cfg.qk_norm is not None else ret.scale
        wq = heads_qk(ret.q_proj.weight.float(), H, None)
        wk = heads_qk(ret.k_proj.weight.float() * scale, Hkv, None)
        bias_feature = ret.score_bias.float() if cfg.score_bias else None
        bq = heads_qk(vec_or_zeros(ret.q_proj, H * Dk), H, bias_feature)
        bk = heads_qk(vec_or_zeros(ret.k_proj, Hkv * Dk) * scale, Hkv, torch.ones(Hkv, device=dev))
        wv = ret.v_proj.weight.float().view(Hkv, Dv, C)
        bv = vec_or_zeros(ret.v_proj, Hkv * Dv).view(Hkv, Dv)
        if self.extra_v:
            wv = torch.cat([wv, wv.new_zeros(Hkv, 1, C)], 1)
            bv = torch.cat([bv, bv.new_ones(Hkv, 1)], 1)
        rows = [wq, wk, wv.flatten(0, 1)]
        biases = [bq, bk, bv.flatten()]
        if cfg.use_output_gate:
            rows.append(ret.g_proj.weight.float())
            biases.append(torch.zeros(H * Dv, device=dev))
        if sum(len(b) for b in biases) % 2:  # an even row stride, so rotary can view pairs as complex
            rows.append(rows[0].new_zeros(1, C))
            biases.append(biases[0].new_zeros(1))
        norm1, norm2 = _Norm.of(block.input_layernorm), _Norm.of(block.post_retention_layernorm)  # None: "post"
        w_qkv, b_qkv = _fold(norm1, torch.cat(rows), torch.cat(biases))

        # Output projection with the head-norm affine folded in: o_proj(gate * (o * w + b)).
        # The scale w commutes with the gate; the shift b does only without a gate.
        wo = ret.o_proj.weight.float()  # (C, H*Dv)
        bo = ret.o_proj.bias.float() if ret.o_proj.bias is not None else None
        head_affine = None
        if hasattr(ret, "head_norm_bias") and cfg.use_output_gate:  # applied before the gate
            head_affine = (of(ret.head_norm_weight.detach().float()), of(ret.head_norm_bias.detach().float()))
        elif hasattr(ret, "head_norm_weight"):
            if hasattr(ret, "head_norm_bias"):
                shift = wo @ ret.head_norm_bias.float()
                bo = shift if bo is None else bo + shift
            wo = wo * ret.head_norm_weight.float()[None, :]

        # Sink folded into the state: Sink_h = w_h * [k_sink, 1, 0]^T [v_sink, 1].
        sink = sink_kv = None
        gamma = ret.gamma.detach().float().to(dev)
        if cfg.attention_sink:
            ks = ret.sink_key.float()[:, self.perm]  # (H, Dk)
            if self.extra_k:
                ks = torch.cat([ks, ks.new_ones(H, 1), ks.new_zeros(H, 1)], 1)
            vs = ret.sink_value.float()
            if self.extra_v:
                vs = torch.cat([vs, vs.new_ones(H, 1)], 1)
            if self.sink_distance is not None:  # kept apart: w k_sink (H, Dk', 1) and v_sink (H, Dv')
                sink_kv = (of((ret.sink_weight.float()[:, None] * ks)[..., None].contiguous()), of(vs.contiguous()))
            else:
                sink = ret.sink_weight.float()[:, None, None] * ks[:, :, None] * vs[:, None, :]  # (H, Dk', Dv')
                sink = sink.view(1, Hkv, self.G, self.Dkp, self.Dvp).detach()

        mlp = block.mlp
        if mlp.glu:
            w_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            b_up = None if mlp.gate_proj.bias is None else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
            down = mlp.down_proj
        else:
            w_up, b_up, down = mlp.fc_in.weight, mlp.fc_in.bias, mlp.fc_out
        return {
            "norm1": _packed_norm(norm1), "norm2": _packed_norm(norm2),  # affines folded: bare normalisations
            # Norms of the retention and MLP outputs ("post", "sandwich"), affine kept: they feed the residual.
            "out_norms": None if cfg.block_norms == "pre" else tuple(
                _packed_norm(_Norm.of(n), of) for n in (block.retention_out_norm, block.mlp_out_norm)),
            "qk_norm": self._pack_qk_norm(ret) if cfg.qk_norm is not None else None,
            "qkv": self._matrix(w_qkv, b_qkv if bool(b_qkv.abs().max() > 0) else None),
            "o": self._matrix(wo, bo),
            "up": self._matrix(*_fold(norm2, w_up, b_up)),
            "down": self._matrix(down.weight, down.bias),
            "act": mlp.act, "glu": mlp.glu,
            "gamma_t": gamma,
            "gamma": of(gamma.view(1, Hkv, self.G, 1, 1).contiguous()),
            "sink": sink,
            "sink_kv": sink_kv,
            "sink_in": None if sink is None else of(((1 - gamma).view(1, Hkv, self.G, 1, 1) * sink).contiguous()),
            "head_norm": (cfg.head_norm_eps, cfg.head_norm == "groupnorm") if cfg.head_norm != "none" else None,
            "head_affine": head_affine,
        }

    def _pack_qk_norm(self, ret) -> Tuple[float, object]:
        """The q/k RMSNorm weights as one (H + Hkv, Dk') array in the packed q'/k' layout (channels
        permuted, the key scale folded into k's rows, 1 on the extra features), and the eps."""
        H, Hkv, Dk = self.H, self.Hkv, self.Dk
        rows = []
        for norm, heads, scale in ((ret.q_norm, H, 1.0), (ret.k_norm, Hkv, ret.scale)):
            w = (norm.weight.detach().float() * scale).view(-1, Dk).expand(heads, Dk)[:, self.perm]  # "head": (Dk,)
            rows.append(torch.cat([w, w.new_ones(heads, self.extra_k)], 1))
        return ret.q_norm.eps, self.ops.of(torch.cat(rows).contiguous())

    def _pack_embeddings(self, model):
        self.embed = self.ops.of(model.model.embed_tokens.weight.detach().float())
        embed_pos = getattr(model.model, "embed_positions", None)
        self.embed_pos = None if embed_pos is None else self.ops.of(embed_pos.weight.detach().float())
        final = _Norm.of(model.model.norm)
        self.final_norm = _packed_norm(final)
        self.softcap = model.config.final_logit_softcapping  # logits c * tanh(logits / c)
        self.lm_head = self._matrix(*_fold(final, model.lm_head.weight, getattr(model.lm_head, "bias", None)))

    def _matrices(self):
        yield self.lm_head
        for p in self.layers:
            yield from (p["qkv"], p["o"], p["up"], p["down"])

    def weight_bytes(self) -> int:
        """Bytes streamed per decoding step (the packed matrices; embeddings are a lookup)."""
        return sum(m.w.numel() * m.w.element_size() for m in self._matrices())

    # ---------------------------------------------------------------- state

    def reset(self, batch_size: Optional[int] = None):
        """Empty state (nothing seen) for `batch_size` rows (default: the current one)."""
        self.B = batch_size or self.B
        L = len(self.layers)
        self.state = torch.zeros(L, self.B, self.Hkv, self.G, self.Dkp, self.Dvp, device=self.device)
        for i, p in enumerate(self.layers):
            if p["sink"] is not None:
                self.state[i] += p["sink"]
        self.positions = torch.zeros(self.B, dtype=torch.long, device=self.device)  # next position per row
        self.seen_tokens = 0
        # per window group: (L_g, B, Hkv, W, Dk' + Dv') [k', v'] of the last W tokens and the (B, W)
        # filled slots, a ring: the token consumed when `seen_tokens` was t sits in slot t mod W
        self.caches = [torch.zeros(len(members), self.B, self.Hkv, w, self.Dkp + self.Dvp, device=self.device)
                       for w, members in self.window_groups]
        self.cache_masks = [torch.zeros(self.B, w, dtype=torch.bool, device=self.device) for w, _ in self.window_groups]
        self.logits = torch.empty(self.B, self.config.vocab_size, device=self.device)
        self._logits = self.ops.of(self.logits)

    def pack_state(self, states, positions: torch.Tensor, seen: int = 0) -> Tuple[torch.Tensor, ...]:
        """Model-format layer states (`RetNetState.states`: (B, H, Dk(+1), Dv') each) -> this
        decoder's (L, B, Hkv, G, Dk', Dv') buffer (sink folded in, channels permuted), with
        `positions` (B,): the position of each row's next token. New tensors, nothing shared.
        Windowed layers (`WindowState`s): also, per window group, the (L_g, B, Hkv, W, Dk' + Dv')
        cache and its (B, W) mask, flat: (buffer, positions, cache_0, mask_0, cache_1, mask_1, ...),
        in ring order for a state that has consumed `seen` tokens (see `reset`)."""
        window = self._pack_window(states, seen) if self.windowed else ()
        states = [s.state if isinstance(s, WindowState) else s for s in states]
        B = states[0].shape[0]
        packed = torch.zeros(len(self.layers), B, self.Hkv, self.G, self.Dkp, self.Dvp, device=self.device)
        for i, s in enumerate(states):
            s = s.float().view(B, self.Hkv, self.G, *s.shape[-2:])  # (B, Hkv, G, Dk(+1), Dv')
            dst = packed[i]
            dst[..., : self.Dk, :] = s[..., self.perm, :]
            if self.extra_k:
                dst[..., self.Dk, :] = s[..., self.Dk, :]
            if self.layers[i]["sink"] is not None:
                dst += self.layers[i]["sink"]
        return (packed, positions.to(self.device, torch.long).clone(), *window)

    def _pack_window(self, states, seen: int) -> Tuple[torch.Tensor, ...]:
        """The windowed layers' `WindowState`s (oldest slot first) -> per window group, the cache in
        this decoder's layout (one key/value head per query group, channels permuted, [k, bias
        feature, 0, v, 1]) and the (B, W) mask, flat: (cache_0, mask_0, cache_1, mask_1, ...),
        rolled into ring order: the oldest of W slots holds token seen - W, so it goes to slot
        seen mod W."""
        out = []
        for w, members in self.window_groups:
            B = states[members[0]].mask.shape[0]
            cache = torch.zeros(len(members), B, self.Hkv, w, self.Dkp + self.Dvp, device=self.device)
            for dst, i in zip(cache, members):
                s = states[i]
                k, v = (x.float().view(B, w, self.Hkv, self.G, -1)[:, :, :, 0].transpose(1, 2)  # (B, Hkv, W, D)
                        for x in (s.keys, s.values))
                dst[..., : self.Dk] = k[..., self.perm]
                if self.extra_k:
                    dst[..., self.Dk] = k[..., self.Dk]
                dst[..., self.Dkp: self.Dkp + self.Dv] = v
                dst[..., -1] = s.mask[:, None, :].float()  # the normaliser's 1, in filled slots
            mask = states[members[0]].mask.to(self.device)
            out += [cache.roll(seen % w, dims=3), mask.roll(seen % w, dims=1)]
        return tuple(out)

    def unpack_state(self, packed: torch.Tensor, dtype: Optional[torch.dtype] = None, window=(), seen: int = 0):
        """The inverse of `pack_state`: a list of model-format layer states, in `dtype`
        (default: the model's); with `window` = (cache_0, mask_0, ...) as `pack_state` returns
        them, for a state that has consumed `seen` tokens, `WindowState`s for the windowed layers."""
        B, inverse, out = packed.shape[1], torch.argsort(self.perm), []
        for i, p in enumerate(self.layers):
            s = packed[i] - p["sink"] if p["sink"] is not None else packed[i].clone()
            s = s[..., : self.Dk + (1 if self.extra_k else 0), :]
            s = torch.cat([s[..., : self.Dk, :][..., inverse, :], s[..., self.Dk:, :]], -2)
            out.append(s.reshape(B, self.H, *s.shape[-2:]).to(dtype or self.model.dtype))
        for (cache, mask), (w, members) in zip(zip(window[0::2], window[1::2]), self.window_groups):
            cache, mask = cache.roll(-(seen % w), dims=3), mask.roll(-(seen % w), dims=1)  # oldest slot first
            for c, i in zip(cache, members):  # c (B, Hkv, W, Dk' + Dv')
                k = torch.cat([c[..., : self.Dk][..., inverse], c[..., self.Dk: self.Dk + (1 if self.extra_k else 0)]],
                              -1)
                k, v = (x.transpose(1, 2).repeat_interleave(self.G, dim=2).to(out[i].dtype)  # (B, W, H, D)
                        for x in (k, c[..., self.Dkp: self.Dkp + self.Dv]))
                out[i] = WindowState(out[i], k, v, mask.clone())
        return out

    def load_state(self, state: RetNetState, positions: Optional[torch.Tensor] = None):
        """Take over a model state (e.g. after `model(prompt, use_cache=True)`); `positions` (B,)
        is the position of the next token of each row (its count of real tokens; default: every
        token the state has seen, i.e. no padding)."""
        first = state.states[0]
        B = (first.state if isinstance(first, WindowState) else first).shape[0]
        if positions is None:
            positions = torch.full((B,), state.seen_tokens, dtype=torch.long)
        if B != self.B:
            self.reset(B)
        self.state, self.positions, *window = self.pack_state(state.states, positions, state.seen_tokens)
        self.caches, self.cache_masks = list(window[0::2]), list(window[1::2])
        self.seen_tokens = state.seen_tokens

    def export_state(self, dtype: Optional[torch.dtype] = None) -> RetNetState:
        """The current state in the model's `RetNetState` format (to continue with model())."""
        out = RetNetState(len(self.layers))
        window = tuple(x for pair in zip(self.caches, self.cache_masks) for x in pair)
        out.states = self.unpack_state(self.state, dtype, window, self.seen_tokens)
        out.seen_tokens = self.seen_tokens
        return out

    @torch.no_grad()
    def step_state(self, state: RetNetState, token_ids: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decoding step on a model `RetNetState` (what `generate()` calls): token_ids (B, 1)
        -> next-token logits (B, V), a new tensor. The state is packed on its first step (the
        positions come from `attention_mask` over the whole sequence, else from its length) and
        stays packed, updated in place, until something reads `state.states`."""
        if state.packed is None:
            B = token_ids.shape[0]
            seen = torch.full((B,), state.seen_tokens, dtype=torch.long)
            positions = seen if attention_mask is None else attention_mask[:, :-1].long().sum(-1)
            state.packed = self.pack_state(state.states, positions, state.seen_tokens)
        buffer, positions, *window = state.packed  # windowed: + caches and masks, updated in place
        if buffer.shape[1] != self.B:
            self.reset(buffer.shape[1])
        self.state, self.positions = buffer, positions
        self.caches, self.cache_masks = list(window[0::2]), list(window[1::2])
        self.seen_tokens = state.seen_tokens  # the window caches' ring position
        logits = self.step(token_ids, restore_threads=False).clone()  # generate() restores them
        state.packed = (buffer, self.positions, *window)
        state.seen_tokens += 1
        self.state = None  # the buffer belongs to `state`; reset()/load_state() make a new one
        return logits

    # ---------------------------------------------------------------- decoding

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the prompt (B, P) through the model's parallel/chunkwise forward, keep its state,
        and return the logits (B, V) of the last position."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        self.load_state(out[CACHE_NAME], None if attention_mask is None else attention_mask.long().sum(-1))
        self.logits.copy_(out.logits[:, -1].float())
        return self.logits

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, restore_threads: bool = True) -> torch.Tensor:
        """Consume one token per row, token_ids (B,) or (B, 1); return next-token logits (B, V),
        a buffer overwritten by the next call.

        With numpy's OpenBLAS products, torch runs on one thread during the step: OpenBLAS runs
        its own threads, and torch's OpenMP workers spinning beside them would slow every product
        ~10x (the small torch ops between products gain nothing from threads). The same holds
        for torch ops between steps, so a caller that runs many steps (generate()) may keep
        torch at one thread (`restore_threads=False`) and restore it when done."""
        if not self.uses_numpy:
            return self._step(token_ids)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._step(token_ids)
        finally:
            if restore_threads:
                torch.set_num_threads(threads)

    def _step(self, token_ids: torch.Tensor) -> torch.Tensor:
        of = self.ops.of
        pos = self.positions  # (B,)
        x = self.embed[of(token_ids.reshape(self.B))]  # (B, C), a fresh fp32 array
        if self.embed_scale != 1.0:
            x *= self.embed_scale
        if self.embed_pos is not None:
            check_position_table(int(pos.max()), self.config)
            x += self.embed_pos[of(pos)]
        rots = [of(self._rotation(pos, f)) for f in self.inv_freqs]  # (B, 1, Dk'/2) complex, one per table
        backs = None  # rows past max_sink_distance turn their query back to it for the sink
        if self.sink_distance is not None:
            backs = [of(self._rotation(-(pos - self.sink_distance).clamp(min=0), f)) for f in self.inv_freqs]
        norm_c = None
        if self.extra_v and self.pure_layers:  # paper normaliser c_n per (layer, row, head)
            norm_c = of(paper_decay_norm(pos.view(1, self.B, 1, 1), self.gamma).reshape(-1, self.B, self.H, 1))
        states = of(self.state)  # (L, B, Hkv, G, Dk', Dv'), updated in place
        windows = [self._advance_window(g) for g in range(len(self.window_groups))]

        for i, p in enumerate(self.layers):
            c = w = None
            if p["window"] is not None:  # (this layer's cache, leaving rows, score mask, ring slot)
                g, j = p["window"]
                w = (windows[g][0][j], *windows[g][1:])
            elif norm_c is not None:
                c = norm_c[i]
            rot = rots[p["rope"]] if rots else None
            back = backs[p["rope"]] if backs else None
            r = self._retention(_apply_norm(x, p["norm1"]), p, states[i], rot, c, w, back)  # (B, H * Dv)
            if self.parallel_residual:
                x = p["o"](r, residual=self._mlp(_apply_norm(x, p["norm2"]), p, residual=x))
            elif p["out_norms"] is None:  # pre-norm: the residual adds are fused into the products
                x = p["o"](r, residual=x)
                x = self._mlp(_apply_norm(x, p["norm2"]), p, residual=x)
            else:  # x + norm(f(x)), the norm's affine applied (it feeds the residual, not a matrix)
                x = x + _apply_norm(p["o"](r), p["out_norms"][0])
                x = x + _apply_norm(self._mlp(_apply_norm(x, p["norm2"]), p), p["out_norms"][1])
        logits = self.lm_head(_apply_norm(x, self.final_norm))
        if self.softcap is not None:
            logits = self.ops.xp.tanh(logits * (1 / self.softcap)) * self.softcap
        self._logits[...] = logits
        self.positions = pos + 1
        self.seen_tokens += 1
        return self.logits

    def _rotation(self, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Rotary phases at frequencies `inv_freq` (Dk/2,) for the next token of each row,
        (B, 1, Dk'/2) complex64."""
        angles = pos.float()[:, None] * inv_freq  # (B, Dk/2)
        rot = torch.polar(torch.ones_like(angles), angles)
        if self.extra_k:  # the bias feature and its pad are not rotated
            rot = torch.cat([rot, rot.new_ones(self.B, 1)], -1)
        return rot[:, None]

    def _advance_window(self, group: int):
        """Once per step and window group, before the layers: (the group's cache as arrays, its
        slots in use only (L_g, B, Hkv, n, Dk' + Dv'), n <= W, which rows' oldest slot holds a key
        that now leaves the window (B, 1, 1, 1, 1), the additive score mask (B, 1, 1, n) with the
        new token's slot filled, that slot). The caches are rings
        (see `reset`): the new token takes the oldest slot, seen_tokens mod W, and nothing moves.
        Until the ring first wraps only slots 0 ... seen_tokens can hold a key, so the cache and
        the mask are cut to those (views: writes still land in the cache): a window far longer
        than the text (a full-attention layer) costs what the text costs."""
        mask, W = self.cache_masks[group], self.window_groups[group][0]  # (B, W)
        slot = self.seen_tokens % W
        n = min(self.seen_tokens + 1, W)  # slots in use, the new token's included
        leaving = self.ops.of(mask[:, slot].float().view(self.B, 1, 1, 1, 1))
        mask[:, slot] = True
        bias = torch.zeros(self.B, 1, 1, n, device=self.device).masked_fill_(~mask[:, None, None, :n], float("-inf"))
        return self.ops.of(self.caches[group])[:, :, :, :n], leaving, self.ops.of(bias), slot

    def _window_retention(self, q, k, v, p, S, sink, cache, leaving, bias, slot):
        """Windowed retention of one token (see `windowed_retention` in retention.py): the oldest
        cached key (in `slot`) leaves the window into the state with weight gamma^W, the new key
        and value take its slot, and the window's softmax terms (over the slots in any order)
        and the state's linear terms share one normaliser. q (B, H, Dk'), k (B, Hkv, Dk'),
        v (B, Hkv, 1, 1, Dv'), S (B, Hkv, G, Dk', Dv') with the sink folded in (or `sink`, its
        term (B, H, Dv') when kept apart), cache (B, Hkv, n, Dk' + Dv'), its n <= W slots in use
        -> (B, H, Dv)."""
        B, H, Hkv, G, Dkp, Dvp, Dv = self.B, self.H, self.Hkv, self.G, self.Dkp, self.Dvp, self.Dv
        xp = self.ops.xp
        old = cache[:, :, slot]  # (B, Hkv, Dk' + Dv')
        old_k, old_v = old[..., :Dkp].reshape(B, Hkv, 1, Dkp, 1), old[..., Dkp:].reshape(B, Hkv, 1, 1, Dvp)
        S += (p["gamma_w"] * leaving) * old_k * old_v
        cache[:, :, slot, :Dkp] = k
        cache[:, :, slot, Dkp:] = v.reshape(B, Hkv, Dvp)
        q = q.reshape(B, Hkv, G, Dkp)
        lin = xp.matmul(q.reshape(B, Hkv, G, 1, Dkp), S).reshape(B, Hkv, G, Dvp)
        if sink is not None:
            lin = lin + sink.reshape(B, Hkv, G, Dvp)
        scores = self._window_scores(q, cache) + bias  # (B, Hkv, G, W)
        m = self.ops.amax(scores)
        m = (m + abs(m)) * 0.5  # max(0, .), as the module path
        soft = xp.matmul(xp.exp(scores - m), cache[..., Dkp:])  # (B, Hkv, G, Dv')
        scale = xp.exp(-m)
        o = (soft[..., :Dv] + scale * lin[..., :Dv]) / (soft[..., Dv:] + scale * abs(lin[..., Dv:]))
        return o.reshape(B, H, Dv)

    def _window_scores(self, q, cache):
        """Scores of q (B, Hkv, G, Dk') against the cached keys (B, Hkv, n, Dk' + Dv'), (B, Hkv, G, n):
        q'.k' with `window_logit_softcapping` c capping the q.k channels, c tanh(q.k / c), before the
        score-bias feature adds b (as `_scores` in retention.py)."""
        xp, Dk, Dkp = self.ops.xp, self.Dk, self.Dkp
        if self.window_softcap is None:
            return xp.matmul(q, cache[..., :Dkp].swapaxes(-1, -2))
        cap = self.window_softcap
        scores = xp.tanh(xp.matmul(q[..., :Dk], cache[..., :Dk].swapaxes(-1, -2)) * (1 / cap)) * cap
        if self.extra_k:
            scores += xp.matmul(q[..., Dk:], cache[..., Dk:Dkp].swapaxes(-1, -2))
        return scores

    def _retention(self, h, p, S, rot, norm_c, window=None, back=None):
        """h (B, C) normalised input, S (B, Hkv, G, Dk', Dv') this layer's state -> (B, H * Dv);
        `window`: (this layer's cache, leaving rows, score mask, ring slot) from `_advance_window`;
        `back`: the rotation (B, 1, Dk'/2) that turns a query back to max_sink_distance."""
        B, H, Hkv, G, Dkp, Dvp, Dv = self.B, self.H, self.Hkv, self.G, self.Dkp, self.Dvp, self.Dv
        qkv = p["qkv"](h)  # (B, H*Dk' + Hkv*Dk' + Hkv*Dv' [+ H*Dv])
        n_qk = (H + Hkv) * Dkp
        qk = qkv[:, :n_qk].reshape(B, H + Hkv, Dkp)
        if p["qk_norm"] is not None:
            qk = self._qk_norm(qk, *p["qk_norm"])
        if rot is not None:
            qk = self.ops.rotate(qk, rot)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, n_qk:n_qk + Hkv * Dvp].reshape(B, Hkv, 1, 1, Dvp)

        S *= p["gamma"]  # sink included: T <- gamma T + (1 - gamma) Sink + k^T v
        if p["sink_in"] is not None:
            S += p["sink_in"]
        sink = None
        if p["sink_kv"] is not None:  # w (b + q . k_sink) [v_sink, 1], q turned back past the cap
            ks, vs = p["sink_kv"]
            qs = self.ops.rotate(q, back) if back is not None else q
            sink = self.ops.xp.matmul(qs.reshape(B, H, 1, Dkp), ks).reshape(B, H, 1) * vs  # (B, H, Dv')
        if window is not None:
            o = self._window_retention(q, k, v, p, S, sink, *window)
        else:
            S += k.reshape(B, Hkv, 1, Dkp, 1) * v
            o = self.ops.xp.matmul(q.reshape(B, Hkv, G, 1, Dkp), S).reshape(B, H, Dvp)
            if sink is not None:
                o = o + sink
        if norm_c is not None:  # (B, H, 1)
            o = o[..., :Dv] / self.ops.xp.maximum(abs(o[..., Dv:]), norm_c)
        if p["head_norm"] is not None:
            o = _normalize(o, *p["head_norm"])
        o = o.reshape(B, H * Dv)
        if p["head_affine"] is not None:
            o = o * p["head_affine"][0] + p["head_affine"][1]
        if self.gate:
            o = self.ops.apply(F.silu, qkv[:, n_qk + Hkv * Dvp:n_qk + Hkv * Dvp + H * Dv]) * o
        return o

    def _qk_norm(self, qk, eps, weight):
        """RMSNorm of q and k before the rotary, per head or over each whole projection (`qk_norm`
        "head" / "full"): qk (B, H + Hkv, Dk') -> a new array; the extra features (score bias)
        keep their values (weight 1, not in the mean)."""
        H, Dk = self.H, self.Dk
        out = qk * weight  # (B, H + Hkv, Dk')
        if self.qk_norm == "head":
            out[..., :Dk] *= _inv_rms(qk[..., :Dk], eps)
        else:
            out[:, :H, :Dk] *= _inv_rms(qk[:, :H, :Dk], eps, axes=2)
            out[:, H:, :Dk] *= _inv_rms(qk[:, H:, :Dk], eps, axes=2)
        return out

    def _mlp(self, h, p, residual=None):
        u = p["up"](h)
        if p["glu"]:
            n = u.shape[-1] // 2
            a = self.ops.apply(p["act"], u[:, :n]) * u[:, n:]
        else:
            a = self.ops.apply(p["act"], u)
        return p["down"](a, residual=residual)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 eos_token_id=None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, streamer=None) -> torch.Tensor:
        """Prompt (B, P) -> (B, P + max_new_tokens), as transformers' generate() returns it: a row
        that emits an end token (`eos_token_id`, an int or a list) is filled with `pad_token_id`
        (default: that end token) afterwards. Shapes stay static; the loop stops early once
        every row has finished. `streamer` (transformers' put()/end() interface, e.g.
        TextStreamer) gets the prompt, then each new token as it is chosen."""
        B, P = input_ids.shape
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long, device=self.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        out = torch.full((B, P + max_new_tokens), pad, dtype=torch.long, device=self.device)
        out[:, :P] = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = self.prefill(input_ids, attention_mask)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            token = self._choose(logits, do_sample, temperature, top_k, generator).masked_fill(done, pad)
            out[:, P + i] = token
            if streamer is not None:
                streamer.put(token.cpu())
            done |= torch.isin(token, eos)
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            logits = self.step(token)
        if streamer is not None:
            streamer.end()
        return out

    @staticmethod
    def _choose(logits, do_sample, temperature, top_k, generator) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        scores = logits / temperature
        if top_k:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).view(-1)
