"""`retconvert eval` on tiny random models: every suite runs, the report is complete and sane.

The teacher is a tiny random Llama, the student its RetNet conversion; both saved to folders
with a byte-level BPE tokenizer trained here on a few sentences (no Hub access).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retconvert  # noqa: F401  (registers the RetNet classes)
from retconvert.cli import main
from retconvert.eval.common import cache_nbytes
from retconvert.eval.measure import PeakRSS
from retconvert.eval.energy import RaplMeter
from retconvert.eval.lm_tasks import DEFAULT_TASKS, TEMPLATES, materialize, template_info

SENTENCES = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "A pass key is hidden in the long text below. Find it and remember it.",
    "The pass key is 12345. Remember it. What is the pass key? The pass key is",
    "Question: How do I open a jar? Answer: twist the lid. The history of the city begins here.",
    "All work and no play makes a dull model; numbers 0 1 2 3 4 5 6 7 8 9 are digits.",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(teacher folder, student folder) holding a tiny Llama and its RetNet conversion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retconvert.convert.student import ConvertOptions, build_student

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval()
    student = build_student(teacher, ConvertOptions(chunk_size=8)).eval()
    paths = []
    for name, model in (("teacher", teacher), ("student", student)):
        folder = root / name
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        paths.append(folder)
    return paths


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a busy shared machine they only wait for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A tiny offline data folder in the shared layout (a few rows of each file)."""
    root = tmp_path_factory.mktemp("data")
    rows = {
        "eval/lambada_openai_test.jsonl": [{"text": s} for s in SENTENCES],
        "eval/piqa_validation.jsonl": [{"goal": "How do I open a jar?", "sol1": "Twist the lid.",
                                        "sol2": "Eat the lid.", "label": i % 2} for i in range(4)],
        "eval/arc_easy_test.jsonl": [{"question": "What colour is the sky?", "choices": {
            "text": ["blue", "green", "red"], "label": ["A", "B", "C"]}, "answerKey": "A"}] * 4,
        "eval/boolq_validation.jsonl": [{"passage": SENTENCES[0], "question": "is the sky blue",
                                         "label": True}] * 4,
        "eval/winogrande_validation.jsonl": [{"sentence": "The sun is _ today.", "option1": "yellow",
                                              "option2": "green", "answer": "1"}] * 4,
        "c4/c4_heldout.jsonl": [{"text": " ".join(SENTENCES * 3)} for _ in range(6)],
    }
    for rel, items in rows.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
    (root / "ppl").mkdir()
    (root / "ppl/wikitext-2-raw-test.txt").write_text("\n".join(SENTENCES * 4) + "\n")
    return root


def test_task_templates_resolve(tiny_data, tmp_path):
    """Every default task has an offline template, registered under its own name, for the stock split."""
    splits = {"lambada_openai": "test", "piqa": "validation", "arc_easy": "test", "boolq": "validation",
              "winogrande": "validation"}
    for task in DEFAULT_TASKS:
        file, split = template_info(task)
        assert split == splits[task] and file == f"eval/{task}_{split}.jsonl"
    registered = materialize(DEFAULT_TASKS, tiny_data, tmp_path)
    assert registered == {t: f"retconvert_{t}" for t in DEFAULT_TASKS}
    text = (tmp_path / "piqa.yaml").read_text()
    assert "@" not in text.split("\n", 5)[-1] and str(tiny_data.resolve()) in text
    repo_text = (TEMPLATES / "piqa.yaml").read_text()
    assert str(Path.home()) not in repo_text and "@DATA_DIR@" in repo_text  # nothing absolute in the repo


def test_prefill_budget_skips_the_parallel_form_where_it_would_take_too_long(tiny_pair):
    """The parallel form's time is quadratic in the length: past the length where its last time,
    scaled so, exceeds the budget it is skipped with the reason; chunkwise and attention are not."""
    from retconvert.eval.models import load_model
    from retconvert.eval.speed import prefill_curve

    teacher, student = (load_model(str(p), role) for p, role in zip(tiny_pair, ("teacher", "student")))
    out = prefill_curve([teacher, student], [16, 32], repeats=1, warmup=0, budget_s=1e-9)
    points = {(p["mode"], p["context_tokens"]) for p in out["curves"][student.name]}
    assert points == {("parallel", 16), ("chunkwise", 16), ("chunkwise", 32)}
    assert {(p["mode"], p["context_tokens"]) for p in out["curves"][teacher.name]} == {("attention", 16),
                                                                                        ("attention", 32)}
    (skip,) = out["skipped_points"]
    assert (skip["model"], skip["mode"], skip["context_tokens"]) == (student.name, "parallel", 32)
    assert "predicted from 16 tokens (quadratic), over the 1e-09 s budget (--prefill-budget)" in skip["reason"]
    out = prefill_curve([student], [16, 32], repeats=1, warmup=0, budget_s=None)  # no limit
    assert len(out["curves"][student.name]) == 4 and not out["skipped_points"]


def test_eval_all_suites(tiny_pair, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETCONVERT_DATA", str(tiny_data))
    teacher, student = tiny_pair
    out = tmp_path / "report"
    rc = main(["eval", "--model", str(teacher), "--model", str(student), "--out", str(out),
               "--limit", "3", "--contexts", "16,32", "--batch-sizes", "1,4", "--passkey-lengths", "96,128",
               "--passkey-trials", "2", "--position-docs", "2", "--position-length", "64",
               "--ppl-tokens", "200", "--ppl-window", "32", "--ppl-stride", "16", "--decode-steps", "3",
               "--prefill-repeats", "2", "--energy-context", "16", "--energy-steps", "4"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"machine", "settings", "models", "skipped"}
    t, s = results["models"]
    assert (t["role"], s["role"]) == ("teacher", "student") and t["params"] > 0 and s["is_retnet"]

    for m in (t, s):
        r = m["results"]
        for name in ("c4", "wikitext2"):
            p = r["quality"]["perplexity"][name]
            assert math.isfinite(p["ppl"]) and p["ppl"] > 1 and p["tokens"] > 0
            assert {"ppl", "nll", "tokens", "window", "stride"} <= set(p)
        assert set(r["quality"]["zero_shot"]) == set(DEFAULT_TASKS)
        for task, z in r["quality"]["zero_shot"].items():
            assert 0 <= z["acc"] <= 1 and z["n"] == 3 and z["source"] == "offline", (task, z)
        assert "acc_norm" in r["quality"]["zero_shot"]["piqa"]
        pk = r["longrange"]["passkey"]["points"]
        # 128 is capped to 118: the 10 answer tokens must fit in the teacher's 128 positions
        assert [p["context_tokens"] for p in pk] == [96, 118] and all(0 <= p["accuracy"] <= 1 for p in pk)
        buckets = r["longrange"]["position_loss"]["buckets"]
        assert buckets[0]["start_position"] == 0 and buckets[-1]["end_position"] == 64
        assert all(math.isfinite(b["nll"]) and b["nll"] > 0 for b in buckets)
        dec = r["speed"]["decode"]["points"]
        assert {(p["context_tokens"], p["batch_size"]) for p in dec} == {(16, 1), (16, 4), (32, 1), (32, 4)}
        assert all(p["latency_ms"] > 0 and p["tokens_per_s"] > 0 for p in dec)
        packed = r["speed"].get("decode_packed", {}).get("points", [])
        if m["is_retnet"]:  # the packed decoder is timed on the same points
            assert [(p["context_tokens"], p["batch_size"]) for p in packed] == \
                [(p["context_tokens"], p["batch_size"]) for p in dec]
        else:
            assert not packed
        gen = r["speed"]["generate"]["points"]  # generate() as users call it
        assert [p["context_tokens"] for p in gen] == [16, 32] and all(p["total_ms"] > 0 for p in gen)
        gen_packed = r["speed"].get("generate_packed", {}).get("points", [])
        assert len(gen_packed) == (2 if m["is_retnet"] else 0)
        pre = r["speed"]["prefill"]["points"]
        assert {p["mode"] for p in pre} == ({"parallel", "chunkwise"} if m["is_retnet"] else {"attention"})
        assert len(r["memory"]["points"]) == 2

    # Memory: the recurrent state does not grow with the context; the KV cache does, linearly.
    t_cache = [p["cache_bytes"] for p in t["results"]["memory"]["points"]]
    s_cache = [p["cache_bytes"] for p in s["results"]["memory"]["points"]]
    assert s_cache[0] == s_cache[1] > 0 and t_cache[1] == 2 * t_cache[0] > 0
    # Energy: no counter here and no --assumed-watts: skipped with a reason, no number.
    if "energy" not in t["results"]:
        assert any(x["suite"] == "energy" and "counter" in x["reason"] for x in results["skipped"])
    else:
        assert t["results"]["energy"]["status"] == "measured" and t["results"]["energy"]["joules_per_token"] > 0
    assert all(x["reason"] for x in results["skipped"])
    assert not [x for x in results["skipped"] if x["suite"] not in ("energy", "memory.peak_rss")], results["skipped"]

    report = (out / "report.md").read_text()
    assert "## Quality" in report and "## Speed" in report and "ratio" in report and "packed decoder" in report
    # accuracies carry their binomial standard error; the margin above chance has its own row
    teacher = [r for r in json.loads((out / "results.json").read_text())["models"] if r["role"] == "teacher"][0]
    piqa = teacher["results"]["quality"]["zero_shot"]["piqa"]
    acc, n = piqa["acc"], piqa["n"]
    assert f"| piqa acc | {acc:.3f} ± {(acc * (1 - acc) / n) ** 0.5:.3f} |" in report
    assert f"| piqa acc - chance (0.5) | {acc - 0.5:.3f} ± " in report
    student = [r for r in json.loads((out / "results.json").read_text())["models"] if r["role"] == "student"][0]
    t_correct, s_correct = piqa["correct"], student["results"]["quality"]["zero_shot"]["piqa"]["correct"]
    assert len(t_correct) == len(s_correct) == n and sum(t_correct) == round(acc * n)
    d = [x - y for x, y in zip(s_correct, t_correct)]  # per example, the same documents
    assert student["results"]["quality"]["zero_shot"]["piqa"]["doc_ids"] == piqa["doc_ids"]
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5
    assert f"| piqa acc - teacher's, paired | - | {mean:.3f} ± {se:.3f} |" in report
    for png in ("latency_vs_context.png", "prefill_vs_length.png", "memory_vs_context.png",
                "passkey_accuracy.png", "position_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert "[eval" in capsys.readouterr().err  # progress lines


def test_window_baseline_beside_the_teacher(tiny_pair, tiny_data, tmp_path, monkeypatch):
    """--window-baseline W: the teacher over its last W tokens + first token, measured on quality and
    long range like the others, skipped with a reason where its cost would only repeat the teacher's."""
    monkeypatch.setenv("RETCONVERT_DATA", str(tiny_data))
    teacher, student = tiny_pair
    out = tmp_path / "report"
    rc = main(["eval", "--model", str(teacher), "--model", str(student), "--out", str(out), "--window-baseline", "4",
               "--suite", "quality,longrange,memory", "--tasks", "", "--contexts", "16,32", "--passkey-lengths", "96",
               "--passkey-trials", "1", "--position-docs", "1", "--position-length", "64", "--ppl-tokens", "200",
               "--ppl-window", "32", "--ppl-stride", "16"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    t, b, s = results["models"]
    assert [m["role"] for m in (t, b, s)] == ["teacher", "baseline", "student"]
    assert b["name"].endswith("(window 4 + first token)") and b["source"] == t["source"]
    ppl = {m["role"]: m["results"]["quality"]["perplexity"]["c4"]["ppl"] for m in (t, b)}
    assert math.isfinite(ppl["baseline"]) and ppl["baseline"] != ppl["teacher"]  # the window does change it
    assert b["results"]["longrange"]["position_loss"]["buckets"]
    assert "memory" not in b["results"] and "memory" in t["results"]
    assert any(x["model"] == b["name"] and "teacher" in x["reason"] for x in results["skipped"])
    assert "(window 4 + first token)" in (out / "report.md").read_text()


def test_window_baseline_needs_a_transformer_teacher(tiny_pair, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETCONVERT_DATA", str(tiny_data))
    _, student = tiny_pair
    rc = main(["eval", "--model", str(student), "--out", str(tmp_path / "r"), "--window-baseline", "4",
               "--suite", "quality", "--tasks", ""])
    assert rc != 0 and not (tmp_path / "r").exists()
    assert "RetNet" in capsys.readouterr().err


def test_energy_estimate_is_labelled(tiny_pair, tiny_data, tmp_path, monkeypatch):
    """Without a counter, --assumed-watts gives an estimate that cannot pass for a measurement."""
    import retconvert.eval.energy as energy

    monkeypatch.setenv("RETCONVERT_DATA", str(tiny_data))
    monkeypatch.setattr(energy, "find_meter", lambda device: (None, "no energy counter: test"))
    teacher, student = tiny_pair
    out = tmp_path / "r"
    assert main(["eval", "--model", str(teacher), "--model", str(student), "--suite", "energy,memory",
                 "--out", str(out), "--contexts", "16,32", "--energy-context", "16", "--energy-steps", "2",
                 "--assumed-watts", "10"]) == 0
    results = json.loads((out / "results.json").read_text())
    for m in results["models"]:
        e = m["results"]["energy"]
        assert e["status"] == "estimate" and "joules_per_token" not in e and e["estimated_joules_per_token"] > 0
    assert "ESTIMATE" in (out / "report.md").read_text()
    # A second run into the same folder needs --force; the old report stays intact.
    assert main(["eval", "--model", str(teacher), "--suite", "memory", "--out", str(out)]) == 2
    assert (out / "results.json").is_file()


def test_rapl_wraparound(tmp_path):
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "max_energy_range_uj").write_text("1000000\n")
    (d / "energy_uj").write_text("900000\n")
    meter = RaplMeter([d])
    start = meter.read()
    (d / "energy_uj").write_text("100000\n")
    assert meter.joules_between(start, meter.read()) == pytest.approx(0.2)


def test_cache_bytes_and_peak_rss():
    from retconvert.models import RetNetState

    state = RetNetState(2)
    state.states = [torch.zeros(1, 2, 3, 4), None]
    assert cache_nbytes(state) == 96
    import mmap

    with PeakRSS() as peak:
        # Fresh anonymous pages, touched: unlike a tensor, they cannot come from memory the
        # allocator kept after earlier tests freed it, so RSS must rise by 16 MB.
        block = mmap.mmap(-1, 16_000_000)
        block.write(b"\x01" * len(block))
    block.close()
    assert peak.reason is not None or peak.peak - peak.baseline >= 8_000_000


def test_lm_eval_cli_loads_checkpoint(tiny_pair, tiny_data, tmp_path):
    """A converted checkpoint evaluates with plain `lm_eval --model hf ... trust_remote_code=True`."""
    _, student = tiny_pair
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    materialize(["piqa"], tiny_data, tasks)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    code = ("import sys; from lm_eval.__main__ import cli_evaluate; sys.argv = ['lm_eval'] + sys.argv[1:]; "
            "cli_evaluate()")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--model", "hf", "--model_args",
         f"pretrained={student},trust_remote_code=True", "--tasks", "retconvert_piqa", "--include_path",
         str(tasks), "--limit", "4", "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retconvert_piqa" in proc.stdout and "acc" in proc.stdout, proc.stdout[-2000:]


def test_bad_inputs_fail_cleanly(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "neither an existing folder" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--suite", "quality,speeed", "--out", str(tmp_path / "r")]) == 2
    assert "unknown suite speeed" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--ppl-window", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--ppl-window 1 must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_reports_show_home_paths_as_tilde(tmp_path, monkeypatch):
    """A model folder under the home folder appears as ~/... in results.json and report.md, so
    a committed report does not carry the machine's home; names and other paths are unchanged."""
    from retconvert.paths import display_path

    monkeypatch.setenv("HOME", str(tmp_path))
    assert display_path(str(tmp_path / "runs" / "w64-step140")) == "~/runs/w64-step140"
    for spec in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "/opt/models/x", str(tmp_path), "relative/dir"):
        assert display_path(spec) == spec
