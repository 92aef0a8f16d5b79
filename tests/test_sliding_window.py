"""Teachers with sliding-window attention (Mistral, Qwen2/3, Phi-3, Gemma 2/3) converted with
`--window teacher`: each sliding layer keeps the teacher's window as its retention window, each
global layer becomes pure retention. Tiny random teachers built from their configs.

The window is the teacher's exactly: with the decayed part switched off (gamma ~ 0, no sink),
a kept layer computes the teacher's sliding-window attention at every position, also past the
window, so a window one token too long or too short fails; Gemma 2's soft-capped scores too.
"""

import json

import pytest
import torch
from test_families import GQA, TINY
from tiny import assert_close, assert_loads_with_remote_code, save_teacher, tiny_llama, tiny_text, write_jsonl
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config

from retconvert.cli import main as cli
from retconvert.convert.families import teacher_windows
from retconvert.convert.student import ConvertOptions, build_student
from retconvert.errors import RetconvertError
from retconvert.models.modeling_retnet import CACHE_NAME

W = 4  # the teachers' sliding window: shorter than the test sequences
GEMMA3 = dict(**TINY, **GQA, query_pre_attn_scalar=24, sliding_window=W, rope_local_base_freq=10000.0,
              rope_theta=1000000.0)
TEACHERS = {  # name: (config, the windows `--window teacher` must give)
    "mistral": (lambda: MistralConfig(**TINY, **GQA, sliding_window=W), [W, W]),
    "phi3": (lambda: Phi3Config(**TINY, **GQA, sliding_window=W), [W, W]),
    # the layers from max_window_layers on slide (three layers, so that a sliding one is not the last)
    "qwen3": (lambda: Qwen3Config(**dict(TINY, num_hidden_layers=3), **GQA, use_sliding_window=True,
                                  sliding_window=W, max_window_layers=1), [0, W, W]),
    "gemma2": (lambda: Gemma2Config(**TINY, **GQA, query_pre_attn_scalar=24, sliding_window=W), [W, 0]),
    "gemma3_text": (lambda: Gemma3TextConfig(**GEMMA3, layer_types=["sliding_attention", "full_attention"]), [W, 0]),
    "gemma3_text-all-local": (lambda: Gemma3TextConfig(**GEMMA3, layer_types=["sliding_attention"] * 2), [W, W]),
}


def make_teacher(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(TEACHERS[name][0]()).eval()


def switch_off_decayed_part(student):
    """gamma = 1e-6: a token past the window weighs gamma^W ~ 1e-24; the sink weight stays 0."""
    with torch.no_grad():
        for block in student.model.layers:
            block.retention.decay_logit.fill_(float(torch.logit(torch.tensor(1e-6))))
            assert not block.retention.sink_weight.any()


@pytest.mark.parametrize("name", list(TEACHERS))
def test_teacher_windows_land_on_the_sliding_layers(name):
    teacher = make_teacher(name)
    want = TEACHERS[name][1]
    assert teacher_windows(teacher.config) == want
    student = build_student(teacher, ConvertOptions(window="teacher"))
    assert student.config.layer_windows == want
    default = build_student(teacher, ConvertOptions()).config
    assert default.layer_windows == [0] * len(want)  # the default stays pure retention
    assert build_student(teacher, ConvertOptions(window=8)).config.layer_windows == [8] * len(want)


@torch.no_grad()
@pytest.mark.parametrize("name", list(TEACHERS))
def test_a_kept_window_computes_the_teachers_sliding_attention(name):
    """Each kept layer's output equals the teacher's layer output at every position (T = 3 W),
    given the teacher's input to that layer: the window is the teacher's, no longer and no shorter. Where every
    layer slides, the logits are the teacher's."""
    teacher = make_teacher(name)
    student = build_student(teacher, ConvertOptions(window="teacher")).eval()
    switch_off_decayed_part(student)
    ids = torch.randint(3, 128, (2, 3 * W))
    hidden = teacher(ids, output_hidden_states=True).hidden_states  # hidden[i]: the input of layer i
    pos = torch.arange(3 * W).expand(2, 3 * W)
    last = len(student.model.layers) - 1
    for i, w in enumerate(student.config.layer_windows):
        if w and i < last:  # the last hidden state is after the final norm
            got, _ = student.model.layers[i](hidden[i], pos, output_final_state=False)
            assert_close(got, hidden[i + 1], what=f"{name} layer {i}")
    if all(student.config.layer_windows):
        assert_close(student(ids).logits, teacher(ids).logits, what=f"{name} logits")
        # one token longer or shorter is another function: the test above can fail
        for other in (W - 1, W + 1):
            off = build_student(teacher, ConvertOptions(window=other)).eval()
            switch_off_decayed_part(off)
            assert not torch.allclose(off(ids).logits, teacher(ids).logits, rtol=1e-4, atol=1e-4), other


def assert_decodes_as_parallel(student, ids, what: str):
    """Decoding from the state after a 3-token prefill, through the modules and the packed decoder
    (where it covers the family), gives the parallel form's logits at every step."""
    from retconvert.models.decoding_retnet import RetNetDecoder

    want = student(ids, use_cache=False).logits
    state = student(ids[:, :3], use_cache=True)[CACHE_NAME]
    for t in range(3, ids.shape[1]):
        out = student(ids[:, t:t + 1], use_cache=True, **{CACHE_NAME: state})
        assert_close(out.logits[:, 0], want[:, t], what=f"{what} step {t}")
        state = out[CACHE_NAME]
    if RetNetDecoder.supports(student.config):
        decoder = student.packed_decoder(batch_size=ids.shape[0])
        decoder.prefill(ids[:, :3])
        for t in range(3, ids.shape[1]):
            assert_close(decoder.step(ids[:, t]), want[:, t], what=f"{what} packed step {t}")


@torch.no_grad()
@pytest.mark.parametrize("name", ["mistral", "gemma3_text"])
def test_first_position_logits_and_decoding(name):
    """Over one token the student returns the teacher's logits (the window's softmax over the
    token itself, the global layers' normalised retention with b large), and decoding from the
    state (modules, and the packed decoder where it covers the family) equals the parallel form."""
    teacher = make_teacher(name)
    student = build_student(teacher, ConvertOptions(window="teacher")).eval()
    for block in student.model.layers:
        block.retention.score_bias.fill_(1e3)
    first = torch.randint(3, 128, (4, 1))
    assert_close(student(first).logits, teacher(first).logits, what=f"{name} first position")
    for block in student.model.layers:
        block.retention.score_bias.fill_(1.0)
    assert_decodes_as_parallel(student, torch.randint(3, 128, (2, 3 * W)), name)


CAP = 5.0  # the teacher's attn_logit_softcapping (Gemma 2's is 50)


def gemma2_with_large_scores():
    """A Gemma 2 teacher (window W on layer 0, global layer 1) whose attention scores reach several
    times its soft-cap: q and k weights scaled by 30 (a random tiny model's scores are ~0.02, where
    tanh is the identity and a missing cap goes unnoticed)."""
    torch.manual_seed(0)
    config = Gemma2Config(**TINY, **GQA, query_pre_attn_scalar=24, sliding_window=W, attn_logit_softcapping=CAP)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    return teacher


@torch.no_grad()
def test_a_kept_gemma2_window_soft_caps_its_scores_as_the_teacher():
    """The teacher's attn_logit_softcapping becomes the window's: with the decayed part switched off,
    the kept layer equals the teacher's soft-capped sliding attention at every position in every
    form; without the cap it does not."""
    teacher = gemma2_with_large_scores()
    student = build_student(teacher, ConvertOptions(window="teacher")).eval()
    assert student.config.window_logit_softcapping == CAP and student.config.layer_windows == [W, 0]
    switch_off_decayed_part(student)
    ids = torch.randint(3, 128, (2, 3 * W))
    hidden = teacher(ids, output_hidden_states=True).hidden_states  # hidden[i]: the input of layer i
    pos = torch.arange(3 * W).expand(2, 3 * W)
    layer = student.model.layers[0]
    q, k, _ = layer.retention.project(layer.input_layernorm(hidden[0]), pos)
    assert torch.einsum("bthd,bshd->bhts", q, k).abs().max() > 3 * CAP  # the cap bends the teacher's scores
    for mode in ("parallel", "chunkwise", "recurrent"):
        student.config.retention_mode = mode
        got, _ = layer(hidden[0], pos, output_final_state=False)
        for t in range(3 * W):
            assert_close(got[:, t], hidden[1][:, t], what=f"gemma2 layer 0, {mode}, position {t}")
    student.config.window_logit_softcapping = None  # the same window with raw scores: another function
    got, _ = layer(hidden[0], pos, output_final_state=False)
    assert not torch.allclose(got, hidden[1], rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_soft_capped_gemma2_student_forms_and_decoding_agree():
    """With the cap active and the decayed part on (windows across 5-token chunks): parallel,
    chunkwise and recurrent logits agree, and so do decoding steps, modules and packed decoder."""
    student = build_student(gemma2_with_large_scores(), ConvertOptions(window="teacher", chunk_size=5)).eval()
    ids = torch.randint(3, 128, (2, 3 * W))
    student.config.retention_mode = "parallel"
    want = student(ids, use_cache=False).logits
    for mode in ("chunkwise", "recurrent"):
        student.config.retention_mode = mode
        assert_close(student(ids, use_cache=False).logits, want, what=f"gemma2 capped, {mode}")
    student.config.retention_mode = "chunkwise"
    assert_decodes_as_parallel(student, ids, "gemma2 capped")


@pytest.mark.parametrize("name", ["mistral", "gemma3_text", "gemma2-capped"])
def test_cli_keeps_the_window_and_the_checkpoint_loads_without_retconvert(name, tmp_path):
    """gemma2-capped: the soft-capped window is calibrated, saved and loads through remote code."""
    capped = name == "gemma2-capped"
    folder = save_teacher(gemma2_with_large_scores() if capped else make_teacher(name), tmp_path / name)
    calib = write_jsonl(tmp_path / "calib.jsonl", tiny_text())
    out = tmp_path / "student"
    assert cli(["from-hf", str(folder), "--out", str(out), "--window", "teacher", "--calib-data", str(calib),
                "--calib-tokens", "256", "--calib-seq-len", "64"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["retention_window"] == TEACHERS["gemma2" if capped else name][1]
    assert config["window_logit_softcapping"] == (CAP if capped else None)
    assert config["conversion"]["options"]["window"] == "teacher"
    report = json.loads((out / "conversion_report.json").read_text())
    assert "kept as each such layer's retention window with --window teacher" in report["family_notes"]
    assert all(0 <= layer["rel_error"] <= 1 + 1e-6 for layer in report["layers"])
    assert_loads_with_remote_code(out, tmp_path, torch.randint(3, 40, (2, 11)))


def test_window_teacher_without_a_sliding_layer_is_a_one_line_error(tmp_path, capsys):
    folder = save_teacher(tiny_llama(), tmp_path / "llama")
    out = tmp_path / "student"
    assert cli(["from-hf", str(folder), "--out", str(out), "--window", "teacher"]) == 2
    err = capsys.readouterr().err
    assert "this llama teacher has no sliding-window layer" in err and "--window" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1 and not out.exists()
    qwen3 = AutoModelForCausalLM.from_config(Qwen3Config(**TINY))  # without use_sliding_window: global layers
    with pytest.raises(RetconvertError, match="this qwen3 teacher has no sliding-window layer"):
        build_student(qwen3, ConvertOptions(window="teacher"))


def test_window_per_layer_option():
    """--window W0,W1,...: one window per layer, 0 for pure retention; checked against the teacher."""
    from retconvert.cli import build_parser

    args = build_parser().parse_args(["from-hf", "x", "--window", "4,0"])
    assert args.window == [4, 0] and build_parser().parse_args(["from-hf", "x", "--window", "4"]).window == 4
    teacher = make_teacher("mistral")
    assert build_student(teacher, ConvertOptions(window=[0, 6])).config.layer_windows == [0, 6]
    with pytest.raises(RetconvertError, match="gives 3 windows for a teacher of 2 layers"):
        build_student(teacher, ConvertOptions(window=[4, 0, 4]))
    with pytest.raises(RetconvertError, match=r"--window \[4, -1\] must be 0"):
        ConvertOptions(window=[4, -1]).validate()


def test_bad_window_values_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse: one error line, status 2
        cli(["from-hf", "smollm2-135m", "--window", "wide"])
    assert exit_.value.code == 2
    assert "'wide' is not a window; give a token count such as 64, 0 for a pure RetNet, one per layer" in \
        capsys.readouterr().err
    with pytest.raises(RetconvertError, match="--window -2 must be 0"):
        ConvertOptions(window=-2).validate()
