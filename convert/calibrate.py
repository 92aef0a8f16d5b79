"""Fit what retention adds (decay, score bias, output scale) to the teacher's own attention.

For each layer, on calibration text:
  1. run the teacher once, keeping each layer's input (hidden state) and its attention
     output (the input of its output projection);
  2. project that input with the student's (identical) q/k/v weights;
  3. for every head, search the decay gamma, the score bias b and the sink weight w over
     grids for the setting whose retention output, after the least-squares per-head
     scale, is closest to the attention output; that scale becomes the head's output scale.

Layer-local; two retention passes per candidate decay (see `fit_layer`). A windowed student
(`retention_window`) is fitted the same way on its windowed output: the window adds no parameter,
but it changes what gamma, b and w should be (they now shape only the tokens beyond the window
and their weight against it).
"""

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from retconvert.convert.families import Family
from retconvert.models.modeling_retnet import paper_decay_norm
from retconvert.models.retention import combine_window, retention, windowed_retention_terms

# Candidate decays: effective memory 1/(1-gamma) from 2 to 8192 tokens, log-spaced.
GAMMA_GRID = [1.0 - 2.0 ** (-e) for e in (1, 2, 3, 4, 5, 5.5, 6, 6.5, 7, 7.5, 8, 9, 10, 11, 13)]
# Candidate score biases b (scores b + q.k / sqrt(d)); b = 1 is exp's first-order Taylor expansion.
BIAS_GRID = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 32.0]
# Candidate sink weights w (sink score w * (b + q.k_sink)); 0 switches the sink off.
SINK_GRID = [0.0, 0.5, 2.0, 8.0, 32.0, 128.0, 512.0]
# The layer state that fit_layer may change (restored if the grid does worse than the start).
FITTED = ("decay_logit", "score_bias", "sink_weight")


@dataclass
class LayerFit:
    gamma: List[float]
    score_bias: List[float]
    sink_weight: List[float]
    scale: List[float]
    rel_error: float  # ||retention - attention||^2 / ||attention||^2 over the layer, after the fit
    head_rel_error: List[float] = field(default_factory=list)


@torch.no_grad()
def capture_teacher(teacher, family: Family, input_ids: torch.Tensor, batch_size: int = 4):
    """Per layer: the teacher's layer inputs (N, T, C) and attention outputs (N, T, H*D)."""
    n_layers = teacher.config.num_hidden_layers
    attn_out: Dict[int, List[torch.Tensor]] = {i: [] for i in range(n_layers)}
    hooks = []
    for i in range(n_layers):
        module = teacher.get_submodule(family.attention_output.format(i=i))
        hooks.append(module.register_forward_pre_hook(lambda _m, args, i=i: attn_out[i].append(args[0].float())))
    layer_in: Dict[int, List[torch.Tensor]] = {i: [] for i in range(n_layers)}
    try:
        for start in range(0, len(input_ids), batch_size):
            out = teacher(input_ids[start:start + batch_size].to(teacher.device), output_hidden_states=True)
            for i in range(n_layers):
                layer_in[i].append(out.hidden_states[i].float())
    finally:
        for h in hooks:
            h.remove()
    return ([torch.cat(layer_in[i]) for i in range(n_layers)], [torch.cat(attn_out[i]) for i in range(n_layers)])


def _fit_scale(o: torch.Tensor, y: torch.Tensor):
    """Per head, the least-squares scale a minimising ||a o - y||^2 and the remaining error.

    o: (..., N, T, H, D) candidates; y: (N, T, H, D). Returns scale and error (..., H), ||y||^2 (H,).
    """
    oy = torch.einsum("...nthd,nthd->...h", o, y)
    oo = torch.einsum("...nthd,...nthd->...h", o, o)
    yy = torch.einsum("nthd,nthd->h", y, y)
    scale = oy / oo.clamp_min(1e-12)
    return scale, (yy - scale * oy).clamp_min(0), yy


@torch.no_grad()
def layer_error(layer, q, k, v, pos, y):
    """The layer's own retention (its current gamma, b, sink) vs y, after the best scale per head."""
    o, _ = layer.retain(q, k, v, pos, output_final_state=False)
    return _fit_scale(layer.head_norm(o, affine=False), y)


@torch.no_grad()
def fit_layer(layer, x: torch.Tensor, y: torch.Tensor, fit_decay: bool, fit_bias: bool, stride: int = 4) -> LayerFit:
    """Choose gamma, b, the sink weight and the output scale of every head of one layer.

    x: the layer's normalised input (N, T, C); y: the teacher's attention output (N, T, H*Dv).

    Exhaustive over the grids, yet cheap: with gamma fixed, the numerator and the row sum
    of retention are linear in b and in the sink weight w,
        num = A + b Z + w (b + q.k_sink) v_sink,   den = a + b z + w (b + q.k_sink),
    where A = sum gamma^(n-m) (q.k) [v, 1] and Z = sum gamma^(n-m) [v, 1]. So two retention
    passes per gamma serve every (b, w) pair; the error is measured on every `stride`-th
    position. The result is checked through the layer's own `retain` and kept only if it
    beats the layer's current setting.
    """
    cfg = layer.config
    N, T, _ = x.shape
    H, Dv = layer.num_heads, layer.v_dim
    pos = torch.arange(T, device=x.device).expand(N, T)
    q, k, v = layer.project(x, pos)  # (N, T, H, D)
    y = y.view(N, T, H, Dv)
    keep = slice(stride - 1, None, stride)
    y_kept = y[:, keep]
    if cfg.attention_sink:
        layer.sink_key.copy_(k[:, 0].mean(0))  # (H, Dk): position 0 is unrotated
        layer.sink_value.copy_(v[:, 0].mean(0))
    start = layer_error(layer, q, k, v, pos, y)

    def per_head(value):  # a grid value, or the layer's own (H,) parameter
        return torch.full((H,), value, device=x.device) if isinstance(value, float) else value.detach().float()

    gammas = [per_head(g) for g in GAMMA_GRID] if fit_decay else [layer.gamma]
    biases = [per_head(layer.score_bias)] if cfg.score_bias else [per_head(0.0)]
    if cfg.score_bias and fit_bias:
        biases = [per_head(b) for b in BIAS_GRID]
    sinks = torch.tensor(SINK_GRID if cfg.attention_sink else [0.0], device=x.device)  # (W,)
    sink_kv = torch.cat([layer.sink_value, torch.ones(H, 1, device=x.device)], -1) if cfg.attention_sink else None
    sink_qk = torch.einsum("nthd,hd->nth", q, layer.sink_key)[:, keep] if cfg.attention_sink else None
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (N, T, H, Dv + 1)
    ones = torch.ones_like(q[..., :1])
    n = pos[:, keep][..., None]  # (N, T', 1)

    best_err = torch.full((H,), float("inf"), device=x.device)
    best = {"gamma": gammas[0], "bias": biases[0], "sink": sinks[0].expand(H)}
    window = cfg.layer_window(layer.layer_idx)
    if window:  # the softmax window's terms depend on neither gamma nor b (its scores exp(b + q.k) = e^b exp(q.k);
        # soft-capped, e^b exp(c tanh(q.k / c)): the cap never reaches b)
        soft, shift = (x[:, keep] for x in windowed_retention_terms(q, k, v, gammas[0], window, 64,
                                                                    output_final_state=False,
                                                                    softcap=cfg.window_logit_softcapping)[:2])
    for gamma in gammas:
        if window:  # the linear part covers the tokens beyond the window only
            A, Z = (windowed_retention_terms(a, c, v, gamma, window, 64, output_final_state=False,
                                             window_terms=False)[2][:, keep] for a, c in ((q, k), (ones, ones)))
        else:
            A = retention(q, k, v1, gamma, "chunkwise", chunk_size=64)[0][:, keep]  # (N, T', H, Dv + 1)
            Z = retention(ones, ones, v1, gamma, "chunkwise", chunk_size=64)[0][:, keep]
        c = paper_decay_norm(n, gamma)[..., None]  # (N, T', H, 1)
        for b in biases:
            total = (A + b[:, None] * Z)[None]  # (1, N, T', H, Dv + 1)
            if sink_qk is not None:
                total = total + (sinks.view(-1, 1, 1, 1) * (b + sink_qk))[..., None] * sink_kv  # (W, ...)
            o = total[..., :Dv]
            if window:  # in the window's units exp(q.k - shift): the linear part scaled by e^-(shift + b)
                o = combine_window(soft, shift + b[:, None], total)
            elif cfg.retention_normalization == "paper":
                o = o / torch.maximum(total[..., Dv:].abs(), c)
            _, err, _ = _fit_scale(layer.head_norm(o, affine=False), y_kept)  # (W, H)
            err, w = err.min(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {"gamma": torch.where(better, gamma, best["gamma"]), "bias": torch.where(better, b, best["bias"]),
                    "sink": torch.where(better, sinks[w], best["sink"])}

    def as_fit(gamma, bias, sink):  # scale and error are filled in below
        return LayerFit(gamma=gamma.tolist(), score_bias=bias.tolist() if cfg.score_bias else [],
                        sink_weight=sink.tolist() if cfg.attention_sink else [], scale=[], rel_error=0.0)

    fit = as_fit(best["gamma"], best["bias"], best["sink"])
    before = {name: t.clone() for name, t in layer.state_dict().items() if name in FITTED}
    apply_fit(layer, fit)
    scale, err, yy = layer_error(layer, q, k, v, pos, y)
    if err.sum() > start[1].sum():  # the grid missed the current setting: keep it
        layer.load_state_dict(before, strict=False)
        scale, err, yy = start
        fit = as_fit(layer.gamma, getattr(layer, "score_bias", None), getattr(layer, "sink_weight", None))
    fit.scale = scale.tolist()
    fit.rel_error = float(err.sum() / yy.sum().clamp_min(1e-12))
    fit.head_rel_error = (err / yy.clamp_min(1e-12)).tolist()
    return fit


@torch.no_grad()
def apply_fit(layer, fit: LayerFit):
    """Write a LayerFit into the student layer's parameters."""
    gamma = torch.tensor(fit.gamma, dtype=torch.float64).clamp(1e-6, 1 - 1e-9)
    layer.decay_logit.copy_(torch.logit(gamma).to(layer.decay_logit.dtype))
    if fit.score_bias:
        layer.score_bias.copy_(torch.tensor(fit.score_bias))
    if fit.sink_weight:
        layer.sink_weight.copy_(torch.tensor(fit.sink_weight))
    if fit.scale and hasattr(layer, "head_norm_weight"):
        scale = torch.tensor(fit.scale, dtype=layer.head_norm_weight.dtype)
        layer.head_norm_weight.copy_(scale.repeat_interleave(layer.v_dim))


def fit_position_table(input_ids: torch.Tensor, config, log=print) -> torch.Tensor:
    """(N, T) calibration rows -> (N * (T // L), L) when the model reads positions from a learned
    table of L entries and T > L (the tail of each row that fills no piece is dropped); else as is."""
    N, T = input_ids.shape
    limit = config.max_position_embeddings if config.learned_position_embeddings else T
    if T <= limit:
        return input_ids
    log(f"  calibration rows of {T} tokens cut into rows of {limit}: the teacher's learned position table "
        f"has {limit} entries (--calib-seq-len {limit} asks for that length directly)")
    return input_ids[:, : T // limit * limit].reshape(-1, limit)


@torch.no_grad()
def calibrate(student, teacher, family: Family, input_ids: torch.Tensor, fit_decay: bool, fit_bias: bool,
              log=print) -> List[LayerFit]:
    """Fit every retention layer of `student` to `teacher` on `input_ids` (N, T). Rows longer
    than a learned position table (GPT-2's `n_positions`) are cut into rows that fit it."""
    input_ids = fit_position_table(input_ids, student.config, log)
    layer_inputs, attn_outputs = capture_teacher(teacher, family, input_ids)
    fits = []
    for i, block in enumerate(student.model.layers):
        weight = block.retention.q_proj.weight  # the input norm may be an identity (post-norm blocks)
        x = block.input_layernorm(layer_inputs[i].to(weight.device, weight.dtype)).float()
        fit = fit_layer(block.retention.float(), x, attn_outputs[i].to(weight.device), fit_decay, fit_bias)
        apply_fit(block.retention, fit)
        fits.append(fit)
        log(f"  layer {i:2d}: relative error {fit.rel_error:.3f}, median gamma "
            f"{sorted(fit.gamma)[len(fit.gamma) // 2]:.4f}")
    return fits
