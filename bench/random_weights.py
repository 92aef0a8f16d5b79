#!/usr/bin/env python
"""A model folder with the configuration and tokenizer of MODEL and random weights.

Speed and memory do not depend on the weights' values, so a model can be timed where its
weights cannot go: a lent GPU machine, reached by a copy of the repository of at most 64 MiB
(bench/cuda_check.sh). Two steps:

  here:   python bench/random_weights.py smollm2-135m --skeleton --out .gpu/teacher
          (configuration + tokenizer, no weights: a few MB; MODEL: anything `retconvert eval`
          loads: built-in name, .gguf, local folder of a Transformer or a RetNet)
  there:  python bench/random_weights.py .gpu/teacher --out /tmp/teacher --dtype bfloat16
          (the model built from that configuration with its own random initialisation)

Never use such a folder for quality: its outputs are noise.
"""

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="built-in name, .gguf file or model folder (a skeleton folder too)")
    p.add_argument("--out", required=True, help="folder to write (must not exist)")
    p.add_argument("--skeleton", action="store_true", help="write the configuration and tokenizer only")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="raise the context limit recorded in the configuration (timing past the real limit)")
    args = p.parse_args(argv)

    import retconvert  # noqa: F401  (registers the RetNet classes with the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    if out.exists():
        sys.exit(f"random_weights: {out} exists; remove it or pick another --out")
    source = Path(args.model).expanduser()
    if source.is_dir() and not any(source.glob("*.safetensors")):  # a skeleton
        config, tokenizer = AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    else:
        from retconvert.eval.models import load_model

        loaded = load_model(args.model, "model")
        config, tokenizer = loaded.model.config, loaded.tokenizer
    if args.max_position_embeddings:
        config.max_position_embeddings = args.max_position_embeddings
    if args.skeleton:
        config.save_pretrained(out)
    else:
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"wrote {out} ({'skeleton' if args.skeleton else args.dtype + ' random weights'}: "
          f"{config.model_type}, {config.num_hidden_layers} layers)")


if __name__ == "__main__":
    main()
