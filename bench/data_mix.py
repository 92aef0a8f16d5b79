"""What a run has trained on: each training source's share of the text up to a checkpoint.

Reads the data position saved in a run's checkpoint (documents consumed per source this epoch,
and, in checkpoints written since `data.train_weights`, tokens per source) and measures the
characters of those documents in the sources themselves. The characters include the documents
packed into the shuffle buffer but not yet trained on (at most `data.shuffle_buffer` rows).

    .venv/bin/python bench/data_mix.py ~/runs/smollm2-w64 --out docs/bench/data_mix_w64.json

The checkpoint's trainer state is unpickled as `--resume` does: point it only at your own runs.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, machine_info, run_header  # noqa: E402

from retconvert.data import iter_texts  # noqa: E402
from retconvert.distill.checkpoint import latest_checkpoint  # noqa: E402
from retconvert.paths import display_path  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (run.out_dir)")
    ap.add_argument("--checkpoint", help="step-N under checkpoints/ (default: the latest)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = args.run.expanduser() / "checkpoints"
    ckpt = root / args.checkpoint if args.checkpoint else latest_checkpoint(root)
    if ckpt is None or not (ckpt / "trainer-rank0.pt").is_file():
        raise SystemExit(f"error: no complete checkpoint under {root}; pass a run folder with checkpoints")
    state = torch.load(ckpt / "trainer-rank0.pt", weights_only=False)  # the run's own file, as --resume reads it
    data = state["data"]
    sources = []
    for spec, docs in zip(data["specs"], data["consumed"]):
        texts = iter_texts(spec)
        try:
            chars = sum(len(next(texts)) for _ in range(docs))
        except StopIteration:
            raise SystemExit(f"error: {spec} holds fewer than the {docs} documents the checkpoint consumed; "
                             "was the source changed since the run?") from None
        sources.append({"source": display_path(spec), "documents": docs, "characters": chars})
    total = sum(s["characters"] for s in sources) or 1
    for i, s in enumerate(sources):
        s["share_of_characters"] = round(s["characters"] / total, 4)
        if "tokens" in data:
            s["tokens_counted"] = data["tokens"][i]
        if "source_epochs" in data:
            s["source_epochs"] = data["source_epochs"][i]
    result = run_header("data_mix", sys.argv)
    result["machine"] = machine_info("cpu")
    result.update(run=display_path(str(args.run.expanduser())), checkpoint=ckpt.name, step=state["step"],
                  epoch=data["epoch"], rows_served=data["rows_served"], sources=sources,
                  note="documents and characters this epoch, including rows still in the shuffle buffer; "
                       "tokens_counted: tokens packed from this source, counted since the run first saved them "
                       "(checkpoints from 8547a24 on; a resume from an older one starts at 0); source_epochs: with "
                       "data.train_weights, times the source started over (documents and characters: its "
                       "current pass)")
    for s in sources:
        print(f"{s['share_of_characters']:7.1%}  {s['documents']:6d} documents  {s['source']}", file=sys.stderr)
    emit_result(result, args.out)


if __name__ == "__main__":
    main()
