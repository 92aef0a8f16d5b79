"""How well-conditioned is a student's gradient? bf16 autocast vs fp32, and fp32 under tiny noise.

On one real row of held-out C4, the language-modelling (CE) gradient of every parameter:

1. `dtype`: under bf16 autocast against fp32, for the student and for its teacher (the same
   row): total gradient norm and the median relative error of the weight matrices' gradients.
2. `noise`: the student in fp32 with every weight multiplied by (1 + s * N(0, 1)), s = 1e-6,
   1e-4 and 2^-9 (bf16's rounding), against the unperturbed fp32 gradient. If a 1e-4 noise
   already moves the gradient as much as bf16 does, bf16 is not what is wrong.
3. `fp32_layers`: bf16 autocast again, with the blocks of each `--fp32-layers` range kept in
   fp32 (autocast switched off inside them): where the bf16 error enters.
4. `amplification`: per layer, how much that 1e-4 noise changes each position's hidden state
   (relative), median and the largest three positions; and the per-position norm of the
   gradient at the input embeddings (median and largest), which shows whether a few tokens
   carry the gradient.

    python bench/grad_sensitivity.py --student ~/runs/smollm2-student-init --tokens 1024 \
        --out docs/bench/grad_sensitivity.json

Writes JSON (figures in docs/RESULTS.md, "bf16 and the student's gradients").
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, log, machine_info, run_header  # noqa: E402

from retconvert.convert.sources import load_teacher  # noqa: E402
from retconvert.distill.data import eval_token_ids  # noqa: E402
from retconvert.models.modeling_retnet import RetNetForCausalLM  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="a converted or distilled RetNet checkpoint folder")
    p.add_argument("--teacher", default="smollm2-135m", help="its teacher (built-in name, folder, GGUF)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/c4/c4_heldout.jsonl"))
    p.add_argument("--tokens", type=int, default=1024, help="length of the row")
    p.add_argument("--fp32-layers", default="0-14,15-29,0-7,8-14",
                   help="comma-separated inclusive ranges of blocks to keep in fp32 under autocast")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def ce_gradients(model, ids, autocast=False, inputs_embeds=None):
    """CE loss and {name: gradient} of one forward + backward (bf16 autocast if asked)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if inputs_embeds is None:
            out = model(input_ids=ids, labels=ids)
        else:
            out = model(inputs_embeds=inputs_embeds, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(want, got):
    """Total norms and the median / max relative error over the weight matrices' gradients."""
    def total(grads):
        return torch.stack([v.norm() for v in grads.values()]).norm().item()

    errors = sorted(((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)).item()
                    for n in want if want[n].dim() == 2)
    return {"total_norm_reference": total(want), "total_norm": total(got),
            "median_rel_error_matrices": errors[len(errors) // 2], "max_rel_error_matrices": errors[-1]}


class Fp32Blocks:
    """Within the `with`, the given blocks run with autocast off (their inputs, the residual
    stream, are fp32 already): forward pre-hooks enter a disabled autocast, forward hooks leave it."""

    def __init__(self, blocks):
        self.blocks, self.handles, self.contexts = blocks, [], []

    def _enter(self, *_):
        self.contexts.append(torch.autocast("cpu", enabled=False))
        self.contexts[-1].__enter__()

    def _exit(self, *_):
        self.contexts.pop().__exit__(None, None, None)

    def __enter__(self):
        for block in self.blocks:
            self.handles += [block.register_forward_pre_hook(self._enter), block.register_forward_hook(self._exit)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def perturbed(folder, scale, seed=0):
    model = RetNetForCausalLM.from_pretrained(folder).float()
    if scale:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + scale * torch.randn_like(p))
    return model


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {**run_header("grad_sensitivity", argv), "machine": machine_info(), "args": vars(args)}
    student = perturbed(args.student, 0.0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    ids = torch.tensor([next(iter(eval_token_ids([args.data], tokenizer, args.tokens).values()))])  # (1, T)

    log("1. bf16 autocast vs fp32")
    loss32, g32 = ce_gradients(student, ids)
    loss16, g16 = ce_gradients(student, ids, autocast=True)
    result["dtype"] = {"student": {"loss_fp32": loss32, "loss_bf16": loss16, **compare(g32, g16)}}
    teacher = load_teacher(args.teacher).model.float().requires_grad_(True)
    t32, tg32 = ce_gradients(teacher, ids)
    t16, tg16 = ce_gradients(teacher, ids, autocast=True)
    result["dtype"]["teacher"] = {"loss_fp32": t32, "loss_bf16": t16, **compare(tg32, tg16)}
    del teacher, tg32, tg16, g16

    result["fp32_layers"] = {}
    for spec in args.fp32_layers.split(","):
        first, last = map(int, spec.split("-"))
        with Fp32Blocks(student.model.layers[first:last + 1]):
            _, g = ce_gradients(student, ids, autocast=True)
        result["fp32_layers"][spec] = compare(g32, g)

    log("2. fp32 under weight noise")
    result["noise"] = {}
    for scale in (1e-6, 1e-4, 2.0**-9):
        _, g = ce_gradients(perturbed(args.student, scale), ids)
        result["noise"][f"{scale:g}"] = compare(g32, g)

    log("3. amplification per layer and position")
    hidden, grads = [], []
    for scale in (0.0, 1e-4):
        model = perturbed(args.student, scale)
        embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=ids, output_hidden_states=True)
        out.loss.backward()
        hidden.append([h.detach()[0] for h in out.hidden_states])
        grads.append(embeds.grad[0].norm(dim=-1))  # (T,)
    layers = []
    for i, (a, b) in enumerate(zip(*hidden)):
        change = (b - a).norm(dim=-1) / a.norm(dim=-1)  # (T,)
        top = change.topk(3)
        layers.append({"hidden_state": i, "median": change.median().item(),
                       "top": [[int(t), v] for v, t in zip(top.values.tolist(), top.indices.tolist())]})
    g0 = grads[0]
    result["amplification"] = {"layers": layers, "input_grad_norm_median": g0.median().item(),
                               "input_grad_norm_max": g0.max().item(), "input_grad_norm_argmax": int(g0.argmax())}
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
