"""Stage 1, attention transfer: every student retention layer learns to reproduce its teacher
layer's attention output (after the output projection) from the teacher's own layer input.

Layer-local, as in LoLCATs (Zhang et al., 2024) and RADLADS/MOHAWK's hidden-state alignment:
one no-grad teacher pass per batch yields, for all layers at once, the input of each layer
(`hidden_states[i]`) and its attention output (a forward hook on `Family.attention_output`,
o_proj in Llama). Each student layer i then runs only `input_layernorm` (frozen) and its
retention module on `hidden_states[i]`, and regresses the captured output with a relative
MSE. The layers never see each other's outputs, so the gradient of the mean over layers is
the sum of independent per-layer gradients: each layer is backpropagated as soon as its loss
exists, and only one layer's graph is alive at a time.

What trains (`stage1.train`): the whole attention path of every layer, i.e. every parameter of
the retention module (q, k, v, o, the gate, and whatever retention adds: decay, score bias,
sink, head norm, window weights...), either

  * "full": all of them, the projections at `stage1.proj_lr`, the rest at `stage1.lr`; or
  * "lora": a low-rank delta (`LowRankDelta`, rank `stage1.lora_rank`) on every linear map of
    the module at `stage1.proj_lr`, the non-linear parameters fully at `stage1.lr`; the deltas
    are merged into the weights when the stage ends.

Nothing here names a particular parameter, so a retention variant with extra parameters (a
softmax window, say) is trained the same way.
"""

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

from retconvert.distill.engine import TrainingDiverged
from retconvert.distill.losses import attention_transfer_loss
from retconvert.distill.models import LowRankDelta


def has_attention_path(student: nn.Module) -> bool:
    """True for a RetNet student (`model.layers[i].retention`), which stage 1 can train."""
    layers = getattr(getattr(student, "model", None), "layers", None)
    return layers is not None and len(layers) > 0 and hasattr(layers[0], "retention")


class AttentionPath:
    """The trainable attention path of a student (adapters inserted for "lora"), its optimizer
    and scheduler, and checkpoint save/load in the interface `CheckpointManager` expects.

    Args:
        student: a RetNet student; frozen here except for the attention path.
        train: "full" or "lora".
        lr: learning rate of the non-linear retention parameters (decay, bias, sink, norm...).
        proj_lr: learning rate of the linear maps (full weights or their low-rank deltas).
        lora_rank: rank of the deltas for "lora".
        warmup_steps: linear warmup of both learning rates, then constant.
        generator: draws the adapters' A matrices (B starts at zero, so nothing changes at step 0).
    """

    def __init__(self, student: nn.Module, train: str, lr: float, proj_lr: float, lora_rank: int,
                 warmup_steps: int, generator: torch.Generator):
        if train not in ("full", "lora"):
            raise ValueError(f"train must be 'full' or 'lora', got {train!r}")
        self.module = student
        self.deltas: List[Tuple[nn.Module, str, LowRankDelta]] = []
        student.requires_grad_(False)
        own, proj = [], []
        for block in student.model.layers:
            attn = block.retention
            linears = [(name, m) for name, m in attn.named_children() if isinstance(m, nn.Linear)]
            linear_params = {id(p) for _, m in linears for p in m.parameters()}
            own += [p for p in attn.parameters() if id(p) not in linear_params]
            if train == "full":
                proj += [p for _, m in linears for p in m.parameters()]
            else:
                for name, m in linears:
                    delta = LowRankDelta(m, lora_rank, generator).to(m.weight.device)
                    setattr(attn, name, delta)
                    self.deltas.append((attn, name, delta))
                    proj += [delta.A, delta.B]
        self.params = own + proj
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam([{"params": own, "lr": lr}, {"params": proj, "lr": proj_lr}])
        warm = max(1, warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warm))
        self.trainable = sum(p.numel() for p in self.params)

    def step(self):
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> nn.Module:
        """Merge the adapters into the weights, unfreeze the student; returns it."""
        for module, name, delta in self.deltas:
            setattr(module, name, delta.merge())
        self.deltas = []
        return self.module.requires_grad_(True)

    # CheckpointManager interface -------------------------------------------------------------
    def save(self, folder, is_main: bool):
        if is_main:
            torch.save(self.module.state_dict(), folder / "model.pt")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load(self, folder):
        self.module.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))


class TeacherTargets:
    """One no-grad teacher pass -> (layer inputs, attention outputs) for every layer.

    `__call__(ids)` returns `inputs` (L tensors (B, T, C): the residual stream entering layer
    i, before its input norm) and `outputs` (L tensors (B, T, C): the attention module's output
    after its output projection), both float32. The language-model head is not run.
    Use as a context manager: the hooks are removed on exit.
    """

    def __init__(self, teacher: nn.Module, family):
        self.teacher = teacher
        self.captured: Dict[int, torch.Tensor] = {}
        n = teacher.config.num_hidden_layers
        self.hooks = [teacher.get_submodule(family.attention_output.format(i=i)).register_forward_hook(
            lambda _m, _args, out, i=i: self.captured.__setitem__(i, out.float())) for i in range(n)]
        self.num_layers = n

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, autocast: bool = False) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """`ids` (B, T) -> (inputs, outputs), L float32 tensors (B, T, C) each; `autocast`: run
        the teacher under bf16 autocast (the targets are still returned in float32)."""
        self.captured.clear()
        body = self.teacher.base_model  # transformers: the model without its LM head
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = body(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        inputs = [h.float() for h in hidden[:self.num_layers]]
        outputs = [self.captured[i] for i in range(self.num_layers)]
        self.captured.clear()
        return inputs, outputs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def layer_errors(student: nn.Module, inputs: List[torch.Tensor], outputs: List[torch.Tensor],
                 backward_scale: float = 0.0, autocast: bool = False) -> List[float]:
    """Relative MSE of every student layer's attention output against the teacher's.

    With `backward_scale > 0` each layer's error times that scale is backpropagated right
    away (so one layer's graph is alive at a time); with 0 nothing is recorded for autograd.
    `autocast`: the retention modules run under bf16 autocast (the error is computed in
    float32, the parameters and their gradients stay float32). Returns the L errors as floats.
    """
    B, T = inputs[0].shape[:2]
    pos = torch.arange(T, device=inputs[0].device).expand(B, T)
    errors = []
    for block, x, target in zip(student.model.layers, inputs, outputs):
        with torch.no_grad():
            x = block.input_layernorm(x)
        with torch.set_grad_enabled(backward_scale > 0):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                out, _ = block.retention(x, pos, output_final_state=False)
            err = attention_transfer_loss(out, target)
            if backward_scale > 0:
                (err * backward_scale).backward()
        errors.append(err.item())
    return errors


def attention_transfer_step(path: AttentionPath, targets: TeacherTargets, ids: torch.Tensor,
                            autocast: bool = False) -> List[float]:
    """One stage-1 optimizer step, the one the recipe, the benchmarks and the tests share.

    `ids` (B, T): one teacher pass gives every layer's input and attention output; each student
    layer's relative error is backpropagated (scaled by 1/L, so the step follows the mean over
    layers), then `path` steps. `autocast`: teacher and retention under bf16 autocast
    (`run.dtype=bfloat16`); weights, gradients and Adam state stay float32.
    Returns the L per-layer errors (before the update).
    Raises TrainingDiverged when the mean error is NaN or inf (nothing is updated then).
    """
    inputs, outputs = targets(ids, autocast=autocast)
    errors = layer_errors(path.module, inputs, outputs, backward_scale=1.0 / len(inputs), autocast=autocast)
    mean = sum(errors) / len(errors)
    if not math.isfinite(mean):
        path.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"stage 1 mean layer error is {mean}")
    path.step()
    return errors
