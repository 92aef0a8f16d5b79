"""Speed, memory and energy of decoding and prefill, teacher and student measured alternately.

Teacher: a plain transformers forward that fills its KV cache (prefill), then one
`model(input_ids=next, cache=cache)` per token. Student: the same calls; its RetNetState
makes every single-token step recurrent, whatever `retention_mode` says. A RetNet is also
decoded by its packed decoder (models/decoding_retnet.py), reported apart. `generate_curve`
times `model.generate()` as users call it (a RetNet's steps then run in its packed decoder).

Each curve comes from one loop over the measurement points; at every point the models
take turns in blocks of steps (three rounds), so a slow phase of a shared machine hits all
alike; the warm-up steps at the start of every block are excluded and medians reported.
Blocks rather than single steps, with a short pause between them: BLAS and OpenMP worker
threads keep spinning for a while after a call and would slow whichever model ran next.
A long context is prefilled once per length (batch 1) and the cache copied to the larger
batch sizes: decode timing does not depend on what the cache holds.
"""

import copy
import inspect
import time
from typing import Dict, List, Optional

import torch

from retconvert.eval.common import cache_nbytes, free_memory, is_oom, log
from retconvert.eval.measure import SETTLE_S, PeakRSS, median, sync, take_turns, timed
from retconvert.models.modeling_retnet import CACHE_NAME


def _forward_kwargs(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def prefill(m, ids: torch.Tensor):
    """Run the prompt, return (cache, next token ids (B, 1))."""
    out = m.model(input_ids=ids, use_cache=True, **_forward_kwargs(m.model))
    return out[CACHE_NAME], out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_step(model, cache, token):
    """One greedy token through `model`'s forward: (cache after it, next token ids (B, 1))."""
    out = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
    return out[CACHE_NAME], out.logits[:, -1:].argmax(-1)


def random_ids(m, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = min(m.model.config.vocab_size, len(m.tokenizer)) if hasattr(m.tokenizer, "__len__") \
        else m.model.config.vocab_size
    return torch.randint(0, vocab, (batch, length), generator=g).to(m.device)


def expand(cache, batch: int):
    """A copy of a batch-1 cache repeated to `batch` rows."""
    cache = copy.deepcopy(cache)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache


ROUNDS = 3


def blocks(steps: int) -> List[int]:
    """`steps` timed steps split into ROUNDS blocks (fewer when steps are few)."""
    n = max(1, min(ROUNDS, steps))
    return [steps // n + (1 if i < steps % n else 0) for i in range(n)]


class ModuleDecoding:
    """Greedy decoding through the model's own forward, one `model(input_ids=token, cache)` per
    token (transformers' path; a RetNet's RetNetState makes each step recurrent). `start`
    continues from a batch-1 prefill copied to `batch` rows, `step` decodes one token per row,
    `stop` drops the cache."""

    def __init__(self, model):
        self.model, self.cache, self.token = model, None, None

    def start(self, cache, token: torch.Tensor, batch: int):
        """Continue from `cache` and `token` (1, 1) of a batch-1 prefill, copied to `batch` rows."""
        self.cache, self.token = expand(cache, batch), token.expand(batch, 1).contiguous()

    def step(self):
        self.cache, self.token = decode_step(self.model, self.cache, self.token)

    def stop(self):
        self.cache = self.token = None


class PackedDecoding:
    """Greedy decoding by a RetNet's packed decoder (models/decoding_retnet.py), weights in `dtype`
    (None: the decoder's default, float32), with the calls of `ModuleDecoding`. One decoder per
    batch size, built on first use: its matrix kernels are chosen for that size."""

    def __init__(self, model, dtype: Optional[torch.dtype] = None):
        self.model, self.dtype, self.token = model, dtype, None
        self.decoders = {}  # batch size -> RetNetDecoder
        self.decoder = None  # the one `start` loaded

    def decoder_for(self, batch: int):
        """The decoder for `batch` rows (built and kept on first use)."""
        from retconvert.models.decoding_retnet import RetNetDecoder

        if batch not in self.decoders:
            self.decoders[batch] = RetNetDecoder(self.model, batch_size=batch, dtype=self.dtype)
        return self.decoders[batch]

    def start(self, cache, token: torch.Tensor, batch: int):
        """Continue from `cache` (a RetNetState) and `token` (1, 1) of a batch-1 prefill, copied to `batch` rows."""
        self.decoder = self.decoder_for(batch)
        self.decoder.load_state(expand(cache, batch))
        self.token = token.view(-1).repeat(batch)  # (B,)

    def step(self):
        self.token = self.decoder.step(self.token).argmax(-1)

    def stop(self):
        self.decoder = self.token = None


def decode_engines(models) -> list:
    """(model, engine name, decoding): every model through its own forward ("module"), and each
    RetNet also through its packed decoder ("packed")."""
    engines = []
    for m in models:
        engines.append((m, "module", ModuleDecoding(m.model)))
        if m.is_retnet:
            engines.append((m, "packed", PackedDecoding(m.model)))
    return engines


def decode_curve(models, contexts: List[int], batch_sizes: List[int], steps: int, warmup: int) -> Dict[str, list]:
    """{"curves": {model name: points}, "packed": {RetNet name: points of its packed decoder}, ...};
    a point is {"context_tokens", "batch_size", "latency_ms", "tokens_per_s", "steps"}."""
    engines = decode_engines(models)
    curves = {m.name: [] for m in models}
    packed = {m.name: [] for m in models if m.is_retnet}
    skipped = []
    for length in contexts:
        base = {}
        for m in models:
            try:
                base[m.name] = prefill(m, random_ids(m, 1, length))
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                skipped.append({"model": m.name, "context_tokens": length, "reason": "out of memory at prefill"})
        for batch in batch_sizes:
            started, times = [], {i: [] for i in range(len(engines))}
            for i, (m, engine, dec) in enumerate(engines):
                if m.name not in base:
                    continue
                try:
                    dec.start(*base[m.name], batch)
                    started.append(i)
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    skipped.append({"model": m.name, "engine": engine, "context_tokens": length,
                                    "batch_size": batch, "reason": "out of memory copying the cache"})
            times.update(take_turns({i: engines[i][2].step for i in started}, blocks(steps), warmup,
                                    device=models[0].device))
            line = []
            for i, (m, engine, dec) in enumerate(engines):
                dec.stop()
                if times[i]:
                    t = median(times[i])
                    (packed if engine == "packed" else curves)[m.name].append({
                        "context_tokens": length, "batch_size": batch, "latency_ms": t * 1e3,
                        "tokens_per_s": batch / t, "steps": len(times[i])})
                    line.append(f"{m.role}{' (packed)' if engine == 'packed' else ''} {t * 1e3:.2f} ms")
            log(f"  decode at context {length}, batch {batch}: " + ", ".join(line))
        del base
        free_memory(models[0].device)
    return {"curves": curves, "packed": packed, "skipped_points": skipped}


class StepClock:
    """A transformers streamer that only notes when each put() arrives: the first put is the
    prompt, each later one a generated token, so the gaps after the first token are the decoding
    steps, with the prompt pass left out. Batch 1 (transformers' streamers are)."""

    def __init__(self):
        self.times: List[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def step_seconds(self) -> List[float]:
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


def generate_engines(models) -> list:
    """(model, engine name, generate(ids, n, streamer)): every model's `generate()` as users call it
    (greedy, exactly n new tokens), and each RetNet's packed decoder, built once here."""
    engines = []
    for m in models:
        pad = m.model.generation_config.pad_token_id
        pad = pad if pad is not None else m.model.generation_config.eos_token_id

        def call(ids, n, streamer, model=m.model, pad=pad):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
                                  streamer=streamer)

        engines.append((m, "generate", call))
        if m.is_retnet:
            decoder = m.model.packed_decoder()
            engines.append((m, "packed", lambda ids, n, streamer, d=decoder: d.generate(ids, n, streamer=streamer)))
    return engines


@torch.no_grad()
def generate_curve(models, contexts: List[int], new_tokens: int, rounds: int = ROUNDS) -> Dict[str, dict]:
    """Greedy generation after a batch-1 prompt of each length, engines taking turns every round.

    Per point: `total_ms`, the median time of one call for `new_tokens` new tokens (prompt pass
    included), and `per_token_ms`, the median decoding step (the gap between two generated
    tokens, from a `StepClock` streamer: the prompt pass and start-up are left out). The first
    round is a warm-up (a RetNet's generate() packs its decoder then). A prompt that leaves no
    room for the new tokens in a model's positions is skipped for it. Returns {"generate":
    {model name: points}, "packed": {RetNet name: points}, "skipped_points": [...]}."""
    engines = generate_engines(models)
    out = {"generate": {m.name: [] for m in models}, "packed": {m.name: [] for m in models if m.is_retnet},
           "skipped_points": []}
    for length in contexts:
        times = {i: ([], []) for i in range(len(engines))}
        for i, (m, engine, _) in enumerate(engines):
            if m.max_context and length + new_tokens > m.max_context:
                del times[i]
                out["skipped_points"].append({"model": m.name, "engine": engine, "context_tokens": length, "reason":
                                              f"prompt + {new_tokens} tokens exceed its {m.max_context} positions"})
        for r in range(rounds + 1):
            for i, (m, _, gen) in enumerate(engines):
                if i not in times:
                    continue
                ids, clock = random_ids(m, 1, length, seed=r), StepClock()
                time.sleep(SETTLE_S)
                total, _ = timed(lambda: gen(ids, new_tokens, clock), m.device)
                if r:
                    times[i][0].append(total)
                    times[i][1].extend(clock.step_seconds())
        line = []
        for i, (m, engine, _) in enumerate(engines):
            if i not in times:
                continue
            total, per_token = median(times[i][0]), median(times[i][1])
            out[engine][m.name].append({"context_tokens": length, "new_tokens": new_tokens, "rounds": rounds,
                                        "total_ms": total * 1e3, "per_token_ms": per_token * 1e3,
                                        "steps": len(times[i][1])})
            line.append(f"{m.role}{' (packed)' if engine == 'packed' else ''} {total * 1e3:.0f} ms, "
                        f"{per_token * 1e3:.1f} ms/token")
        log(f"  generate {new_tokens} tokens after {length}: " + ", ".join(line))
        free_memory(models[0].device)
    return out


def prefill_variants(models) -> list:
    """(model, mode label, retention mode or None): teacher once, each RetNet in parallel and chunkwise."""
    out = []
    for m in models:
        if m.is_retnet:
            out += [(m, "parallel", "parallel"), (m, "chunkwise", "chunkwise")]
        else:
            out.append((m, "attention", None))
    return out


def prefill_curve(models, contexts: List[int], repeats: int, warmup: int, budget_s: Optional[float] = None) -> dict:
    """{model name: [{"mode", "context_tokens", "latency_ms", "tokens_per_s", "repeats"}]}.
    `budget_s`: the parallel form's time grows with the square of the length (T x T scores per
    head); it is not run at a length where its time at the previous one, scaled so, predicts
    more than `budget_s` seconds a run (recorded in "skipped_points"); None: no limit."""
    variants = prefill_variants(models)
    curves = {m.name: [] for m in models}
    skipped, dead = [], set()
    last = {}  # variant -> (length, median seconds) of its last measured point
    for length in contexts:
        for i, (m, label, _) in enumerate(variants):
            if label != "parallel" or i in dead or i not in last or not budget_s:
                continue
            predicted = last[i][1] * (length / last[i][0]) ** 2
            if predicted > budget_s:
                dead.add(i)
                skipped.append({"model": m.name, "mode": label, "context_tokens": length,
                                "reason": f"about {predicted:.0f} s a run predicted from {last[i][0]} tokens "
                                          f"(quadratic), over the {budget_s:g} s budget (--prefill-budget)"})
        times = {i: [] for i in range(len(variants))}
        for rep in range(warmup + repeats):
            for i, (m, label, mode) in enumerate(variants):  # alternate models and modes
                if i in dead:
                    continue
                ids = random_ids(m, 1, length, seed=rep)
                saved = m.retention_mode
                m.set_retention_mode(mode)
                try:
                    t, _ = timed(lambda: prefill(m, ids), m.device)
                except RuntimeError as e:
                    if not is_oom(e):
                        raise
                    dead.add(i)
                    skipped.append({"model": m.name, "mode": label, "context_tokens": length,
                                    "reason": "out of memory"})
                    continue
                finally:
                    m.set_retention_mode(saved)
                if rep >= warmup:
                    times[i].append(t)
        line = []
        for i, (m, label, _) in enumerate(variants):
            if times[i]:
                t = median(times[i])
                last[i] = (length, t)
                curves[m.name].append({"mode": label, "context_tokens": length, "latency_ms": t * 1e3,
                                       "tokens_per_s": length / t, "repeats": len(times[i])})
                line.append(f"{m.role}/{label} {length / t:,.0f} tok/s")
        free_memory(models[0].device)
        log(f"  prefill {length} tokens: " + ", ".join(line))
    return {"curves": curves, "skipped_points": skipped}


def memory_curve(models, contexts: List[int], decode_steps: int = 8) -> dict:
    """Cache bytes after a batch-1 prefill of each length, and the process's peak memory around it."""
    curves = {m.name: [] for m in models}
    skipped, reasons = [], set()
    for length in contexts:
        for m in models:  # alternate
            cuda = m.device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(m.device)
                cuda_base = torch.cuda.memory_allocated(m.device)
            ids = random_ids(m, 1, length)
            try:
                with PeakRSS() as peak:
                    cache, token = prefill(m, ids)
                    cache_bytes = cache_nbytes(cache)
                    for _ in range(decode_steps):
                        cache, token = decode_step(m.model, cache, token)
                    sync(m.device)
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                skipped.append({"model": m.name, "context_tokens": length, "reason": "out of memory"})
                continue
            point = {"context_tokens": length, "cache_bytes": cache_bytes,
                     "cache_bytes_per_token": cache_bytes / length}
            if peak.peak is not None:
                point["peak_rss_bytes"] = peak.peak
                point["peak_rss_increase_bytes"] = peak.peak - peak.baseline
            else:
                reasons.add(peak.reason)
            if cuda:
                point["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(m.device)
                point["peak_gpu_increase_bytes"] = point["peak_gpu_allocated_bytes"] - cuda_base
            curves[m.name].append(point)
            del cache, token
        log(f"  memory at {length} tokens: " + ", ".join(
            f"{m.role} cache {curves[m.name][-1]['cache_bytes']:,} B" for m in models
            if curves[m.name] and curves[m.name][-1]["context_tokens"] == length))
    return {"curves": curves, "skipped_points": skipped, "rss_unavailable": sorted(r for r in reasons if r)}


def energy_run(models, meter, context: int, batch: int, steps: int, repeats: int,
               assumed_watts: Optional[float] = None) -> Dict[str, dict]:
    """Joules per generated token while decoding `steps` tokens after a `context`-token prompt.

    With a meter: measured (counter difference). Without one and with `assumed_watts`: an
    estimate, elapsed time x that power, labelled as such. Models alternate per repeat.
    """
    out = {m.name: {"joules": [], "seconds": []} for m in models}
    base = {m.name: prefill(m, random_ids(m, 1, context)) for m in models}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for m in models:
            cache, token = base[m.name]
            cache, token = expand(cache, batch), token.expand(batch, 1).contiguous()
            sync(m.device)
            e0 = meter.read() if meter else None
            t0 = time.perf_counter()
            for _ in range(steps):
                cache, token = decode_step(m.model, cache, token)
            sync(m.device)
            seconds = time.perf_counter() - t0
            e1 = meter.read() if meter else None
            out[m.name]["seconds"].append(seconds)
            if meter:
                out[m.name]["joules"].append(meter.joules_between(e0, e1))
            del cache
    results = {}
    tokens = steps * batch
    for m in models:
        seconds = out[m.name]["seconds"][1:]
        r = {"context_tokens": context, "batch_size": batch, "generated_tokens": tokens, "repeats": repeats,
             "seconds": median(seconds)}
        if meter:
            joules = out[m.name]["joules"][1:]
            r.update(status="measured", counter=meter.name, scope=meter.scope,
                     joules_per_token=median(joules) / tokens,
                     average_watts=median([j / s for j, s in zip(joules, seconds)]))
        else:
            r.update(status="estimate", method=f"elapsed time x an assumed {assumed_watts} W (--assumed-watts); "
                                               "not a measurement", assumed_watts=assumed_watts,
                     estimated_joules_per_token=assumed_watts * median(seconds) / tokens)
        results[m.name] = r
        log(f"  energy {m.role}: " + (f"{r['joules_per_token']:.4g} J/token (measured, {meter.name})" if meter
                                      else f"{r['estimated_joules_per_token']:.4g} J/token (ESTIMATE)"))
    return results
