"""Losses: logit distillation (KL with temperature, optionally mixed with next-token CE) and
the attention-transfer regression of stage 1."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossParts:
    loss: torch.Tensor  # what to backpropagate (sum or mean, see `reduction`)
    kl: torch.Tensor  # KL part, same reduction, T^2 included, before the (1 - alpha) weight
    ce: torch.Tensor  # cross-entropy part, same reduction, before the alpha weight
    tokens: torch.Tensor  # number of scored positions (a 0-d long tensor)


class DistillationLoss(nn.Module):
    r"""Token-level knowledge distillation for causal LMs.

        loss = alpha * CE(student, next token) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)

    where p^T = softmax(logits / T). The T^2 factor keeps the gradient scale of the KL term
    independent of T (Hinton et al., 2015). With no teacher (`teacher_logits` and
    `teacher_topk` both None) only the CE term is computed (alpha is taken as 1).

    Alignment follows transformers: `logits[:, t]` predicts `labels[:, t + 1]`; the shift
    happens here. A position is scored only where its target label is not -100, so padding
    and document boundaries are masked by the labels (see `data.make_labels`); whatever the
    student's or teacher's logits are at masked positions, the loss does not change.

    `reduction="sum"` returns sums over scored positions (divide by the global token count
    yourself, which makes gradient accumulation and data parallelism exact); "mean" divides
    by this batch's count.

    Top-k teacher (`teacher_topk=(values, indices, logsumexp)`, from the logit cache): the
    teacher's distribution is known exactly on its top-k tokens, p_i = exp(v_i / T - lse_T),
    and the rest is one *remainder bucket* with mass 1 - sum p_i. The student's distribution is
    coarsened the same way (its own probabilities on those k tokens plus the rest). The KL is
    taken between these two (k + 1)-bin distributions: a lower bound on the full KL (merging
    outcomes never increases a KL), exact when the teacher's tail and the student's tail are
    proportional; in practice close for k >= 32 since teacher tails carry little mass.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.0, reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.temperature, self.alpha, self.reduction = temperature, alpha, reduction

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None,
                teacher_topk: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> LossParts:
        T = self.temperature
        target = labels[:, 1:]
        mask = target != -100  # (B, T-1)
        tokens = mask.sum()
        s = student_logits[:, :-1][mask].float()  # (N, V): scored positions only
        zero = s.new_zeros(())
        has_teacher = teacher_logits is not None or teacher_topk is not None
        alpha = self.alpha if has_teacher else 1.0

        ce = F.cross_entropy(s, target[mask], reduction="sum") if alpha > 0 else zero
        kl = zero
        if has_teacher and alpha < 1:
            if teacher_logits is not None:
                kl = _full_kl(s, teacher_logits[:, :-1][mask].float(), T)
            else:
                values, indices, lse = (x[:, :-1][mask] for x in teacher_topk)
                log_q = F.log_softmax(s / T, dim=-1)
                log_p = values.float() / T - lse.float()[:, None]  # (N, k) exact teacher log-probs
                log_p_rest = _log1mexp(torch.logsumexp(log_p, -1))
                log_q_k = log_q.gather(-1, indices.long())
                log_q_rest = _log1mexp(torch.logsumexp(log_q_k, -1))
                kl = ((log_p.exp() * (log_p - log_q_k)).sum()
                      + (log_p_rest.exp() * (log_p_rest - log_q_rest)).sum())
            kl = kl * T * T
        loss = alpha * ce + (1 - alpha) * kl
        if self.reduction == "mean":
            n = tokens.clamp_min(1).to(loss.dtype)
            loss, kl, ce = loss / n, kl / n, ce / n
        return LossParts(loss=loss, kl=kl, ce=ce, tokens=tokens)


def _full_kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """sum over rows of KL(softmax(t/T) || softmax(s/T)) for (N, V) logits, in few passes.

    With p = softmax(t/T): KL = sum_i p_i (t_i - s_i) / T - lse(t/T) + lse(s/T), since the
    p_i sum to 1. The teacher side needs no gradient; the student side is one logsumexp and
    one row-wise dot product, instead of two log-softmaxes and three vocabulary-sized
    temporaries (their gradient is the same: (softmax(s/T) - p) / T).
    """
    with torch.no_grad():
        t_scaled = t / T
        lse_t = torch.logsumexp(t_scaled, -1)  # (N,)
        p = torch.exp(t_scaled - lse_t[:, None])  # (N, V)
        p_dot_t = torch.bmm(p.unsqueeze(1), t_scaled.unsqueeze(2)).view(-1)  # (N,)
    p_dot_s = torch.bmm(p.unsqueeze(1), s.unsqueeze(2)).view(-1) / T  # (N,)
    return (p_dot_t - lse_t - p_dot_s + torch.logsumexp(s / T, -1)).sum()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable; clamped so that an (almost) empty tail stays finite."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def attention_transfer_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Relative MSE ||s - t||^2 / ||t||^2 of one layer's retention output against the teacher's
    attention output (both (B, T, H*D), before the output projection): layers with larger
    activations do not dominate the sum over layers."""
    t = teacher_out.float()
    return (student_out.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
