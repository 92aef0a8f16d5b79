"""The `retconvert` command: convert a pretrained Transformer LM into a RetNet, distil, evaluate and publish it.

    retconvert from-hf SOURCE [--out DIR] [options]    convert a Transformer into a RetNet
    retconvert distill --config YAML [--resume] [section.key=value ...]   distil it (distill/train.py)
    retconvert sweep SWEEP_YAML [section.key=value ...]                     a grid of distillation runs
    retconvert compare TEACHER STUDENT                 perplexity and a greedy sample of each
    retconvert export DIR --format torchscale --out DIR2
    retconvert eval --model TEACHER --model STUDENT --out REPORT_DIR
    retconvert push DIR --repo-id USER/NAME [--dry-run]

A bad input ends with `error: <problem>; <fix>` on stderr and exit status 2.
"""

import argparse
import sys
from pathlib import Path
from typing import Callable

from retconvert.errors import RetconvertError


def window_arg(text: str):
    """--window: a token count, one per layer (comma-separated), or "teacher" (the teacher's own
    sliding window per layer)."""
    if text == "teacher":
        return text
    try:
        windows = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a window; give a token count such as 64, 0 for a pure "
                                         "RetNet, one per layer (64,64,0,...), or 'teacher'") from None
    return windows if len(windows) > 1 else windows[0]


def _add_from_hf(sub):
    from retconvert.convert.families import FAMILIES
    from retconvert.convert.sources import DEFAULT_TEACHER
    from retconvert.convert.student import ConvertOptions

    d = ConvertOptions()
    p = sub.add_parser("from-hf", help="convert a Hugging Face Transformer (Hub ID, folder, GGUF, built-in name)")
    p.add_argument("source", nargs="?", default=DEFAULT_TEACHER,
                   help=f"Hub ID (gpt2-large), local folder, .gguf file, or built-in name (default: {DEFAULT_TEACHER}) "
                        f"of a supported family (config.model_type: {', '.join(sorted(FAMILIES))})")
    p.add_argument("--out", type=Path, help="output folder (default: outputs/<name>-retnet)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--decay", choices=("retnet", "calibrated"), default=d.decay,
                   help="per-head decay: the paper's fixed schedule, or fitted to the teacher's attention")
    p.add_argument("--score-bias", action=argparse.BooleanOptionalAction, default=d.score_bias,
                   help="per-head score offset b (scores b + q.k), fitted with calibration")
    p.add_argument("--sink", action=argparse.BooleanOptionalAction, default=d.sink,
                   help="a never-decaying attention-sink key/value per head, fitted with calibration")
    p.add_argument("--head-norm", choices=("none", "rmsnorm", "groupnorm"), default=d.head_norm,
                   help="per-head normalisation of the retention output, each followed by a per-head scale "
                        "(the paper: groupnorm; default: %(default)s)")
    p.add_argument("--kv-heads", choices=("keep", "expand"), default=d.kv_heads,
                   help="grouped-query K/V: keep the teacher's heads (default) or expand them per query head")
    p.add_argument("--output-scale", choices=("fit", "one"), default=d.output_scale,
                   help="per-head output scale: least squares to the teacher's attention output, or 1")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=d.gate,
                   help="add the paper's swish output gate (randomly initialised: needs distillation)")
    p.add_argument("--retention-mode", choices=("parallel", "chunkwise", "recurrent"), default=d.retention_mode,
                   help="form used for prompts and training (default: %(default)s); generation steps are "
                        "recurrent either way; config.retention_mode changes it later")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="tokens per chunk of the chunkwise form "
                                                                        "(default: %(default)s)")
    p.add_argument("--window", type=window_arg, default=d.window, metavar="W|teacher",
                   help="every retention layer also attends to its last W tokens with exact softmax, under one "
                        "normaliser with the decayed state (64 as in LoLCATs/Liger; 0: pure RetNet, the default "
                        "and the only kind torchscale export accepts), or one per layer (64,64,0,...: 0 for pure "
                        "retention). 'teacher': keep the teacher's sliding "
                        "window (mistral, qwen2/3 with use_sliding_window, phi3, gemma2/3): each sliding layer gets "
                        "a window of the teacher's sliding_window tokens, each global layer pure retention")
    p.add_argument("--calib-data", help="calibration text: .jsonl/.txt file or hf:NAME:CONFIG:SPLIT "
                                        "(default: the offline C4 sample, else C4 streamed)")
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens,
                   help="calibration text in tokens (default: %(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len,
                   help="calibration row length in tokens (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the saved weights (conversion itself runs in float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle (.bin) checkpoints, which can run code: only for trusted sources")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the teacher's own Python code")
    p.add_argument("--compare", action="store_true",
                   help="afterwards print teacher vs student perplexity on held-out C4 and a greedy sample")
    from retconvert.hub import repo_id_arg

    p.add_argument("--push-to-hub", metavar="USER/NAME", type=repo_id_arg,
                   help="afterwards publish the checkpoint there (as `retconvert push OUT --repo-id USER/NAME`)")
    p.set_defaults(func=cmd_from_hf)


def default_out(source: str) -> Path:
    """outputs/<name>-retnet: the Hub ID's, folder's or file's last name, less only a .gguf suffix
    (meta-llama/Llama-3.2-1B -> outputs/Llama-3.2-1B-retnet, model.Q4_0.gguf -> outputs/model.Q4_0-retnet)."""
    name = Path(source).expanduser().name
    return Path("outputs") / f"{name.removesuffix('.gguf')}-retnet"


def cmd_from_hf(args):
    import torch

    from retconvert.convert.student import ConvertOptions, convert, save_checkpoint
    from retconvert.convert.sources import load_teacher
    from retconvert.device import check_device
    from retconvert.paths import check_output_dir

    options = ConvertOptions(
        decay=args.decay, score_bias=args.score_bias, sink=args.sink, head_norm=args.head_norm,
        kv_heads=args.kv_heads, output_scale=args.output_scale, gate=args.gate, retention_mode=args.retention_mode,
        chunk_size=args.chunk_size, window=args.window,
        calib_data=args.calib_data, calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len,
    )
    options.validate()
    check_device(args.device)
    out = args.out or default_out(args.source)
    check_output_dir(out, force=args.force)  # fail before the slow part
    teacher = load_teacher(args.source, device=args.device, allow_pickle=args.allow_pickle,
                           trust_remote_code=args.trust_remote_code, dtype=torch.float32)
    student, report = convert(teacher, options)
    save_checkpoint(student, teacher, options, report, out, dtype=args.dtype, force=args.force)
    print(f"wrote {out}")
    if args.compare:
        from retconvert.eval.compare import compare_models

        compare_models(teacher.model, student.float(), teacher.tokenizer)
    if getattr(args, "push_to_hub", None):
        from retconvert.hub import push_after_convert

        push_after_convert(out, args.push_to_hub)


def _add_compare(sub):
    p = sub.add_parser("compare", help="teacher vs student: held-out perplexity and a greedy sample")
    p.add_argument("teacher", help="Hub ID, local folder, .gguf file or built-in name (e.g. smollm2-135m)")
    p.add_argument("student", help="RetNet checkpoint folder (from `from-hf` or distillation)")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args):
    from retconvert.convert.sources import load_teacher
    from retconvert.eval.compare import compare_models, load_student

    teacher = load_teacher(args.teacher)
    compare_models(teacher.model, load_student(args.student), teacher.tokenizer, max_tokens=args.tokens)


def _add_export(sub):
    p = sub.add_parser("export", help="export a RetNet checkpoint to another framework's format")
    p.add_argument("checkpoint", type=Path, help="RetNet checkpoint folder (from `from-hf` or distillation)")
    p.add_argument("--format", choices=("torchscale",), required=True, help="torchscale: its RetNetDecoder")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)


def cmd_export(args):
    from retconvert.convert.torchscale_export import export_torchscale

    try:
        export_torchscale(args.checkpoint, args.out, force=args.force)
    except ValueError as e:
        raise RetconvertError(str(e)) from None
    print(f"wrote {args.out}")


def _add_distill(sub):
    from retconvert.distill.train import add_arguments

    p = sub.add_parser("distill", help="distil a converted RetNet from its teacher, or train from scratch "
                                       "(one process; `deepspeed distill/train.py` for several)")
    add_arguments(p)
    p.set_defaults(func=cmd_distill)


def cmd_distill(args):
    from retconvert.distill.train import config_from_args
    from retconvert.distill.trainer import run

    if args.config is None and not args.overrides:
        raise RetconvertError("distill needs a recipe; pass --config configs/distill/smollm2-135m.yaml (or another "
                              "YAML file under configs/distill/), optionally followed by section.key=value overrides")

    result = run(config_from_args(args))
    if result.get("final"):
        print(f"wrote {result['final']}")


def _add_sweep(sub):
    from retconvert.distill.sweep import add_arguments, run_args

    p = sub.add_parser("sweep", help="a grid of distillation runs (configs/sweep/*.yaml), one results table")
    add_arguments(p)
    p.set_defaults(func=run_args)


def _add_push(sub):
    from retconvert.hub import repo_id_arg

    p = sub.add_parser("push", help="publish a RetNet checkpoint on the Hugging Face Hub with a model card")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder (from `from-hf` or distillation)")
    p.add_argument("--repo-id", required=True, type=repo_id_arg, metavar="USER/NAME",
                   help="Hub model repo to publish to (created if missing)")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message", help="default: what the checkpoint is and its teacher")
    p.add_argument("--eval-report", type=Path, metavar="REPORT_DIR",
                   help="folder written by `retconvert eval` (results.json): numbers for the card and model-index")
    p.add_argument("--license", help="license id for the card (default: the teacher's, when recorded; else 'other')")
    p.add_argument("--base-model", metavar="HUB_ID",
                   help="the teacher's Hub ID, when it was converted from a local copy")
    p.add_argument("--dry-run", action="store_true",
                   help="offline: print the exact upload (sizes, sha256) and write the card; needs no token")
    p.add_argument("--card-out", type=Path, help="where --dry-run writes the card (default: <checkpoint>.card.md)")
    p.set_defaults(func=cmd_push)


def cmd_push(args):
    from retconvert.hub import push

    push(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
         commit_message=args.commit_message, eval_report=args.eval_report, dry_run=args.dry_run,
         card_out=args.card_out, license=args.license, base_model=args.base_model)


def int_list(text: str) -> list:
    """'128,256' -> [128, 256] (argparse type; a one-line error otherwise)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers, e.g. 128,256") from None


def _add_eval(sub):
    from retconvert.eval.lm_tasks import DEFAULT_TASKS
    from retconvert.eval.suite import SUITES, EvalSettings

    d = EvalSettings()
    p = sub.add_parser("eval", help="teacher vs students: quality, long-range memory, speed, memory, energy; "
                                    "writes results.json, report.md and plots")
    p.add_argument("--model", action="append", required=True, dest="models", metavar="MODEL",
                   help="Hub ID, local folder (RetNet or plain HF), .gguf file or built-in name; repeat it: "
                        "the first is the teacher, the others students")
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma list of {', '.join(SUITES)} (default: all)")
    p.add_argument("--out", type=Path, required=True, help="report folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing report folder")
    p.add_argument("--limit", type=int, help="examples per zero-shot task and documents per perplexity set")
    p.add_argument("--max-context", type=int, help="cap on context lengths (default: the teacher's limit)")
    p.add_argument("--contexts", type=int_list,
                   help="context lengths for speed/memory/passkey (default: 128,256,...,8192)")
    p.add_argument("--batch-sizes", type=int_list, default=d.batch_sizes, help="decode batch sizes (default: 1,16)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="zero-shot lm-eval tasks ('' for none)")
    p.add_argument("--zero-shot-batch-size", type=int, default=d.zero_shot_batch_size,
                   help="lm-eval batch size (default: %(default)s)")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens,
                   help="tokens per perplexity set (default: %(default)s)")
    p.add_argument("--ppl-window", type=int, default=d.ppl_window,
                   help="perplexity window in tokens (default: %(default)s)")
    p.add_argument("--ppl-stride", type=int, default=d.ppl_stride,
                   help="perplexity window stride (default: %(default)s)")
    p.add_argument("--passkey-trials", type=int, default=d.passkey_trials,
                   help="passkey prompts per length (default: %(default)s)")
    p.add_argument("--passkey-lengths", type=int_list, help="prompt lengths for passkey (default: the contexts)")
    p.add_argument("--position-docs", type=int, default=d.position_docs, help="rows of C4 for per-position loss")
    p.add_argument("--position-length", type=int, help="row length for per-position loss (default: longest context)")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps, help="timed decode steps per point")
    p.add_argument("--prefill-repeats", type=int, default=d.prefill_repeats,
                   help="timed prefill passes per length (default: %(default)s)")
    p.add_argument("--prefill-budget", type=float, default=d.prefill_budget, metavar="SECONDS",
                   help="skip the parallel form at a length where one pass is predicted (quadratic in the length) "
                        "to take longer (default: %(default)s; 0: no limit)")
    p.add_argument("--energy-context", type=int, default=d.energy_context,
                   help="context of the energy run in tokens (default: %(default)s)")
    p.add_argument("--energy-steps", type=int, default=d.energy_steps,
                   help="decode steps per energy measurement (default: %(default)s)")
    p.add_argument("--assumed-watts", type=float,
                   help="without an energy counter, report a labelled estimate: time x this power (default: none)")
    p.add_argument("--window-baseline", type=int, metavar="W",
                   help="also evaluate the teacher attending only to its last W tokens and its first token (the "
                        "baseline a --window W student must beat; quality and long-range suites)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the models are evaluated in (default: %(default)s)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin checkpoints (only trusted sources)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args):
    from retconvert.eval.suite import EvalSettings, run_eval

    settings = EvalSettings(
        suites=[s.strip() for s in args.suite.split(",") if s.strip()], limit=args.limit,
        max_context=args.max_context, contexts=args.contexts, batch_sizes=args.batch_sizes,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        zero_shot_batch_size=args.zero_shot_batch_size, ppl_tokens=args.ppl_tokens, ppl_window=args.ppl_window,
        ppl_stride=args.ppl_stride, passkey_trials=args.passkey_trials, passkey_lengths=args.passkey_lengths,
        position_docs=args.position_docs, position_length=args.position_length, decode_steps=args.decode_steps,
        prefill_repeats=args.prefill_repeats, prefill_budget=args.prefill_budget or None,
        energy_context=args.energy_context, energy_steps=args.energy_steps,
        assumed_watts=args.assumed_watts, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, window_baseline=args.window_baseline)
    run_eval(args.models, args.out, settings, force=args.force)
    print(f"wrote {args.out}/report.md")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (`retconvert <verb>: error: ...; see retconvert <verb> --help`)
    instead of the usage block; subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="retconvert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_from_hf, _add_distill, _add_sweep, _add_compare, _add_export, _add_push, _add_eval):
        add(sub)
    return parser


def exit_code(action: Callable[[], object]) -> int:
    """Run `action()`: 0 when it returns, 2 with its one-line `error: ...` on stderr when it raises
    RetconvertError (the CLI's and the scripts' `main`)."""
    try:
        action()
    except RetconvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return exit_code(lambda: args.func(args))
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
