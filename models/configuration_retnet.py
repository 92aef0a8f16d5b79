"""RetNet configuration: the paper's multi-scale retention plus the knobs a converted Transformer needs.

This file travels inside every checkpoint (see `auto_map`), so it imports only torch-free
transformers code and nothing from retconvert.
"""

import math
from typing import Optional, Sequence, Tuple, Union

from transformers import PretrainedConfig

RETENTION_MODES = ("parallel", "chunkwise", "recurrent")
POSITION_TYPES = ("rotary", "xpos", "none")  # rotary: Llama layout; xpos: torchscale/paper layout
HEAD_NORMS = ("groupnorm", "rmsnorm", "none")
NORM_TYPES = ("layernorm", "rmsnorm")
BLOCK_NORMS = ("pre", "post", "sandwich")
QK_NORMS = ("head", "full")
MLP_TYPES = ("mlp", "glu")  # mlp: fc_in -> act -> fc_out (GPT-2); glu: SwiGLU (Llama)
NORMALIZATIONS = ("paper", "none")
ROPE_SCALINGS = ("linear", "llama3")


def paper_decay(num_heads: int) -> list:
    """The paper's fixed schedule, gamma_h = 1 - 2^(-5-h)."""
    return [1.0 - 2.0 ** (-5 - h) for h in range(num_heads)]


class RetNetConfig(PretrainedConfig):
    r"""Configuration of a Retentive Network language model.

    Shapes: `hidden_size = num_attention_heads * head_dim` is not required (Llama-style
    models may differ); each head has `head_dim` query/key channels and
    `head_dim * value_factor` value channels.

    Args:
        retention_mode: "parallel" (training), "chunkwise" (long sequences) or "recurrent".
            Read at every forward, so changing it on a loaded model takes effect.
        chunk_size: chunk length of the chunkwise form.
        retention_window: 0 for pure retention (the default). W > 0: every retention layer also
            attends to its last W tokens with exact softmax scores exp(q.k), the older tokens
            through the decayed linear scores, both under one normaliser (see
            `windowed_retention` in retention.py); needs retention_normalization="paper".
            The recurrent state then keeps the last W keys and values beside the matrix.
            A list gives one window per layer, 0 for a pure-retention layer (a teacher with
            sliding-window attention on some layers only, e.g. Gemma 2/3); `layer_window(i)`
            reads either form.
        window_logit_softcapping: c > 0 soft-caps the window's softmax scores, exp(c tanh(q.k / c)),
            as Gemma 2's `attn_logit_softcapping` caps the scores before its softmax (a score bias
            b adds after the cap: e^b exp(c tanh(q.k / c))); the decayed linear part has no softmax
            and keeps q.k, and a pure-retention layer (window 0) is unaffected. None: no cap.
        decay_gammas: initial per-head decay, one list per model (shared by all layers) or one
            list per layer; default: the paper's `1 - 2^(-5-h)`.
        learnable_decay: train the decays (stored as logits, so they stay in (0, 1)).
        max_retention_span: the most tokens any head remembers, in tokens: each decay is used as
            min(gamma, 1 - 1/max_retention_span) (a head with decay gamma remembers about
            1 / (1 - gamma) tokens), in every form and in the packed decoder, the stored decay
            untouched. A student trained on rows of N tokens whose slowest heads remember far
            more than N never saw their state fill up; capping the span at N (with
            max_sink_distance) cut the windowed SmolLM2 student's loss at 4k-8k tokens from 1.16x
            to 1.04x the teacher's, nothing retrained (bench/length_caps.py). None: no cap.
        max_sink_distance: with `attention_sink` and rotary positions, the sink key sits at
            position 0, so a query at position n sees it at distance n, and its score turns with n;
            a student trained on rows of N tokens never saw the angles past N. With this set to
            D, a query past position D scores the sink as a query at position D would (its rotation
            for the sink taken back by n - D); up to D nothing changes. Capping at the training
            rows' 2,048 took the pure SmolLM2 student's loss at 4k-8k tokens from 2.77x to 1.13x the
            teacher's, nothing retrained (bench/length_caps.py). None (the default): no cap.
        position_embedding_type: relative position inside retention. "rotary" rotates halves
            with frequencies `rope_theta^(-2i/d)` (Llama); "xpos" rotates interleaved pairs with
            the paper's frequencies `10000^(-i/(d/2-1))` (torchscale); "none" for models that
            keep learned absolute positions (GPT-2).
        learned_position_embeddings: add a learned absolute position table (GPT-2).
        retention_normalization: "paper" divides each output row by max(|row sum of the
            decayed scores|, sqrt(sum of the decays)), the paper's two normalisations, which
            keep the scale bounded without changing the result after a head norm; "none"
            leaves the raw retention.
        head_norm: per-head normalisation of the retention output, computed in fp32.
        score_bias: learnable per-head offset b_h added to every score (b_h + q.k), kept a
            linear recurrence by appending a constant feature to q and k.
        attention_sink: a learned key/value per head that every position sees without decay,
            weighted w_h * (b_h + q.k_sink) in the scores: the counterpart of the attention
            sink of softmax Transformers (zero weight: no effect).
        use_output_gate: the paper's swish gate, `swish(x W_g) * retention(x)`.
        qk_scale: the score scale (default head_dim ** -0.5), or one value per layer (GPT-2's
            `scale_attn_by_inverse_layer_idx` divides layer i's scores by i + 1).
        partial_rotary_factor: the fraction of each head's frequency pairs that rotate: pairs
            (i, i + D/2) with i < factor * D/2 turn at the frequencies of a rotary over
            factor * D channels, the others not at all. A teacher that rotates its first
            factor * D channels (GPT-NeoX, Phi-3) converts by permuting q/k channels.
        layer_rope: per-layer RoPE, a list with one {"rope_theta", "rotary_scaling"} per layer
            (Gemma 3: a different theta for local and global layers); default: the global ones.
        qk_norm: RMSNorm of queries and keys before the rotary: "head" over each head's
            channels (Qwen3, Gemma 3), "full" over the whole projection (OLMo 2), None: none.
        block_norms: "pre": x + f(norm(x)); "post": x + norm(f(x)) (OLMo 2); "sandwich":
            x + norm(f(norm(x))) (Gemma 2/3), for f the retention and the MLP.
        final_logit_softcapping: logits c * tanh(logits / c) (Gemma 2); None: plain logits.
        embed_scale: multiplier of the token embeddings (torchscale uses sqrt(hidden_size)).
        parallel_residual: x + retention(ln1(x)) + mlp(ln2(x)) (GPT-NeoX) instead of sequential.
    """

    model_type = "retnet"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        value_factor: int = 2,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        mlp_type: str = "mlp",
        mlp_bias: bool = False,
        norm_type: str = "layernorm",
        norm_eps: float = 1e-5,
        attention_bias: bool = False,
        o_proj_bias: bool = False,
        retention_mode: str = "parallel",
        chunk_size: int = 64,
        retention_window: Union[int, Sequence[int]] = 0,
        window_logit_softcapping: Optional[float] = None,
        decay_gammas: Optional[Sequence] = None,
        learnable_decay: bool = False,
        max_retention_span: Optional[int] = None,
        max_sink_distance: Optional[int] = None,
        position_embedding_type: str = "xpos",
        rope_theta: float = 10000.0,
        rotary_scaling: Optional[dict] = None,
        learned_position_embeddings: bool = False,
        max_position_embeddings: int = 2048,
        qk_scale: Optional[Union[float, Sequence[float]]] = None,
        retention_normalization: str = "paper",
        head_norm: str = "groupnorm",
        head_norm_affine: bool = False,
        head_norm_eps: float = 1e-6,
        score_bias: bool = False,
        attention_sink: bool = False,
        use_output_gate: bool = True,
        partial_rotary_factor: float = 1.0,
        layer_rope: Optional[Sequence[dict]] = None,
        qk_norm: Optional[str] = None,
        block_norms: str = "pre",
        final_logit_softcapping: Optional[float] = None,
        embed_scale: float = 1.0,
        parallel_residual: bool = False,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.value_factor = value_factor
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.mlp_type = mlp_type
        self.mlp_bias = mlp_bias
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.attention_bias = attention_bias
        self.o_proj_bias = o_proj_bias
        self.retention_mode = retention_mode
        self.chunk_size = chunk_size
        self.retention_window = list(retention_window) if isinstance(retention_window, (list, tuple)) \
            else retention_window
        self.window_logit_softcapping = window_logit_softcapping
        self.decay_gammas = [list(map(float, g)) if isinstance(g, (list, tuple)) else float(g)
                             for g in decay_gammas] if decay_gammas is not None else None
        self.learnable_decay = learnable_decay
        self.max_retention_span = max_retention_span
        self.max_sink_distance = max_sink_distance
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.rotary_scaling = rotary_scaling
        self.learned_position_embeddings = learned_position_embeddings
        self.max_position_embeddings = max_position_embeddings
        self.qk_scale = [float(x) for x in qk_scale] if isinstance(qk_scale, (list, tuple)) else qk_scale
        self.retention_normalization = retention_normalization
        self.head_norm = head_norm
        self.head_norm_affine = head_norm_affine
        self.head_norm_eps = head_norm_eps
        self.score_bias = score_bias
        self.attention_sink = attention_sink
        self.use_output_gate = use_output_gate
        self.partial_rotary_factor = float(partial_rotary_factor)
        self.layer_rope = [dict(r) for r in layer_rope] if layer_rope is not None else None
        self.qk_norm = qk_norm
        self.block_norms = block_norms
        self.final_logit_softcapping = final_logit_softcapping
        self.embed_scale = embed_scale
        self.parallel_residual = parallel_residual
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # Derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def v_head_dim(self) -> int:
        return self.qk_head_dim * self.value_factor

    def layer_qk_scale(self, layer_idx: int) -> float:
        """The score scale of one layer: `qk_scale` (its entry for the layer), else head_dim ** -0.5."""
        if self.qk_scale is None:
            return self.qk_head_dim**-0.5
        return self.qk_scale[layer_idx] if isinstance(self.qk_scale, list) else self.qk_scale

    def layer_rotary(self, layer_idx: Optional[int] = None) -> Tuple[float, Optional[dict]]:
        """(rope_theta, rotary_scaling) of one layer: its `layer_rope` entry, else the global ones."""
        if self.layer_rope is None or layer_idx is None:
            return self.rope_theta, self.rotary_scaling
        entry = self.layer_rope[layer_idx]
        return entry["rope_theta"], entry.get("rotary_scaling")

    def layer_window(self, layer_idx: int) -> int:
        """The retention window of one layer in tokens (0: pure retention)."""
        w = self.retention_window
        return w[layer_idx] if isinstance(w, list) else w

    @property
    def layer_windows(self) -> list:
        """The retention window of every layer, [num_hidden_layers] ints (0: pure retention)."""
        return [self.layer_window(i) for i in range(self.num_hidden_layers)]

    def layer_decay_gammas(self, layer_idx: int) -> list:
        """Initial decays of one layer's heads."""
        g = self.decay_gammas
        if g is None:
            return paper_decay(self.num_attention_heads)
        return list(g[layer_idx]) if isinstance(g[0], list) else list(g)

    # Validation ----------------------------------------------------------------------------
    def _validate(self):
        def check(ok, problem, fix):
            if not ok:
                raise ValueError(f"RetNetConfig: {problem}; {fix}")

        def choice(name, value, allowed):
            check(value in allowed, f"{name}={value!r} is not supported",
                  f"use one of {', '.join(map(repr, allowed))}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "value_factor", "max_position_embeddings"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer",
                  f"set {name} to a positive integer")
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        if self.head_dim is None:
            check(self.hidden_size % H == 0,
                  f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={H}",
                  "pick a head count that divides hidden_size or set head_dim explicitly")
        check(self.qk_head_dim > 0, f"head_dim={self.head_dim!r} must be positive", "set head_dim > 0")
        check(isinstance(Hkv, int) and Hkv > 0 and H % Hkv == 0,
              f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}",
              "use a key/value head count that divides the query head count")
        choice("retention_mode", self.retention_mode, RETENTION_MODES)
        check(isinstance(self.chunk_size, int) and self.chunk_size > 0,
              f"chunk_size={self.chunk_size!r} must be a positive integer", "set chunk_size to e.g. 64")
        window = self.retention_window
        if isinstance(window, list):
            check(len(window) == self.num_hidden_layers,
                  f"retention_window has {len(window)} entries for {self.num_hidden_layers} layers",
                  "give one window per layer (0 for pure retention), or one integer for all")
            for i, w in enumerate(window):
                check(isinstance(w, int) and not isinstance(w, bool) and w >= 0,
                      f"retention_window[{i}]={w!r} must be an integer >= 0",
                      "give each layer 0 (pure retention) or a window length such as 64")
        else:
            check(isinstance(window, int) and not isinstance(window, bool) and window >= 0,
                  f"retention_window={window!r} must be an integer >= 0",
                  "set retention_window to 0 (pure retention) or a window length such as 64")
        check(not any(self.layer_windows) or self.retention_normalization == "paper",
              f"retention_window={window} needs retention_normalization='paper' (the window and "
              f"the decayed state share one normaliser), not {self.retention_normalization!r}",
              "set retention_normalization='paper' or retention_window=0")
        span = self.max_retention_span
        check(span is None or (isinstance(span, int) and not isinstance(span, bool) and span >= 2),
              f"max_retention_span={span!r} must be an integer >= 2 (tokens)",
              "set it to the training rows' length (e.g. 2048) or None for no cap")
        dist = self.max_sink_distance
        check(dist is None or (isinstance(dist, int) and not isinstance(dist, bool) and dist >= 0),
              f"max_sink_distance={dist!r} must be an integer >= 0 (tokens)",
              "set it to the training rows' length (e.g. 2048) or None for no cap")
        cap = self.window_logit_softcapping
        check(cap is None or (isinstance(cap, (int, float)) and not isinstance(cap, bool) and math.isfinite(cap)
                              and cap > 0),
              f"window_logit_softcapping={cap!r} must be a positive number",
              "set it > 0 (the teacher's attn_logit_softcapping, e.g. 50.0) or None for uncapped window scores")
        choice("position_embedding_type", self.position_embedding_type, POSITION_TYPES)
        choice("head_norm", self.head_norm, HEAD_NORMS)
        choice("norm_type", self.norm_type, NORM_TYPES)
        choice("mlp_type", self.mlp_type, MLP_TYPES)
        choice("retention_normalization", self.retention_normalization, NORMALIZATIONS)
        if self.position_embedding_type != "none":
            check(self.qk_head_dim % 2 == 0, f"head_dim={self.qk_head_dim} is odd",
                  "rotary positions need an even head_dim")
            check(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive", "set rope_theta > 0")
        if self.rotary_scaling is not None:
            kind = self.rotary_scaling.get("rope_type", self.rotary_scaling.get("type"))
            choice("rotary_scaling type", kind, ROPE_SCALINGS)
        check(self.partial_rotary_factor == 1.0 or (0.0 < self.partial_rotary_factor < 1.0
                                                     and (self.qk_head_dim * self.partial_rotary_factor) % 2 == 0),
              f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1] and rotate an even number "
              f"of the {self.qk_head_dim} head channels", "use e.g. 0.25 or 1.0")
        check(self.partial_rotary_factor == 1.0 or self.position_embedding_type == "rotary",
              f"partial_rotary_factor={self.partial_rotary_factor} with position_embedding_type="
              f"{self.position_embedding_type!r}", "partial rotation needs position_embedding_type='rotary'")
        if self.qk_norm is not None:
            choice("qk_norm", self.qk_norm, QK_NORMS)
        choice("block_norms", self.block_norms, BLOCK_NORMS)
        check(self.block_norms == "pre" or not self.parallel_residual,
              f"block_norms={self.block_norms!r} with parallel_residual", "use block_norms='pre' for a parallel block")
        check(self.final_logit_softcapping is None or self.final_logit_softcapping > 0,
              f"final_logit_softcapping={self.final_logit_softcapping!r} must be positive", "set it > 0 or None")
        if self.layer_rope is not None:
            check(len(self.layer_rope) == self.num_hidden_layers,
                  f"layer_rope has {len(self.layer_rope)} entries for {self.num_hidden_layers} layers",
                  "give one {'rope_theta', 'rotary_scaling'} per layer")
            for entry in self.layer_rope:
                check(entry.get("rope_theta", 0) > 0, f"layer_rope entry {entry} needs rope_theta > 0",
                      "set rope_theta in every entry")
                if entry.get("rotary_scaling") is not None:
                    scaling = entry["rotary_scaling"]
                    choice("rotary_scaling type", scaling.get("rope_type", scaling.get("type")), ROPE_SCALINGS)
        if isinstance(self.qk_scale, list):
            check(len(self.qk_scale) == self.num_hidden_layers,
                  f"qk_scale has {len(self.qk_scale)} values for {self.num_hidden_layers} layers",
                  "give one score scale, or one per layer")
        if self.decay_gammas is not None:
            rows = self.decay_gammas if isinstance(self.decay_gammas[0], list) else [self.decay_gammas]
            check(len(rows) in (1, self.num_hidden_layers),
                  f"decay_gammas has {len(rows)} rows for {self.num_hidden_layers} layers",
                  "give one list of per-head decays, or one per layer")
            for row in rows:
                check(len(row) == H, f"decay_gammas row has {len(row)} values for {H} heads",
                      "give one decay per attention head")
                for g in row:
                    check(0.0 < g < 1.0 and math.isfinite(g), f"decay {g!r} is outside (0, 1)",
                          "every decay gamma must satisfy 0 < gamma < 1")
