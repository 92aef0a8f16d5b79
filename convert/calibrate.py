"""Fit what retention adds (decay, score bias, output scale) to the teacher's own attention.

For each layer, on calibration text:
  1. run the teacher once, keeping each layer's input (hidden state) and its attention
     output (the input of its output projection);
  2. project that input with the student's (identical) q/k/v weights;
  3. for every head, search decays gamma and score biases b (coordinate-wise over two
     grids) for the pair whose retention output, after the least-squares per-head scale,
     is closest to the attention output; that scale becomes the head's output scale.

Layer-local and closed-form per candidate: all candidates of a grid run at once as extra
heads, so a layer costs a few retention passes over the calibration text.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from retconvert.convert.families import Family

# Candidate decays: effective memory 1/(1-gamma) from 2 to 8192 tokens, log-spaced.
GAMMA_GRID = [1.0 - 2.0 ** (-e) for e in (1, 2, 3, 4, 5, 5.5, 6, 6.5, 7, 8, 9, 10, 11, 13)]
# Candidate score biases b (scores b + q.k / sqrt(d)); b = 1 is exp's first-order Taylor expansion.
BIAS_GRID = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 32.0]
# Candidate sink weights w (sink score w * (b + q.k_sink)); 0 switches the sink off.
SINK_GRID = [0.0, 0.5, 2.0, 8.0, 32.0, 128.0, 512.0]


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

    o, y: (..., H, D). Returns scale (H,), error (H,), ||y||^2 (H,).
    """
    dims = tuple(range(o.dim() - 2)) + (o.dim() - 1,)
    oy, oo, yy = (o * y).sum(dims), (o * o).sum(dims), (y * y).sum(dims)
    scale = oy / oo.clamp_min(1e-12)
    return scale, (yy - scale * oy).clamp_min(0), yy


def _evaluate(layer, q, k, v, pos, y, cands: Dict[str, torch.Tensor]):
    """Error of G candidate settings at once, run as G groups of H heads.

    cands: "gamma", and "bias" / "sink" where the layer has them, each (G, H). Returns per
    candidate and head the least-squares output scale and the remaining error, each (G, H),
    and ||y||^2 (H,).
    """
    N, T, H, Dv = y.shape
    G = cands["gamma"].shape[0]
    qg, kg, vg = (t.repeat(1, 1, G, 1) for t in (q, k, v))  # (N, T, G*H, D)
    flat = {name: c.flatten() for name, c in cands.items()}
    o, _ = layer.retain(qg, kg, vg, pos, gamma=flat["gamma"], score_bias=flat.get("bias"),
                        sink_weight=flat.get("sink"))
    o = layer.head_norm(o, affine=False).view(N, T, G, H, Dv)
    fits = [_fit_scale(o[:, :, g], y) for g in range(G)]
    scale, err = torch.stack([f[0] for f in fits]), torch.stack([f[1] for f in fits])
    return scale, err, fits[0][2]


@torch.no_grad()
def fit_layer(layer, x: torch.Tensor, y: torch.Tensor, fit_decay: bool, fit_bias: bool, rounds: int = 2) -> LayerFit:
    """Choose gamma, b, the sink and the output scale of every head of one retention layer.

    x: the layer's normalised input (N, T, C); y: the teacher's attention output (N, T, H*Dv).
    Coordinate search: each parameter in turn over its grid with the others fixed, `rounds`
    times; a head's current value is always among the candidates, so the error never rises.
    The sink key/value start as the teacher's own first-token key/value (averaged).
    """
    cfg = layer.config
    N, T, _ = x.shape
    H, Dv = layer.num_heads, layer.v_dim
    pos = torch.arange(T, device=x.device).expand(N, T)
    q, k, v = layer.project(x, pos)  # (N, T, H, D)
    y = y.view(N, T, H, Dv)

    current = {"gamma": layer.gamma.detach().float().clone()}
    grids = {"gamma": GAMMA_GRID} if fit_decay else {}
    if cfg.score_bias:
        current["bias"] = layer.score_bias.detach().float().clone()
        if fit_bias:
            grids["bias"] = BIAS_GRID
    if cfg.attention_sink:
        layer.sink_key.copy_(k[:, 0].mean(0))  # (H, Dk): position 0 is unrotated
        layer.sink_value.copy_(v[:, 0].mean(0))
        current["sink"] = layer.sink_weight.detach().float().clone()
        grids["sink"] = SINK_GRID

    heads = torch.arange(H, device=x.device)
    for _ in range(rounds):
        for name, values in grids.items():
            grid = torch.tensor(values, device=x.device, dtype=torch.float32)[:, None].expand(-1, H)
            trial = torch.cat([current[name][None], grid])  # (G, H), the current value first
            cands = {n: (trial if n == name else c[None].expand_as(trial)) for n, c in current.items()}
            _, err, _ = _evaluate(layer, q, k, v, pos, y, cands)
            current[name] = trial[err.argmin(0), heads].clone()

    scale, err, yy = _evaluate(layer, q, k, v, pos, y, {n: c[None] for n, c in current.items()})
    return LayerFit(
        gamma=current["gamma"].tolist(),
        score_bias=current["bias"].tolist() if "bias" in current else [],
        sink_weight=current["sink"].tolist() if "sink" in current else [],
        scale=scale[0].tolist(),
        rel_error=float(err[0].sum() / yy.sum().clamp_min(1e-12)),
        head_rel_error=(err[0] / yy.clamp_min(1e-12)).tolist(),
    )


@torch.no_grad()
def apply_fit(layer, fit: LayerFit):
    """Write a LayerFit into the student layer's parameters."""
    gamma = torch.tensor(fit.gamma, dtype=torch.float64).clamp(1e-6, 1 - 1e-9)
    layer.decay_logit.copy_(torch.logit(gamma).to(layer.decay_logit.dtype))
    if fit.score_bias:
        layer.score_bias.copy_(torch.tensor(fit.score_bias))
    if fit.sink_weight:
        layer.sink_weight.copy_(torch.tensor(fit.sink_weight))
    if hasattr(layer, "head_norm_weight"):
        scale = torch.tensor(fit.scale, dtype=layer.head_norm_weight.dtype)
        layer.head_norm_weight.copy_(scale.repeat_interleave(layer.v_dim))


@torch.no_grad()
def calibrate(student, teacher, family: Family, input_ids: torch.Tensor, fit_decay: bool, fit_bias: bool,
              log=print) -> List[LayerFit]:
    """Fit every retention layer of `student` to `teacher` on `input_ids` (N, T)."""
    layer_inputs, attn_outputs = capture_teacher(teacher, family, input_ids)
    fits = []
    for i, block in enumerate(student.model.layers):
        dev = block.input_layernorm.weight.device
        x = block.input_layernorm(layer_inputs[i].to(dev, block.input_layernorm.weight.dtype)).float()
        fit = fit_layer(block.retention.float(), x, attn_outputs[i].to(dev), fit_decay, fit_bias)
        apply_fit(block.retention, fit)
        fits.append(fit)
        log(f"  layer {i:2d}: relative error {fit.rel_error:.3f}, median gamma "
            f"{sorted(fit.gamma)[len(fit.gamma) // 2]:.4f}")
    return fits
