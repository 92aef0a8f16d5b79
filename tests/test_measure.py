"""The measurement toolkit shared by the eval suite and bench/ (eval/measure.py)."""

import mmap
import sys
from pathlib import Path

import pytest

from retconvert.eval import measure


def _touch(nbytes: int) -> mmap.mmap:
    """Fresh anonymous pages, written: RSS must rise by `nbytes` (no allocator cache can serve them)."""
    block = mmap.mmap(-1, nbytes)
    block.write(b"\x01" * nbytes)
    return block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux's")
def test_peak_rss_resets_the_high_water_mark():
    big = _touch(64_000_000)
    big.close()  # the process's lifetime peak is now >= 64 MB above what is resident
    with measure.PeakRSS() as m:
        small = _touch(16_000_000)
    small.close()
    assert m.reason is None and m.result["resolved"]
    # Without the reset the mark would still show the 64 MB block freed before entry.
    assert 8_000_000 <= m.peak - m.baseline < 48_000_000
    assert m.result["peak_extra_bytes"] == m.peak - m.baseline


def test_peak_rss_without_reset_resolves_only_a_new_peak(monkeypatch):
    """Where the mark cannot be reset, it is the lifetime peak: it tells the block's peak
    only when the block moved it."""
    monkeypatch.setattr(measure, "_reset_rss_peak", lambda: "cannot reset (test)")
    monkeypatch.setattr(measure, "rss_bytes", lambda: 100)
    marks = iter([500, 500, 500, 900])  # (entry, exit) of a block under the lifetime peak, then above it
    monkeypatch.setattr(measure, "_high_water_bytes", lambda: next(marks))
    with measure.PeakRSS() as below:
        pass
    assert below.peak is None and "cannot reset (test)" in below.reason
    assert below.result["resolved"] is False and below.result["upper_bound_bytes"] == 400
    with measure.PeakRSS() as above:
        pass
    assert above.reason is None and above.peak == 900 and above.result["peak_extra_bytes"] == 800


def test_time_callable_budget_skips_with_reason():
    out = measure.time_callable(lambda: sum(range(10)), repeats=3, warmup=1)
    assert out["status"] == "ok" and out["n"] == 3 and len(out["cpu_time"]["times_s"]) == 3
    assert out["min_s"] <= out["median_s"] <= out["max_s"]
    import time

    skipped = measure.time_callable(lambda: time.sleep(0.05), repeats=5, warmup=1, budget_s=0.06, min_repeats=3)
    assert skipped["status"] == "skipped" and "time budget" in skipped["reason"] and "median_s" not in skipped


def test_take_turns_blocks_warmup_and_starts():
    calls, starts = [], []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = measure.take_turns(steps, blocks=[2, 3], warmup=1, settle_s=0.0, starts={"b": lambda: starts.append(1)})
    assert [len(times["a"]), len(times["b"])] == [5, 5]  # timed steps only
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 4 + ["b"] * 4  # turns, a block (warm-up + timed) each
    assert starts == [1, 1]  # once per block of "b"


def test_machine_info_keys_and_json(tmp_path):
    info = measure.machine_info("cpu", torch_threads=1)
    assert info["cpu"] == info["cpu_model"] and info["cpu_count"] == info["logical_cpus"]
    assert info["torch_threads"] == 1 and info["device"] == "cpu" and info["transformers"]
    out = measure.write_json(tmp_path / "sub" / "r.json", {"machine": info, "path": Path("x")})
    assert '"path": "x"' in out.read_text() and not list(tmp_path.glob("sub/*.tmp"))


def test_bench_results_name_no_machine_folders(tmp_path, monkeypatch):
    """bench/ writes paths as the README does: repository-relative, `../shared/...`, `~/...`."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("_bench_common_under_test", repo / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = {"cwd": str(repo), "argv": ["bench/x.py", "--data", str(repo.parent / "shared" / "c4.jsonl"),
                                         "--out", str(tmp_path / "home" / "runs" / "x.json")],
              "n": 3, "other": "/opt/elsewhere", "name": "smollm2-135m"}
    assert common.portable(result) == {"cwd": ".", "argv": ["bench/x.py", "--data", "../shared/c4.jsonl",
                                                            "--out", "~/runs/x.json"],
                                       "n": 3, "other": "/opt/elsewhere", "name": "smollm2-135m"}
    common.write_json(tmp_path / "r.json", result)
    assert str(repo) not in (tmp_path / "r.json").read_text()
