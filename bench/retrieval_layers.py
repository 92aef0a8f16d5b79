"""Retrieval layers: can a few full-softmax layers give a windowed student its passkey back?

A windowed student (`--window 64`) sees the last W tokens exactly and everything older only
through the decayed state, and retrieves no passkey beyond its window. Hybrid models keep a few
layers of full attention for that. This benchmark asks which layers, and what they buy:

1. It ranks the teacher's layers by retrieval: on passkey prompts (the eval suite's own,
   `retconvert.eval.longrange.passkey_prompt`) it measures, per layer and head, the attention
   weight that the prompt's last position (the one that predicts the key) puts on the key
   sentence, and scores each layer by its best head ("retrieval heads", Wu et al. 2024,
   arXiv 2404.15574).
2. For the student and each set of layers (none; each of the top layers alone; the top 2, 4, ...
   together) it widens those layers' windows to the whole prompt (exact softmax over every
   earlier token, the decayed part then covering nothing) and runs the eval suite's passkey test
   and per-position loss. No weight changes: the window adds no parameter.

    .venv/bin/python bench/retrieval_layers.py --student ~/runs/exports/w64-latest \\
        --out docs/bench/retrieval_layers.json

Not a test: it loads the real SmolLM2 teacher and a trained student (minutes on one core).
"""

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_run_header, emit_result, int_list, log  # noqa: E402

from retconvert.eval.longrange import passkey, passkey_prompt, position_loss  # noqa: E402
from retconvert.eval.models import load_model  # noqa: E402


@torch.no_grad()
def teacher_retrieval_scores(m, length: int, trials: int, seed: int) -> torch.Tensor:
    """Attention weight of the last position on the key sentence, averaged over `trials` prompts
    of `length` tokens: (layers, heads), each entry in [0, 1]."""
    original = m.model.config._attn_implementation
    m.model.set_attn_implementation("eager")  # output_attentions needs the explicit weights
    rng = random.Random(seed)
    total = None
    for t in range(trials):
        p = passkey_prompt(m.tokenizer, length, t, trials, rng)
        if p is None:
            raise SystemExit(f"--score-length {length} cannot hold a passkey prompt; give 256 or more")
        ids = torch.tensor([p.ids], device=m.device)
        attn = m.model(input_ids=ids, output_attentions=True, use_cache=False).attentions  # L x (1, H, T, T)
        s, e = p.key_span
        mass = torch.stack([a[0, :, -1, s:e].sum(-1).float().cpu() for a in attn])  # (L, H)
        total = mass if total is None else total + mass
    m.model.set_attn_implementation(original)
    return total / trials


def layer_sets(ranked: List[int], singles: int, groups: List[int]) -> List[List[int]]:
    """[] (the student as trained), each of the first `singles` layers alone, then the first g
    layers together for each g in `groups`."""
    sets = [[]] + [[i] for i in ranked[:singles]] + [sorted(ranked[:g]) for g in groups if g > 1]
    out = []
    for s in sets:
        if s not in out:
            out.append(s)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--student", required=True, help="a windowed student folder (retention_window > 0)")
    ap.add_argument("--score-length", type=int, default=1024, help="passkey prompt length for the teacher's scores")
    ap.add_argument("--score-trials", type=int, default=5)
    ap.add_argument("--singles", type=int, default=4, help="how many top layers to try alone")
    ap.add_argument("--groups", type=int_list, default=[2, 4], help="sizes of the top-layer groups to try")
    ap.add_argument("--layers", type=int_list, default=None,
                    help="try these layers (alone and together) instead of the teacher's ranking")
    ap.add_argument("--lengths", type=int_list, default=[512, 1024, 2048], help="passkey prompt lengths")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--position-length", type=int, default=2048, help="row length of the per-position loss")
    ap.add_argument("--position-docs", type=int, default=2, help="rows of the per-position loss (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result: Dict = cpu_run_header("retrieval_layers", args)

    student = load_model(args.student, "student")
    original = student.model.config.retention_window
    windows = student.model.config.layer_windows
    if not any(windows):
        raise SystemExit(f"{args.student} is a pure RetNet (retention_window 0); give a windowed student")
    n_layers = len(windows)

    if args.layers is None:
        teacher = load_model(args.teacher, "teacher")
        t0 = time.perf_counter()
        scores = teacher_retrieval_scores(teacher, args.score_length, args.score_trials, seed=0)
        best = scores.max(-1)
        ranked = best.values.argsort(descending=True).tolist()
        result["teacher_scores"] = {
            "prompt_tokens": args.score_length, "trials": args.score_trials, "seconds": time.perf_counter() - t0,
            "per_layer_best_head": [round(float(v), 4) for v in best.values],
            "per_layer_best_head_index": best.indices.tolist(),
            "per_layer_head": [[round(float(v), 4) for v in row] for row in scores],
            "ranked_layers": ranked,
            "unit": "attention weight of the last prompt position on the key sentence, mean over trials"}
        log("teacher layers by retrieval (best head's weight on the key): " +
            ", ".join(f"{i}:{float(best.values[i]):.3f}" for i in ranked[:8]))
        del teacher
        sets = layer_sets(ranked, args.singles, args.groups)
    else:
        bad = [i for i in args.layers if not 0 <= i < n_layers]
        if bad:
            raise SystemExit(f"--layers {bad} out of range; the student has layers 0..{n_layers - 1}")
        sets = layer_sets(args.layers, len(args.layers), [len(args.layers)])

    full = max(max(args.lengths) + 16, args.position_length)  # every earlier token inside the window
    cases = []
    for layers in sets:
        student.model.config.retention_window = [full if i in layers else w for i, w in enumerate(windows)]
        tag = ",".join(map(str, layers)) or "none"
        log(f"full-softmax layers: {tag}")
        t0 = time.perf_counter()
        case = {"full_layers": layers, "full_window": full,
                "passkey": passkey(student, args.lengths, args.trials, log=log)}
        if args.position_docs:
            case["position_loss"] = position_loss(student, args.position_length, args.position_docs, log=log)
        case["seconds"] = round(time.perf_counter() - t0, 1)
        cases.append(case)
        acc = " ".join(f"{p['context_tokens']}:{p['accuracy']:.1f}" for p in case["passkey"]["points"])
        far = case.get("position_loss", {}).get("buckets", [{}])[-1].get("nll")
        log(f"  passkey {acc}; last-bucket loss {far}")
    student.model.config.retention_window = original
    result["student"] = {"path": args.student, "windows": windows}
    result["cases"] = cases
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
