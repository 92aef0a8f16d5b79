"""Held-out perplexity of a run's latest stage-1 checkpoint, by the run's own eval protocol.

Stage 2 evaluates the student at its start, but only once stage 1 has stopped; this measures a
stage-1 checkpoint while the run goes on (read-only: it loads `checkpoints-stage1/latest`).

    python bench/stage1_ppl.py ~/runs/smollm2-pure --student ~/runs/smollm2-student-init \
        --config configs/distill/smollm2-135m-long.yaml --out docs/bench/stage1_ppl_pure.json

Writes JSON: the checkpoint's step and tokens, and the perplexity on every `data.eval` source
(its first `data.eval_tokens` tokens, window `data.eval_window`, stride `data.eval_stride`).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, log, machine_info, run_header  # noqa: E402

from retconvert.distill.config import load_config  # noqa: E402
from retconvert.distill.data import eval_token_ids  # noqa: E402
from retconvert.eval.perplexity import perplexity  # noqa: E402
from retconvert.models.modeling_retnet import RetNetForCausalLM  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run's out_dir (holds checkpoints-stage1/)")
    p.add_argument("--student", required=True, help="the converted student the run started from")
    p.add_argument("--config", required=True, help="the run's config (for data.eval and the protocol)")
    p.add_argument("--teacher", default=None,
                   help="also the teacher's perplexity by the same protocol (built-in name, folder, GGUF)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    d = cfg.data
    root = Path(args.run).expanduser() / "checkpoints-stage1"
    latest = root / (root / "latest").read_text().strip()
    step = int(latest.name.split("-")[-1])
    model = RetNetForCausalLM.from_pretrained(Path(args.student).expanduser()).float().eval()
    model.load_state_dict(torch.load(latest / "model.pt", weights_only=True))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(args.student).expanduser())
    result = {**run_header("stage1_ppl", argv), "machine": machine_info(), "checkpoint": str(latest),
              "step": step, "tokens": step * cfg.stage1.micro_batch_size * cfg.stage1.seq_len, "ppl": {}}
    teacher = None
    if args.teacher:
        from retconvert.convert.sources import load_teacher

        teacher = load_teacher(args.teacher).model.eval()
    for name, ids in eval_token_ids(d.eval, tokenizer, d.eval_tokens, d.text_field).items():
        window = min(d.eval_window, len(ids))
        result["ppl"][name] = perplexity(model, ids, window=window, stride=min(d.eval_stride, window),
                                         batch_size=d.eval_batch_size).ppl
        log(f"step {step}: {name} {result['ppl'][name]:.2f}")
        if teacher is not None:
            ppl = perplexity(teacher, ids, window=window, stride=min(d.eval_stride, window),
                             batch_size=d.eval_batch_size)
            result["ppl"][f"teacher_{name}"] = ppl.ppl
            result["ppl"][f"ratio_{name}"] = result["ppl"][name] / ppl.ppl
            log(f"teacher: {name} {ppl.ppl:.2f} (student / teacher {result['ppl'][f'ratio_{name}']:.3f})")
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
