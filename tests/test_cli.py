"""`retconvert distill` and `retconvert sweep`: the recipe and the grid sweep as CLI verbs, on a
tiny random Llama teacher (`distill/train.py` itself is exercised by tests/test_distill.py)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import save_teacher, tiny_distill_overrides, tiny_llama, tiny_text, write_jsonl

from retconvert.cli import main
from retconvert.errors import RetconvertError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A teacher folder, training text and held-out text."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_teacher(tiny_llama(), root / "teacher")
    write_jsonl(root / "train.jsonl", tiny_text(60, seed=1))
    write_jsonl(root / "heldout.jsonl", tiny_text(8, seed=2))
    return root


def overrides(root: Path, out: Path, **extra) -> list:
    return tiny_distill_overrides(root / "teacher", root / "train.jsonl", root / "heldout.jsonl", out, **extra)


def test_distill_verb_runs_the_recipe(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *overrides(root, out)]) == 0
    assert f"wrote {out / 'final'}" in capsys.readouterr().out
    record = json.loads((out / "final" / "distillation.json").read_text())
    assert [s["steps"] for s in record["stages"]] == [2, 3]
    assert main(["distill", *overrides(root, out)]) == 2  # an earlier run is not overwritten silently
    assert "holds an earlier run; pass --resume" in capsys.readouterr().err


def test_distill_verb_reads_a_config_file(root, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"run": {"seed": 7}}))  # overrides take precedence over the file
    assert main(["distill", "--config", str(config), *overrides(root, tmp_path / "run", **{"stage1.steps": 0})]) == 0
    record = json.loads((tmp_path / "run" / "final" / "distillation.json").read_text())
    assert record["run"]["seed"] == 7 and [s["steps"] for s in record["stages"]] == [3]
    capsys.readouterr()
    assert main(["distill", "--config", str(config), "stage2.nonsense=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nonsense" in err[0]


def test_bad_convert_option_writes_nothing(root, tmp_path, capsys):
    """model.convert is checked when the config loads (named as written there); an option only a
    built model can check fails before the out folder is created; then a correct run starts clean."""
    out = tmp_path / "run"
    assert main(["distill", *overrides(root, out, **{"model.convert.window": "abc"})]) == 2
    assert _error_line(capsys).startswith("error: model.convert.window abc must be 0")
    assert main(["distill", *overrides(root, out, **{"model.convert.window": "[4, 0, 4]"})]) == 2  # 2 layers
    assert "3 windows for a teacher of 2 layers" in capsys.readouterr().err
    assert not out.exists()
    assert main(["distill", *overrides(root, out, **{"stage1.steps": 0, "stage2.steps": 1})]) == 0


def test_sweep_verb_runs_every_grid_point(root, tmp_path, capsys):
    spec = {"out_dir": str(tmp_path / "sweep"), "grid": {"stage2.lr": [0.001, 0.003]},
            "overrides": overrides(root, tmp_path / "unused", **{"stage1.steps": 0, "stage2.steps": 1})}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path)]) == 0
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [r["stage2.lr"] for r in rows] == [0.001, 0.003]
    assert "| run | stage2.lr |" in capsys.readouterr().out
    path.write_text(yaml.safe_dump({**spec, "grid": {}}))
    assert main(["sweep", str(path)]) == 2
    assert "grid must map dotted keys to lists" in capsys.readouterr().err


def _error_line(capsys) -> str:
    """The one stderr line a refused command printed."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_force_replaces_only_this_tools_output(root, tmp_path, capsys):
    """--force never deletes a plain file or a folder that is not an earlier output of the same kind."""
    from tiny import tiny_model

    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    unrelated = tmp_path / "home"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("mine")
    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    capsys.readouterr()
    for out in (plain, unrelated):
        for force in (["--force"], []):  # without --force, the error does not suggest it
            assert main(["from-hf", str(root / "teacher"), "--out", str(out), *force]) == 2
            line = _error_line(capsys)
            assert f"{out} already exists and is" in line and "choose another --out" in line
            assert "pass --force" not in line
        assert main(["export", str(ckpt), "--format", "torchscale", "--out", str(out), "--force"]) == 2
        assert f"{out} already exists and is" in _error_line(capsys)
        assert main(["eval", "--model", str(root / "teacher"), "--out", str(out), "--force"]) == 2
        assert f"{out} already exists and is" in _error_line(capsys)
    assert plain.read_text() == "mine" and (unrelated / "thesis.tex").read_text() == "mine"
    # A checkpoint is not an export (an earlier export is replaced: tests/test_torchscale.py).
    assert main(["export", str(ckpt), "--format", "torchscale", "--out", str(root / "teacher"), "--force"]) == 2
    assert "is not a torchscale export" in _error_line(capsys)
    assert (root / "teacher" / "config.json").is_file()


def test_atomic_output_dir_refuses_foreign_folders(tmp_path):
    from retconvert.paths import atomic_output_dir

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(RetconvertError, match="is not a RetNet checkpoint"):
        with atomic_output_dir(folder, force=True):
            pass
    (folder / "config.json").write_text('{"model_type": "retnet"}')
    with atomic_output_dir(folder, force=True) as tmp:
        (tmp / "config.json").write_text('{"model_type": "retnet", "new": 1}')
    assert json.loads((folder / "config.json").read_text())["new"] == 1


def test_bad_devices_and_export_sources_are_one_line(root, tmp_path, capsys, monkeypatch):
    """--device / run.device are checked (retconvert.device.check_device) before anything loads;
    export names a missing folder and a folder that is not a RetNet checkpoint."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    teacher = str(root / "teacher")
    for device, problem in (("gpu", "--device 'gpu' is not a device; use cpu, cuda"),
                            ("cuda", "--device cuda: no CUDA device is available")):
        assert main(["from-hf", teacher, "--out", str(tmp_path / "s"), "--device", device]) == 2
        assert problem in _error_line(capsys)
        assert main(["eval", "--model", teacher, "--out", str(tmp_path / "r"), "--device", device]) == 2
        assert problem in _error_line(capsys)
        assert main(["distill", *overrides(root, tmp_path / "run", **{"run.device": device})]) == 2
        assert problem.replace("--device", "run.device") in _error_line(capsys)
    assert not [p.name for p in tmp_path.iterdir()]
    missing = tmp_path / "missing"
    assert main(["export", str(missing), "--format", "torchscale", "--out", str(tmp_path / "ts")]) == 2
    assert f"checkpoint folder {missing} does not exist" in _error_line(capsys)
    assert main(["export", teacher, "--format", "torchscale", "--out", str(tmp_path / "ts")]) == 2
    assert f"{teacher} is not a RetNet checkpoint" in _error_line(capsys)


@pytest.mark.parametrize("source, name", [
    ("meta-llama/Llama-3.2-1B", "Llama-3.2-1B"), ("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"),
    ("smollm2-135m", "smollm2-135m"), ("models/SmolLM2.Q4_1.gguf", "SmolLM2.Q4_1"), ("teachers/gpt2/", "gpt2")])
def test_default_output_keeps_the_whole_name(source, name):
    from retconvert.cli import default_out

    assert default_out(source) == Path("outputs") / f"{name}-retnet"


def test_unknown_eval_task_fails_before_anything_runs(root, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--model", str(root / "teacher"), "--out", str(out), "--suite", "quality",
                 "--tasks", "piqa,arc_eazy"]) == 2
    line = _error_line(capsys)
    assert "lm-eval has no task arc_eazy" in line and "did you mean" in line and "arc_easy" in line
    assert not out.exists()


@pytest.mark.parametrize("offline", [True, False])
def test_mistyped_name_without_the_hub_fails_at_once(offline, tmp_path, capsys, monkeypatch):
    """Not a path, not a built-in, not cached: offline (HF_HUB_OFFLINE) or with the Hub
    unreachable (one request), one line listing the built-in names, without transformers' retries."""
    import time

    import huggingface_hub.utils
    import transformers
    from huggingface_hub import constants

    def unreachable():
        class Session:
            def head(self, url, timeout):
                raise OSError("Name or service not known")
        return Session()

    monkeypatch.setattr(constants, "is_offline_mode", lambda: offline)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", unreachable)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("went to the Hub"))
    start = time.time()
    assert main(["from-hf", "smollm2-360m", "--out", str(tmp_path / "s")]) == 2
    line = _error_line(capsys)
    assert time.time() - start < 5
    reason = "Hugging Face is offline here (HF_HUB_OFFLINE)" if offline else "cannot be reached"
    assert line.startswith("error: cannot download 'smollm2-360m'") and reason in line
    assert "built-in name (smollm2-135m)" in line
    assert main(["from-hf", "not a name!", "--out", str(tmp_path / "s")]) == 2
    assert "'not a name!' is not a folder, a GGUF file, a built-in name or a Hub ID" in _error_line(capsys)


def test_usage_errors_are_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["from-hf", "x", "--decay", "fitted"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["retconvert from-hf: error: argument --decay: invalid choice: 'fitted' (choose from 'retnet', "
                   "'calibrated'); see retconvert from-hf --help"]
    assert main(["distill"]) == 2
    assert "pass --config configs/distill/smollm2-135m.yaml" in _error_line(capsys)
    assert main(["distill", "--config", str(tmp_path / "nope.yaml")]) == 2
    line = _error_line(capsys)
    assert "nope.yaml not found; check the path (the shipped recipes: " in line
    assert "configs/distill/smollm2-135m.yaml" in line


def test_script_usage_errors_are_one_line(capsys):
    """distill/train.py, distill/sweep.py and the run report answer a bad flag as the CLI does."""
    from retconvert.distill import report, sweep, train

    for module, prog in ((train, "distill/train.py"), (sweep, "distill/sweep.py"),
                         (report, "python -m retconvert.distill.report")):
        with pytest.raises(SystemExit) as exit_:
            module.main(["--no-such-flag"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and err[0].endswith(f"see {prog} --help")
