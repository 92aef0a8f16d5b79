"""A fast, static-shape decoder for a trained RetNetForCausalLM: one token per step, O(1) state.

Batch-1 decoding is bound by streaming the weights from memory once per token. What keeps
the plain module path (`model(input_ids=token, past_key_values=state)`) away from that bound
is everything around the matrix-vector products: ~100 small tensor ops per layer
(concatenations for the score-bias and normaliser features, the sink, rotary, casts) and
per-step allocations. This decoder packs the weights once and runs about 17 ops per layer:

* q, k, v (and the gate) come from one fused matrix product whose bias column adds the
  constant features retention needs (score bias b_h on q, 1 on k, 1 on v): no `cat`.
* q/k channels are permuted inside each head so rotary pairs are adjacent; rotary is then
  one complex multiplication. Dot products are unchanged because q, k and the sink key
  are permuted alike.
* The attention sink (a never-decaying rank-1 term) is folded into the state: the decoder
  keeps T = S + Sink and updates T <- gamma T + k^T v + (1 - gamma) Sink, so the output is a
  single q @ T. The key scale and the head-norm scale are folded into the weights.
* The state lives in one preallocated buffer updated in place; the residual add rides on
  `addmm`; logits are written into a preallocated buffer.
* Each weight is stored for the matrix-vector kernel that streams it fastest (timed once per
  shape and dtype: torch in either layout, or numpy's OpenBLAS for fp32 on CPU; on one AMD
  EPYC the spread is 12 to 37 GB/s), optionally in bfloat16/float16 for half the bytes;
  states and normalisations stay fp32.

State layout: (B, Hkv, G, Dk', Dv') per layer with H = Hkv * G query heads, Dk' = Dk (+2 with
score bias: the bias feature and a zero pad), Dv' = Dv (+1 with the paper normaliser).
`load_state`/`export_state` convert to and from the model's `RetNetState`.

Results match the module path to floating-point rounding (tests compare logits and states).
"""

import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .modeling_retnet import RetNetState, paper_decay_norm, rotary_inv_freq

KERNELS = ("torch:out_in", "torch:in_out", "numpy:in_out", "numpy:out_in")
_KERNEL_CACHE: Dict[tuple, str] = {}


def kernels_for(dtype: torch.dtype, device: torch.device) -> Tuple[str, ...]:
    """Candidates: torch in both layouts; on CPU in fp32 also numpy's BLAS (OpenBLAS in the
    numpy wheels), whose matrix-vector product streams faster than MKL's on some CPUs."""
    numpy_ok = device.type == "cpu" and dtype == torch.float32
    return tuple(k for k in KERNELS if numpy_ok or k.startswith("torch"))


def fastest_kernel(shape: Tuple[int, int], dtype: torch.dtype, device: torch.device, rows: int = 1) -> str:
    """The fastest way to multiply `rows` vectors (the batch) by a weight of `shape` (out, in),
    timed once per (shape, dtype, device, rows) on enough copies that the product streams
    from memory as in decoding. Libraries differ by shape, dtype and CPU: on one AMD EPYC, fp32 F.linear (MKL)
    streams 12 GB/s, MKL with W stored (in, out) 25 GB/s, OpenBLAS 25-37 GB/s."""
    key = (tuple(shape), dtype, device.type, rows)
    if key not in _KERNEL_CACHE:
        out_f, in_f = shape
        copies = max(1, min(64, (64 << 20) // (out_f * in_f * torch.finfo(dtype).bits // 8)))
        x = torch.randn(rows, in_f, device=device).to(dtype)
        timings = {}
        for kernel in kernels_for(dtype, device):
            mats = [_Matrix(torch.randn(out_f, in_f, device=device), None, dtype, kernel, rows) for _ in range(copies)]
            runs = []
            for _ in range(5):
                _sync(device)
                t0 = time.perf_counter()
                for m in mats:
                    m(x)
                _sync(device)
                runs.append(time.perf_counter() - t0)
            timings[kernel] = min(runs[1:])  # the first round is a warm-up; min: robust to other load
            del mats
        _KERNEL_CACHE[key] = min(timings, key=timings.get)
    return _KERNEL_CACHE[key]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _norm(module):
    """The model's norm as one fused op (F.rms_norm / F.layer_norm) on fp32 activations."""
    weight, shape, eps = module.weight.detach().float(), (module.weight.shape[0],), module.eps
    if isinstance(module, torch.nn.LayerNorm):
        bias = None if module.bias is None else module.bias.detach().float()
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return lambda x: F.rms_norm(x, shape, weight, eps)


class _Matrix:
    """A packed weight (and optional bias) for `y = x W^T + b`, in the chosen kernel and dtype."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype, kernel: str,
                 rows: int = 1):
        if kernel == "auto":
            kernel = fastest_kernel(weight.shape, dtype, weight.device, rows)
        self.kernel, self.dtype = kernel, dtype
        library, layout = kernel.split(":")
        w = weight.detach().to(dtype)  # (out, in)
        self.w = w.t().contiguous() if layout == "in_out" else w.contiguous()
        self.w_op = self.w if layout == "in_out" else self.w.t()  # (in, out), possibly a view
        self.w_numpy = self.w_op.numpy() if library == "numpy" else None
        self.b = None if bias is None else bias.detach().to(dtype).contiguous()

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, in) -> (B, out) in x's dtype; `residual` (B, out) is added."""
        if self.w_numpy is not None:  # fp32 on CPU: shares memory both ways, no copies
            y = torch.from_numpy(x.contiguous().numpy() @ self.w_numpy)
        elif residual is not None and residual.dtype == self.dtype:
            y = torch.addmm(residual, x.to(self.dtype), self.w_op)
            return y if self.b is None else y.add_(self.b)
        else:
            y = torch.mm(x.to(self.dtype), self.w_op).to(x.dtype)
        if self.b is not None:
            y = y.add_(self.b)
        return y if residual is None else y.add_(residual)


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
    size (another batch size works, possibly with slower kernels).
    """

    def __init__(self, model, batch_size: int = 1, dtype: Optional[torch.dtype] = None, kernel: str = "auto"):
        cfg = model.config
        self.model, self.config = model, cfg
        self.device = model.lm_head.weight.device
        self.dtype = dtype or model.lm_head.weight.dtype  # weights; activations and state stay fp32
        if kernel != "auto" and kernel not in kernels_for(self.dtype, self.device):
            raise ValueError(f"kernel={kernel!r} is not available for {self.dtype} on {self.device.type}; use 'auto' "
                             f"(the fastest, measured per weight shape) or one of {', '.join(kernels_for(self.dtype, self.device))}")
        self.kernel = kernel
        self.B = batch_size

        H, Hkv, Dk, Dv = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.qk_head_dim, cfg.v_head_dim
        self.H, self.Hkv, self.G, self.Dk, self.Dv = H, Hkv, H // Hkv, Dk, Dv
        self.rotary = cfg.position_embedding_type != "none"
        self.extra_k = 2 if cfg.score_bias else 0  # [bias feature, zero pad]: keeps Dk' even for rotary
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
        self.gamma = torch.stack([p["gamma"] for p in self.layers]).view(len(self.layers), 1, Hkv, self.G)  # (L,1,Hkv,G)
        self.inv_freq = rotary_inv_freq(cfg, self.device) if self.rotary else None
        self.reset()

    # ---------------------------------------------------------------- packing

    def _pack_layer(self, block) -> dict:
        cfg, ret = self.config, block.retention
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

        # Rows of the fused projection: q', k', v', gate.
        scale = ret.scale
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
        fused_bias = torch.cat(biases)
        has_bias = bool(fused_bias.abs().max() > 0)

        # Output projection with the head-norm affine folded in: o_proj(gate * (o * w + b)).
        # The scale w commutes with the gate; the shift b does only without a gate.
        wo = ret.o_proj.weight.float()  # (C, H*Dv)
        bo = ret.o_proj.bias.float() if ret.o_proj.bias is not None else None
        head_affine = None
        if hasattr(ret, "head_norm_bias") and cfg.use_output_gate:  # applied before the gate
            head_affine = (ret.head_norm_weight.float(), ret.head_norm_bias.float())
        elif hasattr(ret, "head_norm_weight"):
            if hasattr(ret, "head_norm_bias"):
                shift = wo @ ret.head_norm_bias.float()
                bo = shift if bo is None else bo + shift
            wo = wo * ret.head_norm_weight.float()[None, :]

        # Sink folded into the state: Sink_h = w_h * [k_sink, 1, 0]^T [v_sink, 1].
        sink = None
        if cfg.attention_sink:
            ks = ret.sink_key.float()[:, self.perm]  # (H, Dk)
            if self.extra_k:
                ks = torch.cat([ks, ks.new_ones(H, 1), ks.new_zeros(H, 1)], 1)
            vs = ret.sink_value.float()
            if self.extra_v:
                vs = torch.cat([vs, vs.new_ones(H, 1)], 1)
            sink = ret.sink_weight.float()[:, None, None] * ks[:, :, None] * vs[:, None, :]  # (H, Dk', Dv')
            sink = sink.view(1, Hkv, self.G, self.Dkp, self.Dvp)

        mlp = block.mlp
        if mlp.glu:
            up = _Matrix(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                         None if mlp.gate_proj.bias is None else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]),
                         self.dtype, self.kernel, self.B)
            down = _Matrix(mlp.down_proj.weight, mlp.down_proj.bias, self.dtype, self.kernel, self.B)
        else:
            up = _Matrix(mlp.fc_in.weight, mlp.fc_in.bias, self.dtype, self.kernel, self.B)
            down = _Matrix(mlp.fc_out.weight, mlp.fc_out.bias, self.dtype, self.kernel, self.B)
        gamma = ret.gamma.detach().float().to(dev)
        return {
            "norm1": _norm(block.input_layernorm), "norm2": _norm(block.post_retention_layernorm),
            "qkv": _Matrix(torch.cat(rows), fused_bias if has_bias else None, self.dtype, self.kernel, self.B),
            "o": _Matrix(wo, bo, self.dtype, self.kernel, self.B),
            "up": up, "down": down, "act": mlp.act, "glu": mlp.glu,
            "gamma": gamma,
            "sink": sink,
            "sink_in": None if sink is None else (1 - gamma).view(1, self.Hkv, self.G, 1, 1) * sink,
            "head_norm": ret.head_norm if cfg.head_norm != "none" else None,
            "head_affine": head_affine,
        }

    def _pack_embeddings(self, model):
        self.embed = model.model.embed_tokens.weight.detach()
        self.embed_pos = getattr(model.model, "embed_positions", None)
        self.final_norm = _norm(model.model.norm)
        self.lm_head = _Matrix(model.lm_head.weight, None, self.dtype, self.kernel, self.B)

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
        for l, p in enumerate(self.layers):
            if p["sink"] is not None:
                self.state[l] += p["sink"]
        self.positions = torch.zeros(self.B, dtype=torch.long, device=self.device)  # next position per row
        self.seen_tokens = 0
        self.logits = torch.empty(self.B, self.config.vocab_size, device=self.device)

    def load_state(self, state: RetNetState, positions: Optional[torch.Tensor] = None):
        """Take over a model state (e.g. after `model(prompt, use_cache=True)`); `positions` (B,)
        is the position of the next token of each row (its count of real tokens; default: every
        token the state has seen, i.e. no padding)."""
        B = state.states[0].shape[0]
        if positions is None:
            positions = torch.full((B,), state.seen_tokens, dtype=torch.long)
        if B != self.B:
            self.reset(B)
        for l, s in enumerate(state.states):
            s = s.float().view(B, self.Hkv, self.G, *s.shape[-2:])  # (B, Hkv, G, Dk(+1), Dv')
            dst = self.state[l]
            dst.zero_()
            dst[..., : self.Dk, :] = s[..., self.perm, :]
            if self.extra_k:
                dst[..., self.Dk, :] = s[..., self.Dk, :]
            if self.layers[l]["sink"] is not None:
                dst += self.layers[l]["sink"]
        self.positions = positions.to(self.device, torch.long).clone()
        self.seen_tokens = state.seen_tokens

    def export_state(self, dtype: Optional[torch.dtype] = None) -> RetNetState:
        """The current state in the model's `RetNetState` format (to continue with model())."""
        out = RetNetState(len(self.layers))
        inverse = torch.argsort(self.perm)
        for l, p in enumerate(self.layers):
            s = self.state[l] - p["sink"] if p["sink"] is not None else self.state[l].clone()
            s = s[..., : self.Dk + (1 if self.extra_k else 0), :]
            s = torch.cat([s[..., : self.Dk, :][..., inverse, :], s[..., self.Dk:, :]], -2)
            out.states[l] = s.reshape(self.B, self.H, *s.shape[-2:]).to(dtype or self.model.dtype)
        out.seen_tokens = self.seen_tokens
        return out

    # ---------------------------------------------------------------- decoding

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the prompt (B, P) through the model's parallel/chunkwise forward, keep its state,
        and return the logits (B, V) of the last position."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        self.load_state(out.past_key_values, None if attention_mask is None else attention_mask.long().sum(-1))
        self.logits.copy_(out.logits[:, -1].float())
        return self.logits

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Consume one token per row, token_ids (B,) or (B, 1); return next-token logits (B, V),
        a buffer overwritten by the next call."""
        if not self.uses_numpy:
            return self._step(token_ids)
        # OpenBLAS runs its own threads; torch's OpenMP workers spinning beside them would slow
        # every product ~10x. The small torch ops between products gain nothing from threads.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._step(token_ids)
        finally:
            torch.set_num_threads(threads)

    def _step(self, token_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B, Hkv, G = self.B, self.Hkv, self.G
        pos = self.positions  # (B,)
        x = F.embedding(token_ids.view(B), self.embed).float()  # (B, C)
        if cfg.embed_scale != 1.0:
            x = x * cfg.embed_scale
        if self.embed_pos is not None:
            x = x + self.embed_pos(pos).float()
        rot = self._rotation(pos)  # (B, 1, Dk'/2) complex, shared by all layers
        norm_c = None
        if self.extra_v:  # paper normaliser c_n per (layer, row, head)
            norm_c = paper_decay_norm(pos.view(1, B, 1, 1), self.gamma)  # (L, B, Hkv, G)

        for l, p in enumerate(self.layers):
            r = self._retention(p["norm1"](x), p, l, rot, norm_c)  # (B, H * Dv)
            if cfg.parallel_residual:
                x = p["o"](r, residual=self._mlp(p["norm2"](x), p, residual=x))
            else:
                x = p["o"](r, residual=x)
                x = self._mlp(p["norm2"](x), p, residual=x)
        x = self.final_norm(x)
        self.logits.copy_(self.lm_head(x))
        self.positions = pos + 1
        self.seen_tokens += 1
        return self.logits

    def _rotation(self, pos: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.rotary:
            return None
        angles = pos.float()[:, None] * self.inv_freq  # (B, Dk/2)
        rot = torch.polar(torch.ones_like(angles), angles)
        if self.extra_k:  # the bias feature and its pad are not rotated
            rot = torch.cat([rot, rot.new_ones(self.B, 1)], -1)
        return rot[:, None]  # (B, 1, Dk'/2)

    def _retention(self, h, p, l, rot, norm_c) -> torch.Tensor:
        B, H, Hkv, G, Dkp, Dvp, Dv = self.B, self.H, self.Hkv, self.G, self.Dkp, self.Dvp, self.Dv
        qkv = p["qkv"](h)  # (B, H*Dk' + Hkv*Dk' + Hkv*Dv' [+ H*Dv])
        n_qk = (H + Hkv) * Dkp
        qk = qkv[:, :n_qk].view(B, H + Hkv, Dkp)
        if rot is not None:
            qk = torch.view_as_real(torch.view_as_complex(qk.view(B, H + Hkv, Dkp // 2, 2)) * rot).view(B, H + Hkv, Dkp)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, n_qk:n_qk + Hkv * Dvp].view(B, Hkv, Dvp)

        S = self.state[l]  # (B, Hkv, G, Dk', Dv'), sink included
        S.mul_(p["gamma"].view(1, Hkv, G, 1, 1))
        if p["sink_in"] is not None:
            S.add_(p["sink_in"])
        S.addcmul_(k.view(B, Hkv, 1, Dkp, 1), v.view(B, Hkv, 1, 1, Dvp))
        o = torch.matmul(q.reshape(B, Hkv, G, 1, Dkp), S).view(B, H, Dvp)  # (B, H, Dv')
        if norm_c is not None:
            o = o[..., :Dv] / torch.maximum(o[..., Dv:].abs(), norm_c[l].reshape(B, H, 1))
        if p["head_norm"] is not None:
            o = p["head_norm"](o.view(B, 1, H, Dv), affine=False).view(B, H, Dv)
        o = o.reshape(B, H * Dv)
        if p["head_affine"] is not None:
            o = torch.addcmul(p["head_affine"][1], o, p["head_affine"][0])
        if self.config.use_output_gate:
            o = F.silu(qkv[:, n_qk + Hkv * Dvp:]) * o
        return o

    def _mlp(self, h, p, residual):
        u = p["up"](h)
        if p["glu"]:
            n = u.shape[-1] // 2
            a = p["act"](u[:, :n]) * u[:, n:]
        else:
            a = p["act"](u)
        return p["down"](a, residual=residual)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 eos_token_id=None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prompt (B, P) -> (B, P + max_new_tokens), as transformers' generate() returns it: a row
        that emits an end token (`eos_token_id`, an int or a list) is filled with `pad_token_id`
        (default: that end token) afterwards. Shapes stay static; the loop stops early once
        every row has finished."""
        B, P = input_ids.shape
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long, device=self.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        out = torch.full((B, P + max_new_tokens), pad, dtype=torch.long, device=self.device)
        out[:, :P] = input_ids
        logits = self.prefill(input_ids, attention_mask)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            token = self._choose(logits, do_sample, temperature, top_k, generator).masked_fill(done, pad)
            out[:, P + i] = token
            done |= torch.isin(token, eos)
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            logits = self.step(token)
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
