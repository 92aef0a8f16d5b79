"""Windowed retention, layer by layer: how close is each layer to the teacher's attention output?

For a few layers of the teacher, and each variant below, the student's retention layer is
calibrated exactly as `retconvert from-hf` does (`fit_layer`: decay, score bias, sink weight and
output scale per head) on rows of the C4 training sample, then its relative error
||student - teacher||^2 / ||teacher||^2 of the attention output (before o_proj) is measured on
the calibration rows and on held-out C4 rows. The variants:

  pure            retention only (the default student)
  window W        --window W: exact softmax over the last W tokens, decayed retention beyond,
                  one normaliser
  window W only   the same layer with the decayed part switched off (gamma = 1e-6, so every
                  token beyond the window weighs gamma^W ~ 0; the sink stays): what the window
                  and the sink alone reach, the layer-level counterpart of
                  ../shared/notes/window-baseline.md

    .venv/bin/python bench/window_layers.py --out docs/bench/window_layers.json

Not a test: it loads the real SmolLM2 teacher (a few minutes on one loaded core).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import int_list, machine_info, run_header, write_json  # noqa: E402

from retconvert.convert.calibrate import apply_fit, capture_teacher, fit_layer  # noqa: E402
from retconvert.convert.student import ConvertOptions, build_student  # noqa: E402
from retconvert.convert.families import family_for  # noqa: E402
from retconvert.convert.sources import load_teacher  # noqa: E402
from retconvert.data import iter_texts, token_stream  # noqa: E402
from retconvert.paths import shared_data_file  # noqa: E402


def rows(tokenizer, relative: str, n: int, length: int) -> torch.Tensor:
    ids = token_stream(iter_texts(str(shared_data_file(relative))), tokenizer, n * length,
                       separator_id=tokenizer.eos_token_id)
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.no_grad()
def heldout_error(layer, x, y) -> float:
    """The fitted layer (its own scale) on other text: relative error of the attention output."""
    N, T, _ = x.shape
    pos = torch.arange(T).expand(N, T)
    q, k, v = layer.project(x, pos)
    o, _ = layer.retain(q, k, v, pos, output_final_state=False)
    o = layer.head_norm(o).reshape(N, T, -1)
    return float(((o - y) ** 2).sum() / (y**2).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--layers", type=int_list, default=[3, 15, 27])
    ap.add_argument("--windows", type=int_list, default=[16, 64])
    ap.add_argument("--rows", type=int, default=4, help="calibration rows (and as many held-out rows)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/window_layers.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    teacher = load_teacher(args.teacher)
    family = family_for(teacher.model.config)
    calib = rows(teacher.tokenizer, "c4/c4_train_sample.jsonl", args.rows, args.seq_len)
    held = rows(teacher.tokenizer, "c4/c4_heldout.jsonl", args.rows, args.seq_len)
    captured = {name: capture_teacher(teacher.model, family, ids) for name, ids in (("calib", calib), ("held", held))}
    result = {**run_header("window_layers"), "machine": machine_info(), "teacher": args.teacher,
              "layers": args.layers, "rows": args.rows, "seq_len": args.seq_len, "variants": []}

    variants = [("pure", 0, False)]
    for w in args.windows:
        variants += [(f"window {w}", w, False), (f"window {w} only", w, True)]
    for name, window, window_only in variants:
        student = build_student(teacher.model, ConvertOptions(window=window)).eval()
        row = {"name": name, "window": window, "layers": []}
        for i in args.layers:
            block = student.model.layers[i]
            layer = block.retention.float()
            x_cal, x_held = (block.input_layernorm(captured[s][0][i]).float() for s in ("calib", "held"))
            y_cal, y_held = captured["calib"][1][i], captured["held"][1][i]
            if window_only:
                with torch.no_grad():
                    layer.decay_logit.fill_(float(torch.logit(torch.tensor(1e-6))))
            t0 = time.time()
            fit = fit_layer(layer, x_cal, y_cal, fit_decay=not window_only, fit_bias=True)
            apply_fit(layer, fit)  # with the fitted output scale, as calibrate() does
            row["layers"].append({"layer": i, "calib_rel_error": fit.rel_error,
                                  "heldout_rel_error": heldout_error(layer, x_held, y_held),
                                  "median_gamma": sorted(fit.gamma)[len(fit.gamma) // 2],
                                  "fit_seconds": round(time.time() - t0, 1)})
            print(name, row["layers"][-1], flush=True)
        result["variants"].append(row)
        write_json(args.out, result)  # partial results survive an interruption
    write_json(args.out, result)


if __name__ == "__main__":
    main()
