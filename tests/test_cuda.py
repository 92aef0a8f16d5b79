"""The CUDA paths against the CPU ones: retention forms (ours and fla's kernels), windowed
retention, the model's three forms, generate(), the packed decoder, half precision, and the
distillation recipe. Every test here needs a CUDA device and is skipped without one (CI has
none); `bench/cuda_check.sh` runs them on a GPU machine, and docs/RESULTS.md ("CUDA") holds
what they found.

References are computed on the CPU (fp64 for the pure functions, fp32 for models), so a test
fails on a wrong CUDA path, not only on forms that disagree with each other on the GPU.
fla's Triton kernels multiply fp32 in TF32 (10-bit mantissa) by default: they are tested with
fp32 products at the fp32 tolerance, and as they run by default at a TF32 one.
"""

import pytest
import torch
from test_distill import make_fixture, tiny_overrides
from test_retention import GAMMAS, assert_close, check_half_precision, make_inputs, on, padded_mask, run
from test_window import check as check_window
from tiny import assert_close as assert_logits_close
from tiny import VARIANTS, random_ids, tiny_model

from retconvert.models.decoding_retnet import RetNetDecoder
from retconvert.models.retention import fla_kernels, retention, retention_naive

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# Our PyTorch forms on the GPU; fla's Triton kernels with fp32 products ("fla": TRITON_F32_DEFAULT
# =ieee, so that a wrong formula cannot hide in rounding), and as fla runs by default ("fla-tf32":
# Triton multiplies fp32 in TF32, a 10-bit mantissa).
BACKENDS = ["torch", "fla", "fla-tf32"]
TOL = {"torch": 1e-5, "fla": 1e-5, "fla-tf32": 2e-2}  # max error relative to the largest reference entry
MODEL_TOL = {"torch": 1e-4, "fla": 1e-4, "fla-tf32": 5e-2}  # logits, relative to the largest, after 2 layers
# (Triton reads TRITON_F32_DEFAULT when it compiles, and the precision is part of a kernel's cache
# key, so the two fla variants compile apart in one process; not yet seen on a GPU.)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """RETCONVERT_FLA (and Triton's fp32 precision) set for the test; fla's skipped where fla
    is not installed."""
    if request.param.startswith("fla") and fla_kernels() is None:
        pytest.skip("flash-linear-attention is not installed")
    monkeypatch.setenv("RETCONVERT_FLA", "0" if request.param == "torch" else "1")
    if request.param == "fla":
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    return request.param


# --------------------------------------------------------------------------------------------
# The pure functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 16), ("chunkwise", 64),
                                             ("recurrent", 1)])
def test_forms_on_cuda_match_the_fp64_reference(backend, mode, chunk_size, T):
    """Output, final state and the gradients of q, k, v and the initial state, odd lengths."""
    leaves = make_inputs(T, torch.float64, initial_state=True)
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    want = run(retention_naive, on(leaves, "cpu"), gamma)
    got = run(lambda q, k, v, g, **kw: retention(q, k, v, g, mode, chunk_size=chunk_size, **kw),
              on(leaves, CUDA, torch.float32), gamma.float().to(CUDA))
    tol = TOL[backend]
    assert_close("output", got[0].cpu(), want[0], tol)
    assert_close("final state", got[1].cpu(), want[1], tol)
    for name in want[2]:
        assert_close(f"d/d{name}", got[2][name].cpu(), want[2][name], tol)


@pytest.mark.parametrize("mode", ["chunkwise", "recurrent"])
def test_padding_on_cuda_matches_the_reference(backend, mode):
    """Pads inside, across chunk boundaries and at both ends leave the state as it was, on the
    GPU too (test_retention's masks)."""
    T = 29
    leaves = make_inputs(T, torch.float64, initial_state=True)
    mask = padded_mask(T)
    gamma = torch.tensor(GAMMAS, dtype=torch.float64)
    want = run(retention_naive, on(leaves, "cpu"), gamma, token_mask=mask)
    got = run(lambda q, k, v, g, **kw: retention(q, k, v, g, mode, chunk_size=8, **kw),
              on(leaves, CUDA, torch.float32), gamma.float().to(CUDA), token_mask=mask.to(CUDA))
    assert_close("output", got[0].cpu(), want[0], TOL[backend])
    assert_close("final state", got[1].cpu(), want[1], TOL[backend])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forms_on_cuda(backend, dtype):
    """bf16 / fp16 over 1,000 tokens with a slow decay: states in fp32, outputs finite and
    within the inputs' rounding of the fp64 reference."""
    check_half_precision(dtype, CUDA)


@pytest.mark.parametrize("T", [1, 30])
@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 5), ("recurrent", 1)])
def test_windowed_forms_on_cuda_match_the_fp64_reference(mode, chunk_size, T):
    """Windowed retention (our block kernel on every device): outputs, the four state parts
    and every gradient, against the naive definition on the CPU."""
    check_window(mode, chunk_size, T, W=4, dtype=torch.float32, device=CUDA)


def test_student_shapes_on_cuda(backend):
    """SmolLM2-135M's student shapes: 9 heads of 65 x 65 (the score-bias feature on q and k,
    the normaliser column on v), 300 tokens, chunkwise, against the fp64 reference."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 300, 9, 65, generator=g, dtype=torch.float64) * 0.2 for _ in range(2))
    v = torch.randn(1, 300, 9, 65, generator=g, dtype=torch.float64)
    gamma = 1 - torch.logspace(-1, -4, 9, dtype=torch.float64)
    want_o, want_s = retention_naive(q, k, v, gamma)
    got_o, got_s = retention(q.float().to(CUDA), k.float().to(CUDA), v.float().to(CUDA), gamma.float().to(CUDA),
                             "chunkwise")
    assert_close("output", got_o.cpu(), want_o, TOL[backend])
    assert_close("state", got_s.cpu(), want_s, TOL[backend])


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

CONVERTED = dict(VARIANTS["converted-gqa"], learnable_decay=True)
MODELS = {
    "paper": {},  # xpos, groupnorm, the paper's normalisation, gate
    "converted": CONVERTED,
    "converted-capped": dict(CONVERTED, max_sink_distance=12, max_retention_span=20),
    "windowed": dict(CONVERTED, retention_window=[3, 0]),
}


@torch.no_grad()
def all_logits(model, ids):
    out = {}
    for mode in ("parallel", "chunkwise", "recurrent"):
        model.config.retention_mode = mode
        out[mode] = model(ids, use_cache=False).logits.float().cpu()
    return out


@pytest.mark.parametrize("variant", list(MODELS))
def test_model_on_cuda_matches_cpu(backend, variant):
    """Every form on the GPU against the parallel form on the CPU, then greedy generate()
    (recurrent steps after a chunkwise prompt) token for token."""
    model = tiny_model(**MODELS[variant])
    ids = random_ids(2, 29)
    want = all_logits(model, ids)["parallel"]
    gpu = tiny_model(**MODELS[variant]).to(CUDA)
    for mode, got in all_logits(gpu, ids.to(CUDA)).items():
        assert_logits_close(got, want, tol=MODEL_TOL[backend], what=f"{variant} {mode}")
    model.config.retention_mode = gpu.config.retention_mode = "chunkwise"
    with torch.no_grad():
        cpu_tokens = model.generate(ids[:, :9], max_new_tokens=12, do_sample=False, pad_token_id=0)
        gpu_tokens = gpu.generate(ids[:, :9].to(CUDA), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(gpu_tokens.cpu(), cpu_tokens)


@pytest.mark.parametrize("variant", ["converted", "windowed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_decoder_on_cuda(variant, dtype, monkeypatch):
    """The packed decoder on the GPU against the module path on the GPU (fp32 weights), after
    a prompt, step by step; bf16 weights within bf16's rounding."""
    monkeypatch.setenv("RETCONVERT_FLA", "0")
    model = tiny_model(**MODELS[variant]).to(CUDA)
    ids = random_ids(2, 23).to(CUDA)
    model.config.retention_mode = "parallel"
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[:, 8:].float()
    decoder = RetNetDecoder(model, batch_size=2, dtype=dtype)
    steps = [decoder.prefill(ids[:, :9]).clone()]
    steps += [decoder.step(ids[:, t]).clone() for t in range(9, 23)]
    got = torch.stack(steps, 1).float()
    assert_logits_close(got, want, tol=1e-4 if dtype == torch.float32 else 3e-2, what=f"{variant} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_on_cuda_stays_finite(dtype):
    """A 2,048-token forward with fp16 and bf16 weights: embeddings, projections, norms and the
    paper's normaliser (a division by a running sum of decayed scores) in half precision, the
    layer's retention in fp32 as it always runs (modeling_retnet.py): finite logits near fp32's."""
    for variant in ("paper", "converted", "windowed"):
        model = tiny_model(**MODELS[variant]).to(CUDA)
        ids = random_ids(1, 2048).to(CUDA)
        with torch.no_grad():
            want = model(ids, use_cache=False).logits.float()
            got = model.to(dtype)(ids, use_cache=False).logits.float()
        assert torch.isfinite(got).all(), f"{variant} {dtype}: non-finite logits"
        err = ((got - want).abs().max() / want.abs().max()).item()
        tol = 5e-2 if dtype == torch.float16 else 1e-1  # bf16 keeps 3 mantissa bits fewer
        assert err < tol, f"{variant} {dtype}: relative error {err:.2e}"


# --------------------------------------------------------------------------------------------
# The distillation recipe
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("cuda-distill"))


@pytest.mark.parametrize("window", [0, 4])
def test_recipe_on_cuda_matches_cpu(fx, tmp_path, window, monkeypatch):
    """Conversion with calibration, stage 1 (attention transfer) and stage 2 (KL) on the GPU:
    the same losses as on the CPU; then a bf16 run on the GPU stays close."""
    from retconvert.distill.config import load_config
    from retconvert.distill.metrics import read_metrics
    from retconvert.distill.trainer import run as run_recipe

    monkeypatch.setenv("RETCONVERT_FLA", "0")

    def losses(device, **extra):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        overrides = {"run.device": device, "model.convert.window": window, "stage2.steps": 3, **extra}
        run_recipe(load_config(None, tiny_overrides(fx, out, **overrides)), log=lambda *a, **k: None)
        records = read_metrics(out / "metrics.jsonl")
        return ([r["loss"] for r in records if r["event"] == "stage1"],
                [r["loss"] for r in records if r.get("event", "train") == "train"])

    cpu, gpu = losses("cpu"), losses(str(CUDA))
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-3) and gpu[1] == pytest.approx(cpu[1], rel=1e-3)
    bf16 = losses(str(CUDA), **{"run.dtype": "bfloat16"})
    assert bf16[1] == pytest.approx(cpu[1], abs=0.05)
