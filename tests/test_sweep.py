"""The sweep as the RetNet-vs-Transformer study (distill/sweep.py with a `study:` section,
eval/study.py): the run plan, bad specs, equal-parameter pairing, the report's verdicts, and an
interrupted study (SIGKILL after one run) resumed without redoing the finished run."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from retconvert.distill.config import ConfigError
from retconvert.distill.sweep import check_sweep, main, run_configs, sweep
from retconvert.errors import RetconvertError
from retconvert.eval.study import findings
from tiny import tiny_text, tiny_tokenizer, write_jsonl


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training text, a tokenizer folder and an offline data folder (held-out C4, WikiText-2)."""
    root = tmp_path_factory.mktemp("study-data")
    write_jsonl(root / "train.jsonl", tiny_text(60, 80, seed=0))
    (root / "c4").mkdir()
    write_jsonl(root / "c4" / "c4_heldout.jsonl", tiny_text(8, 80, seed=1))
    (root / "ppl").mkdir()
    (root / "ppl" / "wikitext-2-raw-test.txt").write_text("\n".join(tiny_text(8, 40, seed=2)) + "\n")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    return root


def study_spec(data: Path, out: Path, **study) -> dict:
    spec = {
        "out_dir": str(out),
        "overrides": [
            "model.teacher=null", f"model.tokenizer={data / 'tokenizer'}", f"data.train=[{data / 'train.jsonl'}]",
            "data.eval=[]", "data.seq_len=16", "data.shuffle_buffer=4", "model.scratch.num_layers=1",
            "model.scratch.hidden_size=16", "model.scratch.num_heads=2", "model.scratch.intermediate_size=32",
            "stage2.steps=3", "stage2.warmup_steps=1", "run.log_every=1", "run.checkpoint_every=0",
            "run.progress=false", "run.tensorboard=false", "run.threads=1"],
        "grid": {"stage2.lr": [0.003, 0.01], "data.seq_len": [16, 32]},
        "study": {"seeds": [0], "design": "one_at_a_time", "center": {"stage2.lr": 0.003, "data.seq_len": 16},
                  "tokens_per_step": 64,
                  "measure": {"contexts": [8, 24], "decode_steps": 1, "decode_warmup": 1, "ppl_tokens": 128,
                              "ppl_batch_size": 4, "position_docs": 1, "energy_context": 8, "energy_steps": 2,
                              "energy_repeats": 1, "zero_shot_points": []}},
    }
    spec["study"].update(study)
    return check_sweep(spec)


def test_study_plan(data, tmp_path):
    """One key at a time around the centre, both architectures per point, seeds outermost, the
    equal-parameter Transformer after the centre pair, tokens per step fixed across lengths."""
    runs = run_configs(study_spec(data, tmp_path, seeds=[0, 1], equal_params=True))
    ids = [r.run_id for r in runs]
    per_seed = ["center/retnet", "center/llama", "center/llama-equal-params", "stage2.lr=0.01/retnet",
                "stage2.lr=0.01/llama", "data.seq_len=32/retnet", "data.seq_len=32/llama"]
    assert ids == [f"{p}/seed{s}" for s in (0, 1) for p in per_seed]
    assert [r.index for r in runs] == list(range(len(runs)))
    for r in runs:
        assert r.cfg.model.scratch.arch == r.arch and r.cfg.run.seed == r.seed
        assert r.cfg.stage2.micro_batch_size * r.cfg.data.seq_len == 64
    long = next(r for r in runs if r.point == "data.seq_len=32")
    assert long.cfg.data.seq_len == 32 and long.cfg.stage2.micro_batch_size == 2 and long.cfg.stage2.lr == 0.003
    assert len({r.cfg.run.out_dir for r in runs}) == len(runs)
    product = run_configs(study_spec(data, tmp_path, design="product", center=None))
    assert len(product) == 2 * 2 * 2  # 4 points x 2 architectures


@pytest.mark.parametrize("change, message", [
    ({"design": "one_at_a_time", "center": {"stage2.lr": 0.003}}, "study.center must give one value for each"),
    ({"seeds": [0, 0]}, "repeated seed"),
    ({"tokens_per_step": 40}, "not a multiple of data.seq_len"),
    ({"archs": ["retnet"], "equal_params": True}, "needs both retnet and llama"),
    ({"measure": {"zero_shot_points": ["centre"]}}, "zero_shot_points: no point 'centre'"),
    ({"measure": {"contexts": [0]}}, "contexts must be positive"),
    ({"bogus": 1}, "unknown key study.bogus"),
])
def test_bad_study_specs(data, tmp_path, change, message):
    with pytest.raises(RetconvertError, match=message) as e:
        run_configs(study_spec(data, tmp_path, **change))
    assert "\n" not in str(e.value)


def test_architecture_in_the_grid_is_refused(data, tmp_path):
    spec = study_spec(data, tmp_path)
    spec["grid"]["model.scratch.arch"] = ["retnet", "llama"]
    with pytest.raises(ConfigError, match="drop grid.model.scratch.arch"):
        check_sweep(spec)


def test_study_kill_and_resume(data, tmp_path, monkeypatch):
    """SIGKILLed after its first run, the study resumes: that row is kept as it was (not redone),
    the rest run, and results.json, report.md and the plots hold every run."""
    out = tmp_path / "study"
    spec = study_spec(data, out, equal_params=True, tokenizer_vocab=300, tokenizer_chars=20000)
    spec["grid"] = {"stage2.lr": [0.003]}  # the centre alone: RetNet, Transformer, equal-parameter Transformer
    spec["study"]["center"] = {"stage2.lr": 0.003}
    path = tmp_path / "study.yaml"
    path.write_text("# retconvert sweep\n" + yaml.safe_dump(spec))
    env = {**os.environ, "RETCONVERT_DATA": str(data), "RETCONVERT_TEST_HANG_AFTER_RUN": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "retconvert.distill.sweep", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    results = out / "results.json"
    try:
        deadline = time.time() + 120
        while not (results.is_file() and len(json.loads(results.read_text())) == 1):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the first run did not finish in 120 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = json.loads(results.read_text())[0]
    assert first["run_id"] == "center/retnet/seed0" and not (out / "report.md").exists()

    monkeypatch.setenv("RETCONVERT_DATA", str(data))
    monkeypatch.setattr("retconvert.eval.speed.SETTLE_S", 0.0)  # no pauses between timing blocks
    logged = []
    rows = sweep(check_sweep(yaml.safe_load(path.read_text())), log=logged.append)
    assert any("center/retnet/seed0 finished before, skipped" in line for line in logged)
    assert rows[0] == first  # kept, not redone
    assert [r["run_id"] for r in rows] == ["center/retnet/seed0", "center/llama/seed0",
                                          "center/llama-equal-params/seed0"]
    assert json.loads(results.read_text()) == rows
    for r in rows:
        assert r["tokens"] == 3 * 64 and math.isfinite(r["final_loss"]) and r["params"] > 0
        assert r["ppl_c4"] > 1 and r["ppl_wikitext2"] > 1 and r["train_s"] > 0 and r["train_tokens_per_s"] > 0
        assert [p["context_tokens"] for p in r["decode"]["module"]] == [8, 24]
        assert ("packed" in r["decode"]) == (r["arch"] == "retnet")
        assert r["energy"]["status"] in ("measured", "estimate") and r["loss_curve"][-1][1] == r["tokens"]
    cache = {r["arch"]: [p["cache_bytes"] for p in r["memory"]] for r in rows[:2]}
    assert cache["retnet"][0] == cache["retnet"][1] and cache["llama"][1] == 3 * cache["llama"][0]
    # the equal-parameter Transformer: FFN widened until its count is nearest the RetNet's
    retnet, llama, equal = rows[:3]
    assert llama["params"] < retnet["params"] and equal["model.scratch.intermediate_size"] > 32
    assert abs(equal["params"] - retnet["params"]) <= 3 * 16 // 2  # one FFN unit adds 3 x hidden
    assert len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]) == 300
    report = (out / "report.md").read_text()
    assert "RetNet trains in about 80% of the Transformer's time" in report and "(ESTIMATE)" in report
    assert (out / "loss_vs_time.png").is_file() and (out / "decode_vs_context.png").is_file()

    (out / "report.md").unlink()
    assert main([str(path), "--report-only"]) == 0 and (out / "report.md").read_text() == report
    assert json.loads(results.read_text()) == rows  # nothing ran

    # a finished row made with other settings is refused, not silently mixed in
    spec["overrides"].append("stage2.steps=4")
    with pytest.raises(RetconvertError, match="holds run center/retnet/seed0 with other settings"):
        sweep(check_sweep(spec), log=quiet)


def _row(point, arch, seed, train_s, loss, growth, gain):
    buckets = [{"start_position": 0, "end_position": 16, "nll": loss + 1}, {"start_position": 16, "end_position": 32,
               "nll": loss + gain}, {"start_position": 32, "end_position": 64, "nll": loss}]
    curve = [[0.0, 0, loss + 1], [train_s / 2, 100, loss + 0.5], [train_s, 200, loss]]  # steady throughput
    return {"point": point, "arch": arch, "seed": seed, "train_s": train_s, "final_loss_avg": loss, "loss_curve": curve,
            "ppl_c4": math.exp(loss), "position_loss": buckets,
            "decode": {"module": [{"context_tokens": 16, "latency_ms": 1.0},
                                  {"context_tokens": 1024, "latency_ms": 1.0 + growth}]}}


def test_findings_verdicts():
    """The claim-by-claim verdicts follow the numbers: a RetNet 20% faster with a higher loss, a
    flat decode and a smaller gain from context confirms all but the size of the loss gap; with
    the architectures swapped, none holds."""
    rows = []
    for seed, jitter in enumerate((0.0, 0.01, -0.01)):
        for point, better in (("center", 0.0), ("lr=0.01", 0.2)):
            rows.append(_row(point, "retnet", seed, 8.0 + jitter, 5.5 + jitter - better, 0.01, 0.1 + jitter))
            rows.append(_row(point, "llama", seed, 10.0, 5.0 - better, 0.5, 0.3))
    got = findings(rows, [16, 1024])
    assert [f["verdict"].split(" (")[0] for f in got] == [
        "holds", "holds in direction", "not comparable at this scale", "holds", "holds"]
    assert "over 6 pairs): 0.80 ± 0.00 from each run's least-contended" in got[0]["here"]
    assert "not reproduced" in got[1]["verdict"]
    assert "best RetNet by held-out C4 perplexity: lr=0.01" in got[2]["here"]
    assert "RetNet +1.0% (per run +1.0% ± 0.0)" in got[3]["here"] and "Transformer +50.0%" in got[3]["here"]
    swapped = [{**r, "arch": {"retnet": "llama", "llama": "retnet"}[r["arch"]]} for r in rows]
    assert [f["verdict"].split(" (")[0] for f in findings(swapped, [16, 1024])] == [
        "does not hold", "does not hold", "not comparable at this scale", "does not hold", "does not hold"]


def test_fast_throughput_ignores_contended_intervals():
    """Intervals slowed by other processes do not lower the throughput the comparison uses."""
    from retconvert.eval.study import fast_tokens_per_s

    curve = [[float(i), 100 * i, 5.0] for i in range(11)]  # 100 tokens/s ...
    curve[5:] = [[t + 9.0, tok, loss] for t, tok, loss in curve[5:]]  # ... one interval 10x slower
    assert fast_tokens_per_s({"loss_curve": curve}) == pytest.approx(100.0)
    assert fast_tokens_per_s({"loss_curve": curve}, quantile=0.0) == pytest.approx(10.0)
    assert fast_tokens_per_s({"loss_curve": curve[:1]}) is None


def test_fingerprint_ignores_fields_at_their_default(data, tmp_path):
    """A row stays valid when the config schema later gains a field at its default; any changed
    setting, default or not, changes the fingerprint."""
    from retconvert.distill.sweep import config_sha

    cfg = run_configs(study_spec(data, tmp_path))[0].cfg
    older = cfg.to_dict()
    del older["stage2"]["lora_alpha"]  # as written before that field existed
    assert config_sha(older) == config_sha(cfg)
    changed = cfg.to_dict()
    changed["stage2"]["lora_alpha"] += 1
    assert config_sha(changed) != config_sha(cfg)
    moved = cfg.to_dict()
    moved["run"]["out_dir"] = "elsewhere"
    assert config_sha(moved) == config_sha(cfg)
