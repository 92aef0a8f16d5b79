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
        rows = mask.nonzero(as_tuple=True)  # (batch, position) of every scored position
        has_teacher = teacher_logits is not None or teacher_topk is not None
        alpha = self.alpha if has_teacher else 1.0
        full_kl = teacher_logits is not None and alpha < 1
        kl = ce = student_logits.new_zeros((), dtype=torch.float32)
        if full_kl or alpha > 0:  # not for a pure top-k KL: its rows are gathered below
            kl, ce = _BlockwiseKLAndCE.apply(student_logits, teacher_logits if full_kl else None, rows,
                                             target[rows], T, full_kl, alpha > 0)
        if teacher_topk is not None and teacher_logits is None and alpha < 1:
            s = student_logits[rows].float()  # (N, V): scored positions only
            values, indices, lse = (x[rows] for x in teacher_topk)
            log_q = F.log_softmax(s / T, dim=-1)
            log_p = values.float() / T - lse.float()[:, None]  # (N, k) exact teacher log-probs
            log_p_rest = _log1mexp(torch.logsumexp(log_p, -1))
            log_q_k = log_q.gather(-1, indices.long())
            log_q_rest = _log1mexp(torch.logsumexp(log_q_k, -1))
            kl = ((log_p.exp() * (log_p - log_q_k)).sum()
                  + (log_p_rest.exp() * (log_p_rest - log_q_rest)).sum()) * T * T
        loss = alpha * ce + (1 - alpha) * kl
        if self.reduction == "mean":
            n = tokens.clamp_min(1).to(loss.dtype)
            loss, kl, ce = loss / n, kl / n, ce / n
        return LossParts(loss=loss, kl=kl, ce=ce, tokens=tokens)


class _BlockwiseKLAndCE(torch.autograd.Function):
    """Sums over the scored rows of T^2 * KL(softmax(t/T) || softmax(s/T)) and of CE(s, y),
    for logits s (B, L, V) (and t) at the positions `rows` = (batch, position) indices.

    Each is a few passes over vocabulary-sized rows. Written with whole-batch tensor ops they
    allocate a dozen (N, V) temporaries (200 MB each for 1,024 rows of a 49k vocabulary),
    which cost more in page faults and memory traffic than the arithmetic; here rows go
    through in blocks whose temporaries stay in cache. The forward keeps nothing but the
    inputs; the backward recomputes the softmaxes block by block and writes the gradient
    once: T (softmax(s/T) - softmax(t/T)) for the KL term, softmax(s) - onehot(y) for CE.
    """

    BLOCK = 16  # rows per block: ~3 MB per fp32 temporary at a 49k vocabulary

    @staticmethod
    def forward(ctx, s, t, rows, targets, T: float, want_kl: bool, want_ce: bool):
        ctx.save_for_backward(s, t, *rows, targets)
        ctx.T, ctx.want_kl, ctx.want_ce = T, want_kl, want_ce
        kl, ce = s.new_zeros((), dtype=torch.float32), s.new_zeros((), dtype=torch.float32)
        for idx, y in _blocks(rows, targets, _BlockwiseKLAndCE.BLOCK):
            s_b = s[idx].float()  # (n, V)
            if want_kl:
                log_q = F.log_softmax(s_b / T, -1)
                log_p = F.log_softmax(t[idx].float() / T, -1)
                kl += (log_p.exp() * (log_p - log_q)).sum()
            if want_ce:
                ce += F.cross_entropy(s_b, y, reduction="sum")
        return kl * T * T, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        s, t, *rows, targets = ctx.saved_tensors
        T = ctx.T
        grad = torch.zeros_like(s)
        for idx, y in _blocks(rows, targets, _BlockwiseKLAndCE.BLOCK):
            s_b = s[idx].float()
            g = torch.zeros_like(s_b)
            if ctx.want_kl:
                g += (torch.softmax(s_b / T, -1) - torch.softmax(t[idx].float() / T, -1)) * (g_kl * T)
            if ctx.want_ce:
                q = torch.softmax(s_b, -1)
                q[torch.arange(len(y)), y] -= 1
                g += q * g_ce
            grad[idx] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


def _blocks(rows, targets, size: int):
    """((batch, position) index tensors, targets) of consecutive blocks of `size` scored rows."""
    for i in range(0, len(targets), size):
        yield tuple(r[i:i + size] for r in rows), targets[i:i + size]


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
