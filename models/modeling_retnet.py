"""RetNet for causal language modelling, in the transformers style.

Reads top to bottom: positions -> multi-scale retention -> MLP -> block -> model -> LM head.
Tensor layout inside retention is [B, T, H, D] (see `retention.py`).

This file travels inside every checkpoint (see `auto_map`): it imports only torch,
transformers and its sibling files, never retconvert.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_retnet import RetNetConfig
from .positions_retnet import apply_rotary, check_position_table, paper_decay_norm, rotary_inv_freq, rotate  # noqa: F401
from .retention import retention, windowed_retention
from .state_retnet import CACHE_NAME, RetNetState, layer_tensors, map_layer_state, pick_cache  # noqa: F401

# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: RetNetConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class MultiScaleRetention(nn.Module):
    """Multi-scale retention (paper section 2.2) with per-head decay.

    x -> q, k, v (+ rotary on q, k) -> retention in the configured form -> normalisation ->
    per-head norm (fp32) -> swish gate -> output projection.
    """

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        H, Hkv = config.num_attention_heads, config.num_key_value_heads
        Dk, Dv = config.qk_head_dim, config.v_head_dim
        self.num_heads, self.num_kv_heads, self.qk_dim, self.v_dim = H, Hkv, Dk, Dv
        self.scale = config.layer_qk_scale(layer_idx)
        if config.qk_norm is not None:  # RMSNorm of q and k, per head or over the whole projection
            per_head = config.qk_norm == "head"
            self.q_norm = RMSNorm(Dk if per_head else H * Dk, eps=config.norm_eps)
            self.k_norm = RMSNorm(Dk if per_head else Hkv * Dk, eps=config.norm_eps)

        self.q_proj = nn.Linear(config.hidden_size, H * Dk, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * Dk, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, Hkv * Dv, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * Dv, config.hidden_size, bias=config.o_proj_bias)
        if config.use_output_gate:
            self.g_proj = nn.Linear(config.hidden_size, H * Dv, bias=False)
        if config.head_norm_affine:  # per-channel scale (and shift for groupnorm) after the norm
            self.head_norm_weight = nn.Parameter(torch.ones(H * Dv))
            if config.head_norm == "groupnorm":
                self.head_norm_bias = nn.Parameter(torch.zeros(H * Dv))
        if config.score_bias:
            self.score_bias = nn.Parameter(torch.zeros(H))
        if config.attention_sink:  # a virtual, never-decaying first token per head
            self.sink_key = nn.Parameter(torch.zeros(H, Dk))
            self.sink_value = nn.Parameter(torch.zeros(H, Dv))
            self.sink_weight = nn.Parameter(torch.zeros(H))

        # Decay stored as a logit so that gamma = sigmoid(logit) stays in (0, 1) when trained.
        logit = torch.logit(torch.tensor(config.layer_decay_gammas(layer_idx), dtype=torch.float64)).float()
        if config.learnable_decay:
            self.decay_logit = nn.Parameter(logit)
        else:
            self.register_buffer("decay_logit", logit)

    @property
    def gamma(self) -> torch.Tensor:
        """Per-head decay (H,), fp32, at most 1 - 1/config.max_retention_span when that is set."""
        gamma = torch.sigmoid(self.decay_logit.float())
        span = self.config.max_retention_span
        return gamma if span is None else gamma.clamp(max=1.0 - 1.0 / span)

    def reset_decay(self):
        gammas = torch.tensor(self.config.layer_decay_gammas(self.layer_idx), dtype=torch.float64)
        with torch.no_grad():
            self.decay_logit.copy_(torch.logit(gammas).to(self.decay_logit.dtype))

    def head_norm(self, o: torch.Tensor, affine: bool = True) -> torch.Tensor:
        """Normalise each head (B, T, H, Dv) over its channels, in fp32, then scale (and shift)."""
        kind, eps = self.config.head_norm, self.config.head_norm_eps
        dtype, o = o.dtype, o.float()
        if kind == "groupnorm":
            o = o - o.mean(-1, keepdim=True)
        if kind != "none":
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
        if affine and hasattr(self, "head_norm_weight"):
            o = o * self.head_norm_weight.float().view(self.num_heads, self.v_dim)
            if hasattr(self, "head_norm_bias"):
                o = o + self.head_norm_bias.float().view(self.num_heads, self.v_dim)
        return o.to(dtype)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        position_ids: torch.LongTensor,  # (B, T)
        token_mask: Optional[torch.Tensor] = None,  # (B, T), 0 for padding
        state: Optional[torch.Tensor] = None,  # (B, H, Dk', Dv')
        output_final_state: bool = True,  # False: no state is computed (None is returned)
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        o, state = self.mix(x, position_ids, token_mask, state, output_final_state)
        return self.o_proj(o), state

    def mix(self, x, position_ids, token_mask=None, state=None,
            output_final_state: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Everything but the output projection: (B, T, H * Dv), the counterpart of the
        attention output before o_proj in a Transformer (what conversion aligns)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, position_ids)
        o, state = self.retain(q, k, v, position_ids, token_mask, state, output_final_state=output_final_state)
        o = self.head_norm(o).reshape(B, T, self.num_heads * self.v_dim)
        if self.config.use_output_gate:
            o = F.silu(self.g_proj(x)) * o
        return o, state

    def project(self, x, position_ids):
        """q, k (B, T, H, Dk) with positions applied and k scaled; v (B, T, H, Dv)."""
        B, T, _ = x.shape
        H, Dk, Dv = self.num_heads, self.qk_dim, self.v_dim
        q, k = self.q_proj(x), self.k_proj(x)
        if self.config.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, H, Dk), k.view(B, T, self.num_kv_heads, Dk)
        if self.config.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, Dv)
        if self.num_kv_heads != H:  # grouped-query: each key/value head serves H / Hkv query heads
            k = k.repeat_interleave(H // self.num_kv_heads, dim=2)
            v = v.repeat_interleave(H // self.num_kv_heads, dim=2)
        if self.config.position_embedding_type != "none":
            q, k = apply_rotary(q, k, position_ids, self.config, self.layer_idx)
        return q, k * self.scale, v

    def retain(self, q, k, v, position_ids, token_mask=None, state=None, gamma=None, score_bias=None,
               sink_weight=None, output_final_state: bool = True):
        """Retention of projected q, k, v plus the configured normalisation: (B, T, H, Dv).

        `gamma`, `score_bias` and `sink_weight` (H,) default to the layer's own; conversion
        passes candidates here to fit them (H may then be a multiple of the layer's head count).
        float16 and bfloat16 inputs, and autocast, are retained in float32 (the state stays
        float32; the output is cast back): row sums and states outgrow fp16's 65,504 within a few
        thousand tokens, and bf16's 8-bit mantissa rounds decays such as 0.9999 to 1
        (tests/test_correctness.py; docs/RESULTS.md, "bf16 and the student's gradients").
        """
        with torch.autocast(v.device.type, enabled=False):
            o, state = self._retain(q.float(), k.float(), v.float(), position_ids, token_mask, state, gamma,
                                    score_bias, sink_weight, output_final_state)
        return o.to(v.dtype), state

    def _retain(self, q, k, v, position_ids, token_mask, state, gamma, score_bias, sink_weight,
                output_final_state):
        cfg = self.config
        B, T, H, Dv = v.shape
        dtype = v.dtype
        gamma = self.gamma if gamma is None else gamma
        sink = self.sink(q, score_bias, sink_weight, position_ids) if cfg.attention_sink else None  # (B, T, H)
        Dk = q.shape[-1]  # the teacher's q.k channels, before any score-bias feature
        if cfg.score_bias:  # scores become b_h + q.k: a constant feature on each side
            b = self.score_bias if score_bias is None else score_bias
            q = torch.cat([q, b.to(q.dtype).view(1, 1, H, 1).expand(B, T, H, 1)], -1)
            k = torch.cat([k, k.new_ones(B, T, H, 1)], -1)
        window = cfg.layer_window(self.layer_idx)
        if window:  # exact softmax over the last W tokens, one normaliser with the state
            sink_terms = None if sink is None else (sink, self.sink_value.repeat(H // self.num_heads, 1))
            mode = cfg.retention_mode if T > 1 else "recurrent"
            o, state = windowed_retention(q, k, v, gamma, window, mode, chunk_size=cfg.chunk_size,
                                          initial_state=state, output_final_state=output_final_state,
                                          token_mask=token_mask, sink=sink_terms,
                                          softcap=cfg.window_logit_softcapping, softcap_channels=Dk)
            return o.to(dtype), state
        if cfg.retention_normalization == "paper":  # carry the row sums of the scores along
            v = torch.cat([v, v.new_ones(B, T, H, 1)], -1)

        # Padding neither enters the state nor decays it (see retention.py).
        mode = cfg.retention_mode if T > 1 else "recurrent"
        o, state = retention(q, k, v, gamma, mode, chunk_size=cfg.chunk_size, initial_state=state,
                             output_final_state=output_final_state, token_mask=token_mask)

        if sink is not None:  # the sink's value, and its score in the row sum
            G = H // self.num_heads
            o = o + sink[..., None] * F.pad(self.sink_value.repeat(G, 1), (0, o.shape[-1] - Dv), value=1.0)
        if cfg.retention_normalization == "paper":
            # Paper: D~ = D / sqrt(sum_m D_nm), R~ = R / max(|sum_m R_nm|, 1). Together that is
            # o_n / max(|s_n|, c_n) with s_n the score row sum and c_n^2 = sum_{j<=n} gamma^j.
            o, s = o[..., :Dv], o[..., Dv:]
            c = paper_decay_norm(position_ids.clamp(min=0)[..., None], gamma)  # (B, T, H)
            o = o / torch.maximum(s.float().abs(), c[..., None]).to(o.dtype)
        return o.to(dtype), state

    def sink(self, q, score_bias=None, sink_weight=None, position_ids=None) -> torch.Tensor:
        """Score of the attention sink, (B, T, H): w_h * (b_h + q . k_sink), q (B, T, H, Dk)
        rotated to its position; with `config.max_sink_distance` D and `position_ids` (B, T),
        a query past D is turned back to position D first.

        Softmax heads park much of their weight on the first token whatever the distance;
        decayed retention cannot, so the sink is a key/value pair outside the recurrence
        that never decays. It needs no state: recurrent, chunkwise and parallel agree.
        """
        D = self.config.max_sink_distance
        if D is not None and position_ids is not None and self.config.position_embedding_type != "none":
            past = (position_ids - D).clamp(min=0)  # (B, T): how far past D each query is (0: unturned)
            q = rotate(q, -past, self.config, self.layer_idx)
        G = q.shape[2] // self.num_heads  # candidate groups during calibration, else 1
        w = self.sink_weight.repeat(G) if sink_weight is None else sink_weight
        score = torch.einsum("bthd,hd->bth", q, self.sink_key.to(q.dtype).repeat(G, 1))
        if self.config.score_bias:
            score = score + (self.score_bias.repeat(G) if score_bias is None else score_bias).to(q.dtype)
        return w.to(q.dtype) * score


class RetNetMLP(nn.Module):
    """fc_in -> act -> fc_out (GPT-2), or down(act(gate(x)) * up(x)) (SwiGLU, Llama)."""

    def __init__(self, config: RetNetConfig):
        super().__init__()
        C, F_, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.glu = config.mlp_type == "glu"
        self.act = ACT2FN[config.hidden_act]
        if self.glu:
            self.gate_proj = nn.Linear(C, F_, bias=bias)
            self.up_proj = nn.Linear(C, F_, bias=bias)
            self.down_proj = nn.Linear(F_, C, bias=bias)
        else:
            self.fc_in = nn.Linear(C, F_, bias=bias)
            self.fc_out = nn.Linear(F_, C, bias=bias)

    def forward(self, x):
        if self.glu:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc_out(self.act(self.fc_in(x)))


class RetNetBlock(nn.Module):
    """Pre-norm block: x + retention(norm(x)), then + mlp(norm(x)) (or both in parallel).

    `config.block_norms` "post" drops the input norms and normalises each output instead
    (x + norm(retention(x)), OLMo 2); "sandwich" keeps both (Gemma 2/3). The input norms are
    then identities, so `input_layernorm(x)` is always the retention's input.
    """

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        pre, post = config.block_norms in ("pre", "sandwich"), config.block_norms in ("post", "sandwich")
        self.input_layernorm = make_norm(config) if pre else nn.Identity()
        self.retention = MultiScaleRetention(config, layer_idx)
        self.post_retention_layernorm = make_norm(config) if pre else nn.Identity()  # the MLP's input norm
        self.mlp = RetNetMLP(config)
        if post:
            self.retention_out_norm, self.mlp_out_norm = make_norm(config), make_norm(config)
        else:
            self.retention_out_norm = self.mlp_out_norm = nn.Identity()

    def forward(self, x, position_ids, token_mask=None, state=None, output_final_state: bool = True):
        r, state = self.retention(self.input_layernorm(x), position_ids, token_mask, state, output_final_state)
        if self.parallel_residual:
            return x + r + self.mlp(self.post_retention_layernorm(x)), state
        x = x + self.retention_out_norm(r)
        return x + self.mlp_out_norm(self.mlp(self.post_retention_layernorm(x))), state


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetBlock"]
    # The decoding state is not a KV cache: generation must not create one for us.
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() hook: we build our own RetNetState in forward()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MultiScaleRetention):
            module.reset_decay()
            if hasattr(module, "head_norm_weight"):
                nn.init.ones_(module.head_norm_weight)
            if hasattr(module, "head_norm_bias"):
                nn.init.zeros_(module.head_norm_bias)
            for name in ("score_bias", "sink_key", "sink_value", "sink_weight"):
                if hasattr(module, name):
                    nn.init.zeros_(getattr(module, name))


class RetNetModel(RetNetPreTrainedModel):
    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.learned_position_embeddings:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(RetNetBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RetNetState] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[RetNetState] = None,  # the older name of `cache`
        **kwargs,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("RetNetModel: pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        return_dict = True if return_dict is None else return_dict

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        state = pick_cache(cache, past_key_values)
        if state is None and use_cache:
            state = RetNetState(self.config.num_hidden_layers)
        offset = state.seen_tokens if state is not None else 0
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, B, T, offset, x.device)
        token_mask = None
        if attention_mask is not None:
            token_mask = attention_mask[:, -T:]  # generation passes the mask of the whole context
        x = x * self.config.embed_scale
        if self.config.learned_position_embeddings:
            check_position_table(int(position_ids.max()), self.config)
            x = x + self.embed_positions(position_ids.clamp(min=0))

        hidden_states = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x)
            layer_state = state.states[i] if state is not None else None
            if self.gradient_checkpointing and self.training:
                x, new_state = torch.utils.checkpoint.checkpoint(
                    layer, x, position_ids, token_mask, layer_state, state is not None, use_reentrant=False
                )
            else:  # without a cache no layer computes its final state
                x, new_state = layer(x, position_ids, token_mask, layer_state, state is not None)
            if state is not None:
                state.states[i] = new_state
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        if state is not None:
            state.seen_tokens += T

        if not return_dict:
            return tuple(t for t in (x, state, hidden_states) if t is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            **{CACHE_NAME: state if use_cache else None},
        )


def position_ids_from_mask(attention_mask, B, T, offset, device) -> torch.LongTensor:
    """Positions count real tokens only, so a left-padded row starts at 0 (as HF does)."""
    if attention_mask is None:
        return torch.arange(offset, offset + T, device=device).expand(B, T)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, offset + T)
    return pos[:, -T:].clamp(min=0)


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.model = RetNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RetNetState] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[RetNetState] = None,  # the older name of `cache`
        **kwargs,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = True if return_dict is None else return_dict
        state = pick_cache(cache, past_key_values)
        if self._steps_packed(input_ids, attention_mask, position_ids, state, inputs_embeds, labels,
                              output_hidden_states):
            logits = state.decoder.step_state(state, input_ids, attention_mask)  # (B, V) fp32
            logits = logits[:, None].to(self.lm_head.weight.dtype)  # (B, 1, V)
            if not return_dict:
                return logits, state
            return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: state})
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=state,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        state = out[CACHE_NAME] if CACHE_NAME in out else None
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, V)
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        if not return_dict:
            rest = tuple(t for t in (state, out.hidden_states) if t is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{CACHE_NAME: state})

    @staticmethod
    def _steps_packed(input_ids, attention_mask, position_ids, state, inputs_embeds, labels,
                      output_hidden_states) -> bool:
        """Whether this call is a plain one-token decoding step that the packed decoder of the
        state (set by generate()) can take: no gradient, one new real token per row after a
        prefill, positions left to the state, nothing but logits asked for."""
        return (
            state is not None and state.decoder is not None and state.seen_tokens > 0
            and input_ids is not None and input_ids.shape[1] == 1 and inputs_embeds is None
            and position_ids is None and labels is None and not output_hidden_states
            and not torch.is_grad_enabled()
            and (attention_mask is None or bool(attention_mask[:, -1].all()))
        )

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, past_key_values=None, attention_mask=None, inputs_embeds=None,
        use_cache=True, **kwargs
    ):
        """The inputs of one generate() step: what the state has not consumed yet.

        The first call feeds the prompt (or, when generation continues from a state, the part of
        the sequence after it); later calls feed the newest token. `input_ids` is the whole
        sequence (a prompt given as `inputs_embeds` is not in it), or only the new tokens when
        `attention_mask` covers the whole sequence. Positions come from the attention mask and
        the state, so generate()'s `position_ids` are not used. Same behaviour under
        transformers' old (`past_key_values`) and new (`cache`, 5.24+) names and loops.
        """
        state = pick_cache(cache, past_key_values)
        seen = state.seen_tokens if state is not None else 0
        n_embeds = inputs_embeds.shape[1] if inputs_embeds is not None else 0
        total = attention_mask.shape[1] if attention_mask is not None else n_embeds + input_ids.shape[1]
        new = total - seen  # tokens to feed
        if new <= 0:
            raise ValueError(f"generate(): the decoding state has consumed {seen} tokens but the inputs hold only "
                             f"{total}; pass the whole sequence (the state's tokens and the new ones)")
        inputs = {CACHE_NAME: state, "attention_mask": attention_mask, "use_cache": use_cache}
        ids = input_ids[:, -new:] if new <= input_ids.shape[1] else input_ids
        if new > ids.shape[1]:  # part of the new tokens are in the prompt embeddings
            embeds = inputs_embeds[:, n_embeds - (new - ids.shape[1]):]
            if ids.shape[1]:
                embeds = torch.cat([embeds, self.get_input_embeddings()(ids)], 1)
            inputs["inputs_embeds"] = embeds
        else:
            inputs["input_ids"] = ids
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def generate(self, inputs: Optional[torch.Tensor] = None, **kwargs):
        """transformers' `generate()` with the recurrent state: one prompt pass, then one token per
        step. A state passed in (`cache=`, or `past_key_values=`) continues the sequence it has
        seen; it is copied, never modified. Without a gradient, one-token steps run in the packed
        decoder (`packed_generation`; packed once per weights version and kept with the model),
        with the same tokens as the module path to floating-point rounding.
        """
        state = pick_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("use_cache", config.use_cache) is not False:
            state = state.copy() if state is not None else RetNetState(self.config.num_hidden_layers)
            state.use_decoder(self._generation_decoder())
        if state is not None:
            kwargs[CACHE_NAME] = state
        threads = torch.get_num_threads()  # packed steps may leave torch on one thread (see step())
        try:
            return super().generate(inputs, **kwargs)
        finally:
            torch.set_num_threads(threads)

    # Set False to decode generate()'s steps through the modules (no packed copy of the weights).
    packed_generation = True

    def _generation_decoder(self):
        """The packed decoder for generate()'s steps, or None where it does not apply (training
        mode, `packed_generation` off, a configuration it does not cover). Built once and kept
        until a weight or the configuration changes: a parameter's or buffer's data pointer,
        version counter or dtype, or any config value (e.g. `retention_window`), read once per
        generate() call."""
        from .decoding_retnet import RetNetDecoder

        if not self.packed_generation or self.training:
            return None
        if not RetNetDecoder.supports(self.config):
            return None
        version = (tuple((t.data_ptr(), t._version, t.dtype) for t in (*self.parameters(), *self.buffers())),
                   self.config.to_json_string(use_diff=False))
        cached = self.__dict__.get("_packed_decoder")
        if cached is None or cached[0] != version:
            cached = (version, RetNetDecoder(self))
            self.__dict__["_packed_decoder"] = cached
        return cached[1]

    def _reorder_cache(self, past_key_values: RetNetState, beam_idx):
        return past_key_values.reorder_cache(beam_idx)

    def packed_decoder(self, batch_size: int = 1, dtype: Optional[torch.dtype] = None, kernel: str = "auto"):
        """A fast decoder with packed weights and a fixed-size state (see decoding_retnet.py):
        `model.packed_decoder().generate(input_ids, max_new_tokens)`."""
        from .decoding_retnet import RetNetDecoder

        return RetNetDecoder(self, batch_size=batch_size, dtype=dtype, kernel=kernel)
