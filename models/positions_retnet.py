"""Positions of a RetNet: rotary frequencies and rotation, the learned table's limit, and the
paper's decay normaliser. Shared by the model and its packed decoder.

This file travels inside every checkpoint (see `auto_map`): it imports only torch,
transformers and its sibling files, never retconvert.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .configuration_retnet import RetNetConfig

def rotary_inv_freq(config: RetNetConfig, device=None, layer_idx: Optional[int] = None) -> torch.Tensor:
    """Rotation frequencies (Dk/2,) of one layer (`config.layer_rope`; default the global RoPE),
    computed on the fly (no buffers to go stale on load). With `partial_rotary_factor` f < 1
    the first f * Dk/2 pairs turn at the frequencies of a rotary over f * Dk channels, the rest not."""
    d = config.qk_head_dim
    theta, scaling = config.layer_rotary(layer_idx)
    if config.position_embedding_type == "xpos":  # torchscale / paper schedule
        return 1.0 / (theta ** torch.linspace(0, 1, d // 2, device=device, dtype=torch.float32))
    d_rot = round(d * config.partial_rotary_factor)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_rot, 2, device=device, dtype=torch.float32) / d_rot))
    return F.pad(_scaled(inv_freq, scaling), (0, (d - d_rot) // 2))  # unrotated pairs: frequency 0


def _scaled(inv_freq: torch.Tensor, scaling: Optional[dict]) -> torch.Tensor:
    """RoPE scaling (linear or llama3) applied to frequencies."""
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, smooth in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, config: RetNetConfig,
                 layer_idx: Optional[int] = None):
    """Rotate q and k (B, T, H, D) by angle position * freq; the angles are computed once for both."""
    cos, sin = _cos_sin(position_ids, config, layer_idx, q)
    return _rotate(q, cos, sin, config), _rotate(k, cos, sin, config)


def rotate(x: torch.Tensor, position_ids: torch.Tensor, config: RetNetConfig, layer_idx: Optional[int] = None):
    """Rotate one tensor x (B, T, H, D) by angle position * freq (`apply_rotary` for one side)."""
    return _rotate(x, *_cos_sin(position_ids, config, layer_idx, x), config)


def _cos_sin(position_ids, config, layer_idx, like):
    """cos and sin (B, T, 1, D) of the angles position * freq, in `like`'s dtype."""
    angles = position_ids.float()[..., None] * rotary_inv_freq(config, like.device, layer_idx)  # (B, T, D/2)
    if config.position_embedding_type == "xpos":  # interleaved pairs (x0, x1), (x2, x3), ...
        angles = angles.repeat_interleave(2, -1)
    else:  # halves (x[:D/2], x[D/2:]), as Llama
        angles = torch.cat((angles, angles), -1)
    return angles.cos()[:, :, None].to(like.dtype), angles.sin()[:, :, None].to(like.dtype)


def _rotate(x, cos, sin, config):
    if config.position_embedding_type == "xpos":
        turned = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin


def check_position_table(last_position: int, config: RetNetConfig):
    """A learned position table (GPT-2's `n_positions`) has `max_position_embeddings` rows:
    ValueError naming that limit when `last_position` (counted from 0) is past it."""
    limit = config.max_position_embeddings
    if last_position >= limit:
        raise ValueError(f"position {last_position} is past this model's learned position table "
                         f"(max_position_embeddings={limit}): a row holds at most {limit} tokens; "
                         f"shorten the input or generate fewer tokens")


def paper_decay_norm(n: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """c_n = sqrt(sum_{j<=n} gamma^j), the paper's decay normaliser, for positions n (..., 1) and
    per-head decays gamma (H,): (..., H). Computed in fp32 as (1 - gamma^(n+1)) / (1 - gamma)."""
    log_g = gamma.float().log()
    return torch.sqrt(-torch.expm1((n.float() + 1) * log_g) / -torch.expm1(log_g))
