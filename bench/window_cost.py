"""What keeping a teacher's sliding window costs at decoding, against replacing it by retention.

For published sliding-window teachers (configurations as their config.json files give them,
nothing downloaded), the student `retconvert from-hf` builds with the default options, once
replacing the window (pure retention, the default) and once keeping it (`--window teacher`):

  state bytes     the packed decoder's state per sequence (what generate() carries), fp32:
                  the retention matrices, plus each windowed layer's last W keys and values;
                  measured on the allocated tensors after a prefill
  ms per token    the packed decoder's step, batch 1, one thread, median of `--steps`, on a
                  reduced copy of the student: the teacher's layers, heads, head size and
                  windows, but hidden size, MLP width and vocabulary cut to `--hidden`, so
                  the step is the retention part (the window's attention over its W slots
                  against the matrix state); the products of the full model are not in it
  weight bytes    the full student's parameters (built on the meta device), what a
                  bandwidth-bound decoder streams per token, for scale
  teacher KV      computed, not measured: sum over layers of min(T, the layer's window or T)
                  x Hkv x 2 x head_dim x 4 bytes (fp32 keys and values), at context T

    .venv/bin/python bench/window_cost.py --out docs/bench/window_cost.json

Not a test. A few minutes on one core.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, run_header, write_json  # noqa: E402

from retconvert.convert.student import ConvertOptions, student_config  # noqa: E402
from retconvert.models import RetNetConfig, RetNetForCausalLM  # noqa: E402
from retconvert.models.decoding_retnet import RetNetDecoder  # noqa: E402

TEACHERS = {
    "google/gemma-3-1b-it": lambda: Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        rope_local_base_freq=10000.0, rope_theta=1000000.0, max_position_embeddings=32768),
    "google/gemma-2-2b": lambda: Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh"),
    "mistralai/Mistral-7B-v0.1": lambda: MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, sliding_window=4096, max_position_embeddings=32768, rope_theta=10000.0),
    "microsoft/Phi-3-mini-4k-instruct": lambda: Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rope_theta=10000.0, sliding_window=2047, pad_token_id=32000),
}
KINDS = {"replace (pure retention, the default)": 0, "keep (--window teacher)": "teacher"}


def reduced(config: RetNetConfig, hidden: int) -> RetNetConfig:
    """The same layers, heads, head size and windows with small hidden, MLP and vocabulary."""
    return RetNetConfig(**{**config.to_dict(), "hidden_size": hidden, "intermediate_size": hidden,
                           "vocab_size": 256, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None})


def teacher_kv_bytes(config: RetNetConfig, windows, context: int) -> int:
    D, Hkv = config.qk_head_dim, config.num_key_value_heads
    return sum(min(context, w or context) for w in windows) * Hkv * 2 * D * 4


@torch.no_grad()
def measure(config: RetNetConfig, hidden: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = RetNetForCausalLM(reduced(config, hidden)).eval()
    decoder = RetNetDecoder(model, batch_size=1)
    decoder.prefill(torch.randint(0, 256, (1, 8)))
    state = [decoder.state, *decoder.caches, *decoder.cache_masks]
    token = torch.randint(0, 256, (1,))
    for _ in range(3):
        decoder.step(token)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        decoder.step(token)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"state_bytes": sum(t.numel() * t.element_size() for t in state),
            "cache_bytes": sum(t.numel() * t.element_size() for t in decoder.caches),
            "ms_per_token": statistics.median(times), "ms_per_token_iqr": statistics.quantiles(times, n=4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--out", type=Path, default=Path("docs/bench/window_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {**run_header("window_cost"), "machine": machine_info(torch_threads=1), "hidden": args.hidden,
              "steps": args.steps, "teachers": []}
    for name, make in TEACHERS.items():
        teacher = make()
        row = {"teacher": name, "students": []}
        for kind, window in KINDS.items():
            config = student_config(teacher, ConvertOptions(window=window))
            with torch.device("meta"):
                params = sum(p.numel() for p in RetNetForCausalLM(config).parameters())
            windows = student_config(teacher, ConvertOptions(window="teacher")).layer_windows
            got = {"kind": kind, "windows": config.layer_windows, "params": params,
                   "weight_bytes_fp32": params * 4, **measure(config, args.hidden, args.steps)}
            row["students"].append(got)
            print(name, kind, {k: v for k, v in got.items() if k != "windows"}, flush=True)
        row["teacher_kv_bytes_fp32"] = {T: teacher_kv_bytes(config, windows, T) for T in args.contexts}
        result["teachers"].append(row)
        write_json(args.out, result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
