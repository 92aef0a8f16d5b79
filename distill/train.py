r"""Distil a converted RetNet student from its Transformer teacher (or train a model from scratch).

    deepspeed --num_gpus 8 distill/train.py --config configs/distill/gpt2-large.yaml
    torchrun --nproc_per_node 2 distill/train.py --config configs/distill/smollm2-135m.yaml \
        run.deepspeed=configs/deepspeed/zero2.json
    python distill/train.py --config configs/distill/smollm2-135m.yaml stage2.steps=200 run.out_dir=outputs/x
    python distill/train.py --config configs/distill/smollm2-135m.yaml --resume     # continue the latest checkpoint
    retconvert distill --config configs/distill/smollm2-135m.yaml stage2.steps=200   # the same, as a CLI verb

Without a launcher (RANK unset) it runs as one process: plain PyTorch, or a one-process
DeepSpeed group when `run.deepspeed` names a JSON config.

The recipe:
  setup   load the teacher, build the student (a converted folder, or convert now),
          tokenise the held-out sets, find the checkpoint to resume;
  stage 1 attention transfer: each layer's attention path (q, k, v, o and what retention adds;
          full or low-rank) learns to reproduce the teacher's attention output from the
          teacher's own layer input (layer-local, so cheap; distill/attention_transfer.py);
  stage 2 logit distillation: KL(teacher || student) at temperature T (+ alpha * next-token CE)
          on packed text, full fine-tuning or LoRA, with checkpoints and held-out perplexity;
  export  the student in the converter's checkpoint format at <out_dir>/final.
"""

import argparse
import sys

from retconvert.cli import Parser, exit_code
from retconvert.distill.config import load_config
from retconvert.distill.trainer import run


def add_arguments(p: argparse.ArgumentParser):
    """This script's arguments (also those of `retconvert distill`)."""
    p.add_argument("--config", help="YAML file under configs/distill/ (defaults apply to missing keys)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. stage2.lr=1e-4 run.out_dir=outputs/x")


def parse_args(argv=None):
    p = Parser(prog="distill/train.py", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def config_from_args(args):
    """The validated DistillConfig the arguments name (a ConfigError names a bad key or value)."""
    return load_config(args.config, args.overrides + (["run.resume=true"] if args.resume else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run(config_from_args(args)))  # stage 1 (attention transfer), stage 2, export


if __name__ == "__main__":
    sys.exit(main())
