#!/usr/bin/env python
"""CPU benchmark: chunkwise retention vs the teacher's attention (prefill / training), and
our retention functions vs peer implementations (torchscale, fla's PyTorch references).

Part `prefill` (--parts prefill)
  For every length T (default 512 ... 8192) on SmolLM2-135M shapes (B=1, 9 query heads):
    * the teacher's attention core, exactly as transformers runs it: the
      `sdpa_attention_forward` of transformers/integrations/sdpa_attention.py, called with
      q [B, 9, T, 64] and k, v [B, 3, T, 64] (transposed views of [B, T, heads, 64], as
      LlamaAttention passes them), attention_mask None, scaling 64^-0.5. On CPU it calls
      torch's scaled_dot_product_attention(is_causal=True, enable_gqa=True) (no repeat_kv;
      the check worker records the call's actual arguments), then transposes the output to
      [B, T, 9, 64] and makes it contiguous;
    * our `retention_chunkwise` (models/retention.py) at each --chunk-sizes, 9 heads, for
      each --retention-dims: 65x65 is the converted student (score-bias feature on q/k,
      normaliser column on v), 64x64 the plain RetNet head.
  Each is timed forward (torch.no_grad) and forward+backward (inputs require grad,
  output.backward(fixed random grad)); the peak extra memory of each runs in a fresh process.
  The summary has the ratio attention / chunkwise per length, the best chunk size per
  length, and log-log scaling exponents of time and memory.

Part `peers` (--parts peers)
  The three retention forms on the same shapes (B=1, H=9, --peer-dims), same inputs,
  same decay (gamma_h = 1 - 2^(-5-h)), forward and forward+backward:
    * ours:        models/retention.py retention_parallel (output_final_state=False, as the
                   peers' parallel cores compute no state) / _chunkwise / _recurrent;
    * torchscale:  the retention core of torchscale.component.multiscale_retention
                   .MultiScaleRetention: parallel_forward / chunk_recurrent_forward /
                   recurrent_forward (one call per token, state dict carried), called on
                   precomputed qr, kr [B, H, T, Dk] and v [B, T, H*Dv] with the decay masks
                   of torchscale's RetNetRelPos (built untimed; their build time is
                   recorded separately). No projections, no rotation, no group norm.
                   Its outputs are normalised (per position and head), see `correctness`;
    * fla:         flash-linear-attention's pure-PyTorch references, loaded file by file
                   (the package needs triton): fla/ops/simple_gla/naive.py
                   naive_parallel_simple_gla / naive_chunk_simple_gla /
                   naive_recurrent_simple_gla with g = log(gamma) and scale = 1 (fla's
                   retention ops are simple_gla with that g), and
                   fla/ops/retention/naive.py naive_retention (parallel only; scales q by
                   Dk^-0.5 itself). Needs --fla-path (an fla-core wheel or source tree) or an
                   installed fla; otherwise these cases are skipped with the reason.
  Before timing, a check worker compares every peer's output with ours on the same inputs.

Method (as bench/retention.py: both run their cases with bench/common.py)
  * One fresh subprocess per timing case and per memory probe; warm-up runs excluded;
    median of --repeats runs (all runs kept); wall time and process CPU time.
  * Cases are skipped, with the reason recorded, when their estimated peak memory exceeds
    --max-bytes or their time (predicted from the previous length, or seen in warm-up)
    does not allow --min-repeats runs in --max-seconds-per-case; longer lengths of a
    skipped case are skipped too. Nothing is extrapolated into the results.
  * Contention from other processes is recorded per case; the bench waits (bounded) for
    quiet and re-times contended cases. On a busy machine use --threads 1 and read `cpu`.

Usage
  .venv/bin/python bench/prefill.py --threads 1 --out docs/bench/prefill.json
  .venv/bin/python bench/prefill.py --quick                 # smoke test, tiny sizes
The JSON goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
import types
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    BYTES_FP32,
    METRICS,
    MODES,
    REPO,
    CpuMonitor,
    PeakRSS,
    contention,
    contention_limit,
    emit_result,
    emit_worker_result,
    estimate_peak_bytes,
    file_sha256,
    fmt_bytes,
    fmt_seconds,
    git_state,
    int_list,
    load_retention,
    log,
    loglog_slope,
    machine_info,
    median_of,
    memory_skip,
    package_version,
    paper_decay,
    run_header,
    skip_reason,
    spawn,
    time_callable,
    time_modes,
)

FORMS = ("parallel", "chunkwise", "recurrent")
PEERS = ("torchscale", "fla", "fla-naive_retention")

FULL_DEFAULTS = dict(lengths=[512, 1024, 2048, 4096, 8192], chunk_sizes=[32, 64, 128, 256],
                     peer_lengths=[512, 2048, 4096], peer_recurrent_max_length=2048, repeats=7,
                     min_repeats=3, max_seconds_per_case=60.0, wait_quiet=120.0, retry_contended=1)
QUICK_DEFAULTS = dict(lengths=[256, 512], chunk_sizes=[64], peer_lengths=[256, 512],
                      peer_recurrent_max_length=256, repeats=2, min_repeats=1,
                      max_seconds_per_case=20.0, wait_quiet=0.0, retry_contended=0)


# --------------------------------------------------------------------------------------
# Loading the implementations (in workers)
# --------------------------------------------------------------------------------------


def load_torchscale():
    """(MultiScaleRetention, RetNetRelPos, info), imported as the torchscale export imports
    torchscale (retconvert.convert.torchscale_export.import_torchscale: without fairscale and
    timm, which its retnet module imports but retention does not use)."""
    from retconvert.convert.torchscale_export import import_torchscale

    import_torchscale()
    from torchscale.architecture.retnet import RetNetRelPos
    from torchscale.component import multiscale_retention as msr_mod

    info = {"version": package_version("torchscale"), "multiscale_retention_file": msr_mod.__file__,
            "multiscale_retention_sha256": file_sha256(msr_mod.__file__),
            "RetNetRelPos": "torchscale.architecture.retnet, imported by retconvert's import_torchscale()"}
    return msr_mod.MultiScaleRetention, RetNetRelPos, info


FLA_FILES = {"simple_gla": "fla/ops/simple_gla/naive.py", "retention": "fla/ops/retention/naive.py"}


def find_fla(path: Optional[str]) -> Tuple[Optional[str], str]:
    """(location, how): a wheel file, a directory holding `fla/`, or None with the reason."""
    if path:
        p = Path(path)
        if p.is_dir() and not (p / "fla").is_dir():
            wheels = sorted(p.glob("fla_core-*.whl"))
            if wheels:
                return str(wheels[-1]), f"newest fla_core wheel in {p}"
        if p.exists():
            return str(p), "--fla-path"
        return None, f"--fla-path {path} does not exist"
    spec = importlib.util.find_spec("fla")  # does not run fla/__init__ (which needs triton)
    if spec and spec.submodule_search_locations:
        return str(Path(list(spec.submodule_search_locations)[0]).parent), "installed package"
    return None, ("fla not installed and no --fla-path given (get it with: .venv/bin/python -m pip download "
                  "fla-core --no-deps -d /tmp/fla, then pass --fla-path /tmp/fla)")


def load_fla(location: str):
    """{"simple_gla": module, "retention": module, "info": {...}}, each file executed on its
    own, so that neither fla/__init__.py nor triton is imported."""
    mods: Dict[str, Any] = {}
    info: Dict[str, Any] = {"location": location, "files": {}}
    is_wheel = zipfile.is_zipfile(location)
    zf = zipfile.ZipFile(location) if is_wheel else None
    for key, rel in FLA_FILES.items():
        src = zf.read(rel).decode() if zf else (Path(location) / rel).read_text()
        mod = types.ModuleType(f"_fla_{key}_naive")
        exec(compile(src, f"{location}/{rel}", "exec"), mod.__dict__)
        mods[key] = mod
        info["files"][rel] = {"sha256": hashlib.sha256(src.encode()).hexdigest()}
    if zf:
        meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        if meta:
            info["version"] = next((ln.split(":", 1)[1].strip() for ln in zf.read(meta[0]).decode().splitlines()
                                    if ln.startswith("Version:")), None)
    else:
        info["version"] = package_version("fla-core") or package_version("flash-linear-attention")
    mods["info"] = info
    return mods


def load_context(p: Dict[str, Any], impl: str) -> Dict[str, Any]:
    """Load only what `impl` needs."""
    ctx: Dict[str, Any] = {}
    fam = family(impl)
    if fam == "ours":
        ctx["ours"] = load_retention()
    elif fam == "torchscale":
        ctx["torchscale"] = load_torchscale()
    elif fam.startswith("fla"):
        loc, how = find_fla(p.get("fla_path"))
        if loc is None:
            raise RuntimeError(how)
        ctx["fla"] = load_fla(loc)
    return ctx


def form_impls(form: str) -> List[str]:
    """Ours and the peers' implementations of one retention form."""
    naive = ["fla-naive_retention"] if form == "parallel" else []
    return [f"ours-{form}", f"torchscale-{form}", f"fla-{form}"] + naive


def family(impl: str) -> str:
    """'ours-chunkwise' -> 'ours', 'fla-naive_retention' -> 'fla-naive_retention'."""
    return impl if impl in ("sdpa", "fla-naive_retention") else impl.split("-")[0]


def impl_form(impl: str) -> str:
    if impl == "sdpa":
        return "attention"
    if impl == "fla-naive_retention":
        return "parallel"
    return impl.split("-", 1)[1]


# --------------------------------------------------------------------------------------
# One implementation = prepare(torch, ctx, p, T, requires_grad, base) -> (fn, leaves)
#   fn() returns the output tensor; leaves are the tensors that get gradients.
#   base = (q, k, v) in our layout [B, T, H, D]; each implementation converts it (untimed)
#   to its own native layout, as its own layer would produce it.
# --------------------------------------------------------------------------------------


def make_base(torch, p: Dict[str, Any], T: int, scale: float = 1.0, seed_offset: int = 0):
    """q (scaled by Dk^-0.5), k, v in [B, T, H, D], fp32."""
    B, H, Dk, Dv = p["B"], p["H"], p["Dk"], p["Dv"]
    gen = torch.Generator().manual_seed(p["seed"] + seed_offset)
    q = torch.randn(B, T, H, Dk, generator=gen) * (Dk**-0.5 * scale)
    k = torch.randn(B, T, H, Dk, generator=gen) * scale
    v = torch.randn(B, T, H, Dv, generator=gen) * scale
    return q, k, v


def _leaves(xs, requires_grad: bool):
    xs = tuple(x.detach().clone().contiguous() for x in xs)
    return tuple(x.requires_grad_() for x in xs) if requires_grad else xs


def gamma_of(torch, H: int):
    return torch.tensor(paper_decay(H), dtype=torch.float32)


def prep_ours(torch, ctx, p, T, rg, base):
    mod, form = ctx["ours"], impl_form(p["impl"])
    q, k, v = _leaves(base, rg)
    gamma = gamma_of(torch, p["H"])
    if form == "parallel":
        # Like the peers' parallel cores, which return no state, ours skips it here.
        return (lambda: mod.retention_parallel(q, k, v, gamma, output_final_state=False)[0]), (q, k, v)
    if form == "chunkwise":
        return (lambda: mod.retention_chunkwise(q, k, v, gamma, chunk_size=p["chunk"])[0]), (q, k, v)
    return (lambda: mod.retention_recurrent(q, k, v, gamma)[0]), (q, k, v)


def prep_sdpa(torch, ctx, p, T, rg, base):
    """transformers' own sdpa_attention_forward, called as LlamaAttention calls it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, Hkv, D = p["B"], p["H"], p["Hkv"], p["Dk"]
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v = _leaves((torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, Hkv, D, generator=gen),
                       torch.randn(B, T, Hkv, D, generator=gen)), rg)
    module = types.SimpleNamespace(num_key_value_groups=H // Hkv, is_causal=True, layer_idx=0)

    def fn():
        out, _ = sdpa_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        None, dropout=0.0, scaling=D**-0.5)
        return out  # [B, T, H, D], contiguous

    return fn, (q, k, v)


def torchscale_objects(ctx, p, chunk: Optional[int]):
    MSR, RelPos, _ = ctx["torchscale"]
    H, Dk, Dv = p["H"], p["Dk"], p["Dv"]
    args = types.SimpleNamespace(multiway=False, layernorm_eps=1e-6, decoder_embed_dim=H * Dk,
                                 decoder_retention_heads=H, recurrent_chunk_size=chunk or 64)
    return MSR(args, H * Dk, H * Dv, H), RelPos(args)


def torchscale_rel_pos(torch, relpos, form: str, T: int):
    """The decay argument torchscale's layer receives for this form (sin/cos dropped)."""
    with torch.no_grad():
        if form == "parallel":
            return relpos(T)[1]
        if form == "chunkwise":
            return relpos(T, chunkwise_recurrent=True)[1]
        return relpos(T, activate_recurrent=True)[1]


def prep_torchscale(torch, ctx, p, T, rg, base):
    B, H, Dv, form = p["B"], p["H"], p["Dv"], impl_form(p["impl"])
    msr, relpos = torchscale_objects(ctx, p, p.get("chunk"))
    q, k, v = base
    # Native layout: qr, kr [B, H, T, Dk] (what theta_shift returns), v [B, T, H*Dv] (v_proj's output).
    qr, kr, vf = _leaves((q.transpose(1, 2), k.transpose(1, 2), v.reshape(B, T, H * Dv)), rg)
    rel = torchscale_rel_pos(torch, relpos, form, T)
    if form == "parallel":
        return (lambda: msr.parallel_forward(qr, kr, vf, rel)), (qr, kr, vf)
    if form == "chunkwise":
        # chunk_recurrent_forward returns [B, N, C, H, Dv]; reshaped to [B, T, H, Dv] (a copy) as ours returns.
        return (lambda: msr.chunk_recurrent_forward(qr, kr, vf, rel).reshape(B, T, H, Dv)), (qr, kr, vf)

    def recurrent():
        state: Dict[str, Any] = {}
        outs = [msr.recurrent_forward(q_t.unsqueeze(2), k_t.unsqueeze(2), v_t, rel, state)
                for q_t, k_t, v_t in zip(qr.unbind(2), kr.unbind(2), vf.unbind(1))]
        return torch.stack(outs, dim=1)  # [B, T, H, Dv]

    return recurrent, (qr, kr, vf)


def prep_fla(torch, ctx, p, T, rg, base):
    fla, form = ctx["fla"], impl_form(p["impl"])
    if p["impl"] == "fla-naive_retention":
        # (B, H, T, D) layout; it multiplies q by Dk^-0.5 itself, so q is given unscaled.
        q, k, v = base
        qh, kh, vh = _leaves((q.transpose(1, 2) * p["Dk"] ** 0.5, k.transpose(1, 2), v.transpose(1, 2)), rg)
        return (lambda: fla["retention"].naive_retention(qh, kh, vh)), (qh, kh, vh)
    sg = fla["simple_gla"]
    q, k, v = _leaves(base, rg)
    B, H = p["B"], p["H"]
    g = gamma_of(torch, H).log().view(1, 1, H).expand(B, T, H).contiguous()  # constant log-decay per token
    if form == "parallel":
        return (lambda: sg.naive_parallel_simple_gla(q, k, v, g, scale=1.0)[0]), (q, k, v)
    if form == "chunkwise":
        return (lambda: sg.naive_chunk_simple_gla(q, k, v, g, chunk_size=p["chunk"], scale=1.0)[0]), (q, k, v)
    return (lambda: sg.naive_recurrent_simple_gla(q, k, v, g, scale=1.0, output_final_state=False)[0]), (q, k, v)


PREPARE = {"ours": prep_ours, "sdpa": prep_sdpa, "torchscale": prep_torchscale,
           "fla": prep_fla, "fla-naive_retention": prep_fla}


def prepare(torch, ctx, p, T, requires_grad, base=None):
    if base is None and p["impl"] != "sdpa":
        base = make_base(torch, p, T)
    return PREPARE[family(p["impl"])](torch, ctx, p, T, requires_grad, base)


# --------------------------------------------------------------------------------------
# Workers (fresh processes)
# --------------------------------------------------------------------------------------


def _runner(torch, fn, leaves, p, T, mode):
    """(run, setup) for one mode; the upstream gradient is fixed and made here, untimed."""
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn()

        return run, None

    def setup():
        for x in leaves:
            x.grad = None

    grad_out = torch.randn(output_shape(p, T), generator=torch.Generator().manual_seed(1))

    def run():
        fn().backward(grad_out)

    return run, setup


def worker_time(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(p["threads"])
    ctx = load_context(p, p["impl"])
    out: Dict[str, Any] = {"status": "ok", "modes": {}}
    for mode in p["modes"]:
        fn, leaves = prepare(torch, ctx, p, p["T"], mode == "fwd_bwd")
        run, setup = _runner(torch, fn, leaves, p, p["T"], mode)
        with CpuMonitor() as mon:
            res = time_callable(run, repeats=p["repeats"], warmup=p["warmup"], setup=setup,
                                budget_s=p["budget_s"], min_repeats=p["min_repeats"])
        res["cpu"] = mon.result
        out["modes"][mode] = res
        del fn, leaves, run, setup
    if family(p["impl"]) == "torchscale" and impl_form(p["impl"]) != "recurrent":
        _, relpos = torchscale_objects(ctx, p, p.get("chunk"))
        form = impl_form(p["impl"])
        build = time_callable(lambda: torchscale_rel_pos(torch, relpos, form, p["T"]), repeats=3, warmup=1)
        for res in out["modes"].values():
            res["torchscale_rel_pos_build"] = build
    return out


def worker_mem(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(p["threads"])
    ctx = load_context(p, p["impl"])
    mode = p["mode"]
    # Tiny warm-up of the same code path (loads kernels, starts the thread pool).
    T0 = min(p["T"], max(64, p.get("chunk") or 0))
    fn0, leaves0 = prepare(torch, ctx, p, T0, mode == "fwd_bwd")
    run0, setup0 = _runner(torch, fn0, leaves0, p, T0, mode)
    if setup0:
        setup0()
    run0()
    del fn0, leaves0, run0, setup0
    fn, leaves = prepare(torch, ctx, p, p["T"], mode == "fwd_bwd")
    run, setup = _runner(torch, fn, leaves, p, p["T"], mode)
    if setup:
        setup()
    t0 = time.perf_counter()
    with PeakRSS() as m:
        run()
    return {**m.result, "status": "ok", "run_s": time.perf_counter() - t0}


def output_shape(p: Dict[str, Any], T: int) -> Tuple[int, ...]:
    B, H = p["B"], p["H"]
    if p["impl"] == "sdpa":
        return (B, T, H, p["Dk"])
    if p["impl"] == "fla-naive_retention":
        return (B, H, T, p["Dv"])
    return (B, T, H, p["Dv"])


def rel_err(a, ref) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-300))


def torchscale_factor(torch, form: str, T: int, chunk: Optional[int], H: int):
    """torchscale's output times this [1, T, H, 1] factor is un-normalised retention, provided
    its data-dependent clamps (abs row sums, state norms, clamped at 1) are inactive: parallel
    and recurrent divide position t by sqrt(sum_{m<=t} gamma^m), chunkwise by the same with
    t taken within its chunk (t mod C)."""
    gamma = torch.tensor(paper_decay(H), dtype=torch.float64)
    t = torch.arange(T, dtype=torch.float64)
    pos = t % chunk if form == "chunkwise" else t
    c = (1 - gamma[None, :] ** (pos[:, None] + 1)) / (1 - gamma[None, :])  # (T, H)
    return c.sqrt()[None, :, :, None]


def _direction(x):
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-300)


def check_one(torch, ctx, p, impl, form, T, tol):
    """One implementation vs the fp64 reference (our parallel form on the same fp32 inputs)."""
    q = {**p, "impl": impl}
    rec: Dict[str, Any] = {}
    for name, scale in (("small_inputs", 0.01), ("normal_inputs", 1.0)):
        base = make_base(torch, q, T, scale=scale)
        ref = ctx["ours"].retention_parallel(*(x.double() for x in base), gamma_of(torch, p["H"]).double())[0]
        fn, _ = prepare(torch, ctx, q, T, False, base)
        with torch.no_grad():
            o = fn()
        if impl == "fla-naive_retention":
            o = o.transpose(1, 2)
        if family(impl) == "torchscale":
            factor = torchscale_factor(torch, form, T, q.get("chunk"), p["H"])
            rec[name] = {"rel_err_after_rescale": rel_err(o.double() * factor, ref),
                         "rel_err_raw": rel_err(o, ref),
                         "max_abs_diff_per_position_direction": float((_direction(o) - _direction(ref)).abs().max())}
        else:
            rec[name] = {"rel_err": rel_err(o, ref)}
    if family(impl) == "torchscale":
        ok = (rec["small_inputs"]["rel_err_after_rescale"] < tol
              and rec["normal_inputs"]["max_abs_diff_per_position_direction"] < 1e-3)
    else:
        ok = all(r["rel_err"] < tol for r in rec.values())
    rec["status"] = "ok" if ok else "mismatch"
    return rec


def worker_check(p: Dict[str, Any]) -> Dict[str, Any]:
    """Which peers load, and whether each output matches ours on the same inputs."""
    import torch

    torch.set_num_threads(p["threads"])
    T, tol = p["T"], 1e-4
    avail: Dict[str, Any] = {}
    ctx = {"ours": load_retention()}
    for fam in PEERS:
        if fam == "fla-naive_retention" and "fla" in avail:
            avail[fam] = avail["fla"]
            continue
        try:
            ctx.update(load_context(p, fam if fam != "fla" else "fla-parallel"))
            info = ctx["torchscale"][2] if fam == "torchscale" else ctx["fla"]["info"]
            avail[fam] = {"status": "ok", "info": info}
        except Exception as e:  # recorded, never faked
            avail[fam] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
    checks: Dict[str, Any] = {}
    for form in FORMS:
        for impl in form_impls(form):
            if family(impl) != "ours" and avail[family(impl)]["status"] != "ok":
                checks[impl] = {"status": "skipped", "reason": avail[family(impl)]["reason"]}
                continue
            checks[impl] = check_one(torch, ctx, {**p, "chunk": p["chunk"]}, impl, form, T, tol)
    return {"status": "ok", "T": T, "dtype": "float32 inputs, fp64 reference", "tolerance_rel": tol,
            "available": avail, "vs_reference": checks}


def worker_check_sdpa(p: Dict[str, Any]) -> Dict[str, Any]:
    """Record the arguments transformers' SDPA path passes to torch on this machine, and
    check the output against a plain causal softmax attention with repeated kv heads."""
    import torch
    import transformers

    torch.set_num_threads(p["threads"])
    calls: List[Dict[str, Any]] = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append({"q": list(q.shape), "k": list(k.shape), "v": list(v.shape), "q_is_contiguous": q.is_contiguous(),
                      **{a: (list(b.shape) if torch.is_tensor(b) else b) for a, b in kw.items()}})
        return orig(q, k, v, **kw)

    T, H, Hkv, D = 48, p["H"], p["Hkv"], p["Dk"]
    fn, (q, k, v) = prepare(torch, {}, {**p, "B": 1}, T, False)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            out = fn()
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, k, v))
    kh, vh = (x.repeat_interleave(H // Hkv, dim=1) for x in (kh, vh))
    s = (qh @ kh.transpose(-1, -2)) * D**-0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = (s.softmax(-1) @ vh).transpose(1, 2)
    err = rel_err(out, ref)
    return {"status": "ok" if err < 1e-5 else "mismatch", "transformers": transformers.__version__,
            "sdpa_calls": calls, "rel_err_vs_eager_repeat_kv": err}


WORKERS = {"time": worker_time, "mem": worker_mem, "check": worker_check, "check_sdpa": worker_check_sdpa}


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------


def dims_list(s: str) -> List[Tuple[int, int]]:
    out = []
    for item in s.replace(" ", "").split(","):
        if item:
            dk, dv = item.lower().split("x")
            out.append((int(dk), int(dv)))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    il = int_list
    ap.add_argument("--parts", default="prefill,peers", help="comma list: prefill, peers")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny lengths, 2 repeats, no waiting")
    ap.add_argument("--lengths", type=il, default=None, help="prefill lengths (default 512,...,8192)")
    ap.add_argument("--chunk-sizes", type=il, default=None, help="prefill chunk sizes (default 32,64,128,256)")
    ap.add_argument("--retention-dims", type=dims_list, default=dims_list("65x65,64x64"),
                    help="prefill retention head dims DkxDv (65x65 = converted student)")
    ap.add_argument("--peer-lengths", type=il, default=None, help="peers lengths (default 512,2048,4096)")
    ap.add_argument("--peer-recurrent-max-length", type=int, default=None,
                    help="recurrent form only up to this length (default 2048)")
    ap.add_argument("--peer-chunk-size", type=int, default=64)
    ap.add_argument("--peer-dims", type=lambda s: dims_list(s)[0], default=(64, 64), help="DkxDv of the peers part")
    ap.add_argument("--peer-memory", action="store_true", help="also probe peak memory of the peers cases")
    ap.add_argument("--fla-path", default=None, help="fla-core wheel, a folder with one, or a source tree")
    ap.add_argument("--batch", "-B", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3, help="attention kv heads (GQA)")
    ap.add_argument("--attn-head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--min-repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds-per-case", type=float, default=None)
    ap.add_argument("--max-bytes", type=float, default=6e9, help="skip cases whose estimated peak exceeds this")
    ap.add_argument("--no-memory", action="store_true", help="no peak-memory probes")
    ap.add_argument("--wait-quiet", type=float, default=None)
    ap.add_argument("--max-wait-total", type=float, default=300.0)
    ap.add_argument("--quiet-threshold", type=float, default=0.3)
    ap.add_argument("--retry-contended", type=int, default=None)
    ap.add_argument("--max-total-seconds", type=float, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, val in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    return args


def case_peak_bytes(spec: Dict[str, Any], T: int, mode: str) -> int:
    """Rough peak (fp32) used only to decide whether to run a case; the measured peak is
    next to it in the JSON. Ours: common.estimate_peak_bytes. Peers' parallel forms hold
    a few [B, H, T, T] tensors (masks, scores, products)."""
    B, H, Dk, Dv, impl = spec["B"], spec["H"], spec["Dk"], spec["Dv"], spec["impl"]
    form = impl_form(impl)
    if impl == "sdpa":
        return BYTES_FP32 * B * T * H * Dk * (4 if mode == "fwd" else 12)
    ours = estimate_peak_bytes(form, spec.get("chunk"), T, B, H, Dk, Dv, mode)
    if family(impl) == "ours":
        return ours
    if form == "parallel":  # measured at T=1024: 2 to 3.1 x (H T^2 fp32) in both modes
        return BYTES_FP32 * B * H * T * T * (4 if mode == "fwd" else 5)
    return 2 * ours


def label_of(spec: Dict[str, Any]) -> str:
    if spec["part"] == "prefill":
        if spec["impl"] == "sdpa":
            return f"sdpa@{spec['H']}q{spec['Hkv']}kv-d{spec['Dk']}"
        return f"chunkwise-{spec['chunk']}@{spec['Dk']}x{spec['Dv']}"
    return spec["impl"]


def build_specs(args) -> List[Dict[str, Any]]:
    base = {"B": args.batch, "H": args.heads, "Hkv": args.kv_heads}
    specs: List[Dict[str, Any]] = []
    if "prefill" in args.parts:
        D = args.attn_head_dim
        specs.append({**base, "part": "prefill", "impl": "sdpa", "Dk": D, "Dv": D, "chunk": None,
                      "lengths": args.lengths})
        for dk, dv in args.retention_dims:
            for c in args.chunk_sizes:
                specs.append({**base, "part": "prefill", "impl": "ours-chunkwise", "Dk": dk, "Dv": dv, "chunk": c,
                              "lengths": args.lengths})
    if "peers" in args.parts:
        dk, dv = args.peer_dims
        for form in FORMS:
            lengths = [T for T in args.peer_lengths if form != "recurrent" or T <= args.peer_recurrent_max_length]
            for impl in form_impls(form):
                specs.append({**base, "part": "peers", "impl": impl, "Dk": dk, "Dv": dv, "lengths": lengths,
                              "chunk": args.peer_chunk_size if form == "chunkwise" else None})
    for s in specs:
        s["label"] = label_of(s)
        s["form"] = impl_form(s["impl"])
    return specs


class Runner:
    """Runs the cases length by length, with the budgets, waits and retries of bench/common.py
    (as bench/retention.py), remembering per (label, mode) the medians seen and the skips."""

    def __init__(self, args, payload_base, unavailable: Dict[str, str]):
        self.args, self.payload_base, self.unavailable = args, payload_base, unavailable
        self.t_start = time.perf_counter()
        self.waits: List[float] = []
        self.history: Dict[tuple, List[tuple]] = {}
        self.stopped: Dict[tuple, str] = {}

    def skip_reason(self, spec, T, mode) -> Tuple[Optional[str], Dict[str, Any]]:
        key, extra = (spec["label"], spec["Dk"], mode), {}
        extra["estimated_peak_bytes"] = est = case_peak_bytes(spec, T, mode)
        if family(spec["impl"]) in self.unavailable:
            return f"peer not available: {self.unavailable[family(spec['impl'])]}", extra
        form = "parallel" if spec["form"] == "attention" else spec["form"]
        return skip_reason(form, spec.get("chunk"), T, est, self.stopped.get(key), self.history.get(key),
                           self.args, extra), extra

    def payload(self, spec, T) -> Dict[str, Any]:
        keys = ("impl", "B", "H", "Hkv", "Dk", "Dv", "chunk")
        return {**self.payload_base, **{k: spec[k] for k in keys}, "T": T}

    def memory(self, spec, T, mode, timed) -> Dict[str, Any]:
        a = self.args
        if spec["part"] == "peers" and not a.peer_memory and not a.no_memory and timed.get("status") == "ok":
            return {"status": "skipped", "reason": "peers: no --peer-memory"}
        skip = memory_skip(timed, a)
        if skip:
            return skip
        mem = spawn(__file__, "mem", {**self.payload(spec, T), "mode": mode}, timeout_s=a.max_seconds_per_case * 2 + 60)
        mem["estimated_peak_bytes"] = timed.get("estimated_peak_bytes")
        return mem

    def run_case(self, spec, T) -> Dict[str, Any]:
        case = {k: spec[k] for k in ("part", "label", "impl", "form", "chunk", "B", "H", "Hkv", "Dk", "Dv")}
        case.update(T=T, modes={}, memory={})
        to_run = []
        for mode in MODES:
            reason, extra = self.skip_reason(spec, T, mode)
            case["modes"][mode] = extra
            if reason:
                extra.update(status="skipped", reason=reason)
                if not reason.startswith(("chunk_size", "peer not")):
                    self.stopped.setdefault((spec["label"], spec["Dk"], mode), f"T={T}: {reason}")
            else:
                to_run.append(mode)
        if to_run:
            a = self.args
            payload = {**self.payload(spec, T), "repeats": a.repeats, "min_repeats": a.min_repeats,
                       "warmup": a.warmup, "budget_s": a.max_seconds_per_case}
            best, case["attempts"] = time_modes(__file__, payload, to_run, a, self.t_start, self.waits,
                                                f"T={T} {spec['label']}")
            for mode in to_run:
                r = best[mode]
                case["modes"][mode].update(r)
                key = (spec["label"], spec["Dk"], mode)
                if r["status"] == "ok":
                    self.history.setdefault(key, []).append((T, r["median_s"]))
                else:
                    self.stopped.setdefault(key, f"T={T}: {r.get('reason')}")
        for mode in MODES:
            case["memory"][mode] = self.memory(spec, T, mode, case["modes"][mode])
        log_case(case, time.perf_counter() - self.t_start)
        return case


def log_case(case, elapsed) -> None:
    msg = []
    for mode in MODES:
        r, m = case["modes"][mode], case["memory"][mode]
        if r.get("status") == "ok":
            pk = m.get("peak_extra_bytes")
            mem = f", peak +{fmt_bytes(pk)}" if pk is not None else ""
            msg.append(f"{mode} {fmt_seconds(r['median_s'])} [cpu {fmt_seconds(r['cpu_time']['median_s'])}] "
                       f"(n={r['n']}{mem}, others {round(contention(r), 2)})")
        else:
            msg.append(f"{mode} SKIP ({str(r.get('reason'))[:90]})")
    log(f"[{case['part']}] T={case['T']:>5} {case['label']:>22}: " + "; ".join(msg) + f"   [{elapsed:.0f} s]")


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def table(cases, mode, metric) -> Dict[str, Dict[str, Optional[float]]]:
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for c in cases:
        out.setdefault(c["label"], {})[str(c["T"])] = median_of(c, mode, metric)
    return out


def exponents(row: Dict[str, Optional[float]]) -> Dict[str, Any]:
    pts = [(int(T), v) for T, v in row.items() if v]
    long = [(T, v) for T, v in pts if T >= 1024]
    return {"all_lengths": loglog_slope(pts), "T>=1024": loglog_slope(long) if len(long) >= 2 else None,
            "over_lengths": [T for T, _ in pts]}


def summarise_prefill(cases, args) -> Dict[str, Any]:
    cases = [c for c in cases if c["part"] == "prefill"]
    att = next((c["label"] for c in cases if c["impl"] == "sdpa"), None)
    out: Dict[str, Any] = {"attention_label": att}
    for metric in METRICS:
        out[metric] = {}
        for mode in MODES:
            tab = table(cases, mode, metric)
            ratio = {lab: {T: (tab[att][T] / v if v and tab[att].get(T) else None) for T, v in row.items()}
                     for lab, row in tab.items() if lab != att} if att else {}
            best = {}
            for dk, dv in args.retention_dims:
                labs = [f"chunkwise-{c}@{dk}x{dv}" for c in args.chunk_sizes]
                best[f"{dk}x{dv}"] = {}
                for T in map(str, sorted(args.lengths)):
                    vals = {lab: tab[lab][T] for lab in labs if tab.get(lab, {}).get(T)}
                    if vals:
                        lab = min(vals, key=vals.get)
                        a = tab[att].get(T) if att else None
                        best[f"{dk}x{dv}"][T] = {"label": lab, "chunk": int(lab.split("@")[0].split("-")[1]),
                                                 "median_s": vals[lab], "attention_s": a,
                                                 "attention_over_chunkwise": a / vals[lab] if a else None}
            out[metric][mode] = {"median_s": tab, "attention_over_chunkwise": ratio, "best_chunk": best,
                                 "scaling_exponent": {lab: exponents(row) for lab, row in tab.items()}}
    out["memory_peak_extra_bytes"], out["memory_scaling_exponent"] = {}, {}
    for mode in MODES:
        mt: Dict[str, Dict[str, Any]] = {}
        for c in cases:
            mt.setdefault(c["label"], {})[str(c["T"])] = c["memory"][mode].get("peak_extra_bytes")
        out["memory_peak_extra_bytes"][mode] = mt
        out["memory_scaling_exponent"][mode] = {lab: exponents(row) for lab, row in mt.items()}
    out["verdict_at_longest"] = verdict(out, args)
    return out


def verdict(out, args) -> Dict[str, Any]:
    """At the longest length: does the best chunk size beat attention, per dims and mode?"""
    T = str(max(args.lengths))
    res = {}
    for metric in METRICS:
        for mode in MODES:
            for dims, per_T in out[metric][mode]["best_chunk"].items():
                b = per_T.get(T)
                res.setdefault(metric, {}).setdefault(mode, {})[dims] = None if not b or b["attention_s"] is None else {
                    "T": int(T), "best_chunk": b["chunk"], "chunkwise_s": b["median_s"],
                    "attention_s": b["attention_s"],
                    "attention_over_chunkwise": b["attention_over_chunkwise"],
                    "chunkwise_faster": b["attention_over_chunkwise"] > 1}
    return res


def rel_pos_medians(cases, metric) -> Dict[tuple, float]:
    """(label, T) -> median build time of torchscale's RetNetRelPos masks (untimed in the case)."""
    out = {}
    for c in cases:
        for r in c["modes"].values():
            b = r.get("torchscale_rel_pos_build")
            if b and b.get("status") == "ok":
                out[(c["label"], str(c["T"]))] = b["median_s"] if metric == "wall" else b["cpu_time"]["median_s"]
    return out


def summarise_peers(cases, args) -> Dict[str, Any]:
    cases = [c for c in cases if c["part"] == "peers"]
    out: Dict[str, Any] = {"note": ("peer_over_ours > 1: ours faster. torchscale's masks are built outside its timed "
                                    "core (ours builds its decay inside); peer_over_ours_incl_mask_build adds their "
                                    "median build time")}
    not_faster: List[Dict[str, Any]] = []
    for metric in METRICS:
        out[metric] = {}
        for mode in MODES:
            tab = table(cases, mode, metric)
            rel_pos = rel_pos_medians(cases, metric)
            per_form: Dict[str, Any] = {}
            for form in FORMS:
                ours = tab.get(f"ours-{form}", {})
                peers = [lab for lab in tab if lab != f"ours-{form}" and impl_form(lab) == form]
                per_form[form] = {}
                for T, o in ours.items():
                    row = {"ours_s": o, **{f"{lab}_s": tab[lab].get(T) for lab in peers}, "peer_over_ours": {}}
                    for lab in peers:
                        pv = tab[lab].get(T)
                        if o and pv:
                            row["peer_over_ours"][lab] = pv / o
                            if (lab, T) in rel_pos:
                                row.setdefault("peer_over_ours_incl_mask_build", {})[lab] = (pv + rel_pos[(lab, T)]) / o
                            if pv <= o:
                                not_faster.append({"metric": metric, "mode": mode, "form": form, "T": int(T),
                                                   "peer": lab, "peer_over_ours": pv / o})
                    per_form[form][T] = row
            out[metric][mode] = per_form
    out["not_faster"] = not_faster
    out["ours_faster_everywhere_measured"] = {m: not any(x["metric"] == m for x in not_faster) for m in METRICS}
    out["peer_cases_not_measured"] = [
        {"label": c["label"], "T": c["T"], "mode": m, "reason": r.get("reason")}
        for c in cases if not c["label"].startswith("ours") for m, r in c["modes"].items() if r.get("status") != "ok"]
    return out


def summarise(cases, args, checks) -> Dict[str, Any]:
    s: Dict[str, Any] = {}
    if "prefill" in args.parts:
        s["prefill"] = summarise_prefill(cases, args)
    if "peers" in args.parts:
        s["peers"] = summarise_peers(cases, args)
        vs_reference = checks.get("peers", {}).get("vs_reference", {})
        s["peers"]["correctness"] = {k: v.get("status") for k, v in vs_reference.items()}
    s["contended"] = [{"label": c["label"], "T": c["T"], "mode": m, "other_busy_cores": r["cpu"]["other_busy_cores"]}
                      for c in cases for m, r in c["modes"].items() if r.get("status") == "ok" and r.get("contended")]
    s["skipped"] = [{"part": c["part"], "label": c["label"], "T": c["T"], "mode": m, "reason": r.get("reason")}
                    for c in cases for m, r in c["modes"].items() if r.get("status") != "ok"]
    return s


def print_tables(summary) -> None:
    def row_str(lab, row, fmt):
        return f"{lab:>24} " + " ".join(f"{fmt(v) if v else '-':>10}" for v in row.values())

    if "prefill" in summary:
        p = summary["prefill"]
        for metric, mode in ((m, mo) for m in METRICS for mo in MODES):
            tab = p[metric][mode]["median_s"]
            lengths = list(next(iter(tab.values())).keys()) if tab else []
            log(f"\n== prefill: median {mode} {metric} time ==\n{'':>24} " + " ".join(f"{T:>10}" for T in lengths))
            for lab, row in tab.items():
                log(row_str(lab, row, fmt_seconds))
            for dims, per_T in p[metric][mode]["best_chunk"].items():
                cells = [f"{b['attention_over_chunkwise']:.2f}x C{b['chunk']}" if b["attention_over_chunkwise"] else "-"
                         for b in per_T.values()]
                log(f"{'attention/best ' + dims:>24} " + " ".join(f"{c:>10}" for c in cells))
    if "peers" in summary:
        for metric, mode in ((m, mo) for m in METRICS for mo in MODES):
            log(f"\n== peers: median {mode} {metric} time (peer / ours) ==")
            for form, per_T in summary["peers"][metric][mode].items():
                for T, row in per_T.items():
                    incl = row.get("peer_over_ours_incl_mask_build", {})
                    peers = ", ".join(f"{lab} {r:.2f}x" + (f" ({incl[lab]:.2f}x with masks)" if lab in incl else "")
                                      for lab, r in row["peer_over_ours"].items()) or "no peer measured"
                    log(f"  {form:>9} T={T:>5}: ours {fmt_seconds(row['ours_s'])}; {peers}")
        log(f"\ncorrectness vs reference: {summary['peers']['correctness']}")


def run_checks(args, payload_base) -> Dict[str, Any]:
    checks: Dict[str, Any] = {}
    if "prefill" in args.parts:
        checks["sdpa"] = spawn(__file__, "check_sdpa", {**payload_base, "B": 1, "H": args.heads, "Hkv": args.kv_heads,
                                              "Dk": args.attn_head_dim, "Dv": args.attn_head_dim, "impl": "sdpa"}, 300)
        log(f"sdpa path check: {checks['sdpa'].get('status')} {checks['sdpa'].get('sdpa_calls')}")
    if "peers" in args.parts:
        (dk, dv), C = args.peer_dims, args.peer_chunk_size
        T = C * max(2, -(-256 // C))  # a multiple of C (torchscale's chunkwise form requires it), >= 256
        checks["peers"] = spawn(__file__, "check", {**payload_base, "B": 1, "H": args.heads, "Dk": dk, "Dv": dv,
                                                    "chunk": C, "T": T}, 600)
        status = {k: v.get("status") for k, v in checks["peers"].get("vs_reference", {}).items()}
        log(f"peers check (fp32 vs fp64 reference): {checks['peers'].get('status')} {status}")
        for fam, a in checks["peers"].get("available", {}).items():
            if a.get("status") != "ok":
                log(f"  {fam}: skipped: {a.get('reason')}")
    return checks


def header(args, threads) -> Dict[str, Any]:
    result: Dict[str, Any] = run_header("prefill", sys.argv)
    result["machine"] = machine_info(torch_threads=threads)
    files = ["models/retention.py", "bench/prefill.py", "bench/common.py", "eval/measure.py"]
    result["code"] = {"sha256": {f: file_sha256(REPO / f) for f in files}, **git_state(files)}
    cfg = {k: v for k, v in vars(args).items() if k not in ("worker",)}
    result["config"] = {**cfg, "dtype": "float32",
                        "gamma": "1 - 2^(-5-h) for head h (paper; torchscale's and fla's default)"}
    result["method"] = {
        "fwd": "forward under torch.no_grad()",
        "fwd_bwd": "forward with the inputs requiring grad + output.backward(fixed random grad); "
                   "grads cleared (untimed)",
        "inputs": "q, k, v built untimed in each implementation's native layout: ours and fla simple_gla [B,T,H,D]; "
                  "torchscale qr,kr [B,H,T,Dk] contiguous and v [B,T,H*Dv]; fla naive_retention [B,H,T,D]; sdpa "
                  "[B,T,heads,D] leaves passed as transposed views [B,heads,T,D] (as LlamaAttention does)",
        "sdpa": "transformers.integrations.sdpa_attention.sdpa_attention_forward(module(num_key_value_groups=H/Hkv, "
                "is_causal=True), q, k, v, attention_mask=None, dropout=0, scaling=D^-0.5): the teacher's attention "
                "core without projections or RoPE; see checks.sdpa for the torch call it makes",
        "ours": "models/retention.py retention_parallel(output_final_state=False) / retention_chunkwise(chunk_size) / "
                "retention_recurrent, output only (chunkwise and recurrent compute the final state but the loss does "
                "not use it); decay matrices built inside",
        "torchscale": "MultiScaleRetention.parallel_forward(qr,kr,v,mask) | "
                      "chunk_recurrent_forward(qr,kr,v,inner_mask).reshape(B,T,H,Dv) | "
                      "recurrent_forward(one token, state dict) called T times (inputs unbound per "
                      "token, outputs stacked); masks from RetNetRelPos built untimed (their build time is under "
                      "torchscale_rel_pos_build); includes torchscale's own normalisations (abs row-sum and state-norm "
                      "clamps, sqrt decay-sum scaling); excludes projections, theta_shift, group norm, gate",
        "fla": "fla/ops/simple_gla/naive.py naive_parallel_simple_gla | naive_chunk_simple_gla(chunk_size) | "
               "naive_recurrent_simple_gla(output_final_state=False) with g = log(gamma) per token and scale=1; "
               "fla-naive_retention = fla/ops/retention/naive.py naive_retention(q,k,v) (parallel only, fixed paper "
               "decay, q * Dk^-0.5 inside); files executed by path (the fla package imports triton)",
        "memory": "fresh subprocess per (case, mode): PeakRSS, the RSS high-water mark during the op minus RSS "
                  "just before it",
        "correctness": "check worker, fp32 inputs, T = smallest multiple of C >= max(256, 2C), reference = our "
                       "parallel form in fp64: ours and fla compared directly (relative max error); torchscale "
                       "rescaled by its known per-position factor sqrt(sum_{m<=t} gamma^m) (t within the chunk for "
                       "chunkwise) on small inputs (so its clamps at 1 are inactive), and compared per (position, "
                       "head) after L2 normalisation on normal inputs (its group norm removes any per-position scale)",
        "skips_and_contention": "as bench/retention.py (estimated memory, predicted time, min_repeats in "
                                "max_seconds_per_case; wait for quiet, retry contended cases)",
    }
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        p = json.loads(args.worker)
        emit_worker_result(WORKERS[p["kind"]](p))
        return 0

    import torch

    threads = args.threads or torch.get_num_threads()
    args.contention_limit = contention_limit(threads, args.quiet_threshold)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = set(args.parts) - {"prefill", "peers"}
    if bad:
        raise SystemExit(f"unknown --parts {sorted(bad)}")
    if args.fla_path is None:
        loc, _ = find_fla(None)
        args.fla_path = loc
    t_start = time.perf_counter()
    result = header(args, threads)
    payload_base = {"threads": threads, "seed": args.seed, "fla_path": args.fla_path}
    log(f"[prefill bench] parts={args.parts} threads={threads} lengths={args.lengths} peer_lengths={args.peer_lengths}")

    checks = run_checks(args, payload_base)
    result["checks"] = checks
    unavailable = {fam: a.get("reason") for fam, a in checks.get("peers", {}).get("available", {}).items()
                   if a.get("status") != "ok"}
    if "peers" in args.parts and checks["peers"].get("status") != "ok":
        unavailable.update({fam: f"check worker failed: {checks['peers'].get('reason')}" for fam in PEERS})

    runner = Runner(args, payload_base, unavailable)
    specs = build_specs(args)
    cases = []
    for part in ("prefill", "peers"):
        part_specs = [s for s in specs if s["part"] == part]
        for T in sorted({T for s in part_specs for T in s["lengths"]}):
            cases += [runner.run_case(s, T) for s in part_specs if T in s["lengths"]]

    result["cases"] = cases
    result["summary"] = summarise(cases, args, checks)
    result["total_wall_s"] = time.perf_counter() - t_start
    result["total_waited_for_quiet_s"] = sum(runner.waits)
    print_tables(result["summary"])
    emit_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
