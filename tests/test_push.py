"""`retconvert push`: validation, the dry-run plan, the model card, the token, and the upload.

Nothing here touches the network: uploads go to a fake HfApi that copies the files it is
given (respecting the patterns) into a folder, and the real client is only ever run with
HF_HUB_OFFLINE=1.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import retconvert  # noqa: F401  (registers the Auto classes: save_pretrained writes auto_map and the code)
from retconvert import hub
from retconvert.cli import build_parser, main
from retconvert.errors import RetconvertError

TOKEN = "hf_FAKEtokenDoNotPrint0123456789abcdef"
TEACHER = "acme/tiny-llama"


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny converted checkpoint, as `retconvert from-hf` lays it out (without a tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retconvert.convert.convert import ConvertOptions, build_student

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )).eval()
    options = ConvertOptions()
    student = build_student(teacher, options).eval()
    student.config.conversion = {"teacher": TEACHER, "source": TEACHER, "options": vars(options),
                                 "retconvert_version": retconvert.__version__}
    out = tmp_path_factory.mktemp("built") / "tiny-retnet"
    student.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text("---\nbase_model: x\n---\n# the conversion's own card\n")
    (out / "conversion_report.json").write_text(json.dumps({"family": "llama", "mean_rel_error": 0.125}))
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
                "model.safetensors", "generation_config.json", "conversion_report.json", "README.md"}
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
    assert "0.125" in card  # the conversion report's mean relative error
    assert '"chunk_size"' in card or "`chunk_size`" in card


def test_card_with_distillation_license_and_eval_report(ckpt, tmp_path):
    from huggingface_hub import ModelCard

    config = json.loads((ckpt / "config.json").read_text())
    config["conversion"]["license"] = "apache-2.0"
    config["distillation"] = {"tokens_seen": 123_456_789, "stages": [{"name": "logits", "tokens": 100_000_000,
                                                                       "lr": 3e-4}, {"name": "long", "tokens": 23_456_789}],
                              "temperature": 2.0}
    (ckpt / "config.json").write_text(json.dumps(config))
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.json").write_text(json.dumps(REPORT))

    card = hub.plan_push(ckpt, "alice/tiny-retnet", eval_report=report, hashes=False).card
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert meta["base_model"] == TEACHER and "distillation" in meta["tags"]
    results = ModelCard(card).data.eval_results  # the Hub's own parser of model-index
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    assert got == {("wikitext2", "perplexity"): 17.5, ("hellaswag", "acc"): 0.3875}
    assert meta["model-index"][0]["name"] == "tiny-retnet"
    body = card.split("---\n", 2)[2]
    assert "| wikitext2 | perplexity | 11.250 | 17.500 |" in body  # teacher, then this model
    assert "| hellaswag | accuracy | 0.4125 | 0.3875 |" in body
    assert "| hellaswag | normalized accuracy | 0.5000 | — |" in body
    assert "123,456,789" in body and "Not distilled" not in body and "temperature" in body
    assert "| passkey.4096.acc | 1.000 | 0.250 |" in body and "not measured" not in body.lower()


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
    import retconvert.convert.convert as convert_mod
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
