"""How good is the untrained student? Perplexity for each conversion initialisation.

For each variant of ConvertOptions: build the student from the same teacher, calibrate it
on the offline C4 training sample, then measure held-out perplexity (C4 held-out and
WikiText-2 test) and record the per-layer relative error of retention vs attention output.

    .venv/bin/python bench/convert_init.py --out docs/bench/convert_init.json

Not a test: it loads the real SmolLM2 teacher and takes tens of minutes on 2 CPU cores.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, run_header, write_json  # noqa: E402

from retconvert.convert.student import ConvertOptions, convert  # noqa: E402
from retconvert.convert.sources import load_teacher  # noqa: E402
from retconvert.data import iter_texts, token_stream  # noqa: E402
from retconvert.eval.perplexity import perplexity  # noqa: E402
from retconvert.paths import shared_data_file  # noqa: E402

# name -> ConvertOptions overrides. The first is the naive conversion (paper RetNet layer).
VARIANTS = {
    "paper: retnet decay, groupnorm, scale 1": dict(decay="retnet", score_bias=False, sink=False,
                                                    head_norm="groupnorm", output_scale="one"),
    "retnet decay + fitted scale": dict(decay="retnet", score_bias=False, sink=False, head_norm="none"),
    "calibrated decay + fitted scale": dict(decay="calibrated", score_bias=False, sink=False, head_norm="none"),
    "calibrated + score bias": dict(decay="calibrated", score_bias=True, sink=False, head_norm="none"),
    "calibrated + score bias + sink": dict(decay="calibrated", score_bias=True, sink=True, head_norm="none"),
    "calibrated + score bias + sink, rmsnorm": dict(decay="calibrated", score_bias=True, sink=True,
                                                    head_norm="rmsnorm"),
    "retnet decay + score bias + sink": dict(decay="retnet", score_bias=True, sink=True, head_norm="none"),
    # Windowed retention (--window W): the default plus exact softmax over each layer's last W tokens.
    "default + window 64": dict(decay="calibrated", score_bias=True, sink=True, head_norm="none", window=64),
    "default + window 16": dict(decay="calibrated", score_bias=True, sink=True, head_norm="none", window=16),
    # Gemma 3's layout kept (--window teacher on a Gemma 3 teacher): a window on 5 of every 6 layers, the
    # 6th (global) pure retention; laid on SmolLM2-135M's 30 layers. At 512 tokens (the evaluation window)
    # the windowed layers are exact softmax attention: what remains is the global layers' conversion.
    "default + window 512 on 5 of 6 layers (Gemma 3 layout)": dict(
        decay="calibrated", score_bias=True, sink=True, head_norm="none",
        window=[0 if (i + 1) % 6 == 0 else 512 for i in range(30)]),
}


def heldout(tokenizer, relative, max_tokens):
    texts = iter_texts(str(shared_data_file(relative)))
    return token_stream(texts, tokenizer, max_tokens, separator_id=tokenizer.eos_token_id)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--variants", default="all",
                    help="comma-separated variant indices, or 'all'")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=ConvertOptions().calib_tokens)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/convert_init.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    teacher = load_teacher(args.teacher)
    tok = teacher.tokenizer
    sets = {"c4_heldout": heldout(tok, "c4/c4_heldout.jsonl", args.eval_tokens),
            "wikitext2": heldout(tok, "ppl/wikitext-2-raw-test.txt", args.eval_tokens)}
    result = {**run_header("convert_init"), "machine": machine_info(), "teacher": args.teacher,
              "eval_tokens": args.eval_tokens, "protocol": "documents joined by EOS; window 512, stride 256",
              "teacher_ppl": {}, "variants": []}
    for name, ids in sets.items():
        result["teacher_ppl"][name] = perplexity(teacher.model, ids).to_dict()
        print(f"teacher {name}: {result['teacher_ppl'][name]['ppl']:.2f}", flush=True)

    chosen = list(VARIANTS) if args.variants == "all" else [list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    for name in chosen:
        options = ConvertOptions(**VARIANTS[name], calib_tokens=args.calib_tokens)
        t0 = time.time()
        student, report = convert(teacher, options, log=lambda *a: None)
        seconds = time.time() - t0
        row = {"name": name, "options": asdict(options), "convert_seconds": round(seconds, 1),
               "layer_rel_error": [layer["rel_error"] for layer in report["layers"]], "ppl": {}, "ratio": {}}
        for set_name, ids in sets.items():
            ppl = perplexity(student, ids).ppl
            row["ppl"][set_name] = ppl
            row["ratio"][set_name] = ppl / result["teacher_ppl"][set_name]["ppl"]
        errs = row["layer_rel_error"]
        row["mean_layer_rel_error"] = sum(errs) / len(errs) if errs else None
        print(json.dumps({k: row[k] for k in ("name", "ppl", "ratio", "mean_layer_rel_error", "convert_seconds")}),
              flush=True)
        result["variants"].append(row)
        write_json(args.out, result)  # partial results survive an interruption
    write_json(args.out, result)


if __name__ == "__main__":
    main()
