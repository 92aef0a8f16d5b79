"""Matrix-vector kernels for static-shape decoding: packed weights in huge pages, the
fastest of several library kernels chosen by timing per weight shape (choices cached on disk),
and the small ops in numpy (CPU) or torch. Nothing here is RetNet-specific.

This file travels inside every checkpoint (see `auto_map`): it imports only torch, numpy and
the standard library, never retconvert.
"""

import json
import mmap
import os
import platform
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

KERNELS = ("torch:out_in", "torch:in_out", "numpy:in_out", "numpy:out_in")
BACKENDS = ("numpy", "torch")
_KERNEL_CACHE: Dict[str, str] = {}  # this process's choices; also kept on disk, see _kernel_cache_file
_HUGE_PAGE = 2 << 20


# ------------------------------------------------------------------------ array backends


class NumpyOps:
    """Small ops in numpy (CPU): ~0.5 us a call on tiny arrays, where a torch op costs 1.5-5 us.
    `of` views a CPU tensor as an array without a copy; `apply` runs a torch function on one."""

    xp = np

    @staticmethod
    def of(t: torch.Tensor) -> np.ndarray:
        return t.numpy()

    @staticmethod
    def apply(fn: Callable, x: np.ndarray) -> np.ndarray:
        return fn(torch.from_numpy(x)).numpy()

    @staticmethod
    def rotate(x: np.ndarray, rot: np.ndarray) -> np.ndarray:
        """x (..., D) fp32 with rotary pairs adjacent, times rot (..., D/2) complex64."""
        return (x.view(np.complex64) * rot).view(np.float32)

    @staticmethod
    def amax(x: np.ndarray) -> np.ndarray:
        """Maximum over the last axis, kept."""
        return x.max(-1, keepdims=True)


class TorchOps:
    """The same small ops with torch, on any device."""

    xp = torch

    @staticmethod
    def of(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def apply(fn: Callable, x: torch.Tensor) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)

    @staticmethod
    def amax(x: torch.Tensor) -> torch.Tensor:
        return x.amax(-1, keepdim=True)


def default_ops(device: torch.device):
    """numpy for the small ops on CPU, torch elsewhere (what backend="auto" picks)."""
    return NumpyOps if device.type == "cpu" else TorchOps


# ------------------------------------------------------------------------ packed weights


class HugePageArena:
    """Carves CPU tensors out of large anonymous mappings that the kernel may back with 2 MiB
    transparent huge pages (Linux, THP in `madvise` or `always` mode; elsewhere plain pages).

    Streaming a large weight through 4 KiB pages misses the TLB every page; on a KVM guest each
    miss is a two-level walk, which holds one core to ~20 GB/s where huge pages reach ~35 GB/s.
    One arena packs many matrices back to back, so only the last partial huge page of a block
    is not covered (a mapping per matrix would leave every matrix's tail and every matrix
    under 2 MiB on small pages). A block lives as long as any tensor carved from it.
    """

    def __init__(self, block_bytes: int = 64 << 20):
        self.block_bytes = block_bytes
        self.buf, self.offset, self.end = None, 0, 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no anonymous private mappings to advise
            return torch.empty(shape, dtype=dtype)
        count = int(np.prod(shape))
        nbytes = count * torch.finfo(dtype).bits // 8
        if self.buf is None or self.offset + nbytes > self.end:
            self._new_block(nbytes)
        # frombuffer keeps the mapping alive as long as this tensor (or a view of it) lives.
        t = torch.frombuffer(self.buf, dtype=dtype, count=count, offset=self.offset).view(shape)
        self.offset += -(-nbytes // 64) * 64  # the next tensor starts on a cache line
        return t

    def _new_block(self, nbytes: int):
        size = max(self.block_bytes, -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE) + _HUGE_PAGE  # + room to align
        # Private: a shared anonymous mapping is shmem, which THP leaves alone.
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.buf.madvise(mmap.MADV_HUGEPAGE)
        self.offset = -np.frombuffer(self.buf, np.uint8, count=1).ctypes.data % _HUGE_PAGE
        self.end = size


def kernels_for(dtype: torch.dtype, device: torch.device, ops=None) -> Tuple[str, ...]:
    """Candidates: torch in both layouts; with the numpy backend (CPU) in fp32 also numpy's BLAS
    (OpenBLAS in the numpy wheels), whose matrix-vector product streams faster than MKL's on
    some CPUs."""
    ops = ops or default_ops(device)
    numpy_ok = ops is NumpyOps and device.type == "cpu" and dtype == torch.float32
    return tuple(k for k in KERNELS if numpy_ok or k.startswith("torch"))


def fastest_kernel(shape: Tuple[int, int], dtype: torch.dtype, device: torch.device, rows: int = 1,
                   ops=None) -> str:
    """The fastest way to multiply `rows` vectors (the batch) by a weight of `shape` (out, in),
    timed once per (shape, dtype, device, rows, backend) on enough copies that the product
    streams from memory as in decoding. Libraries differ by shape, dtype and CPU: on one AMD
    EPYC, fp32 F.linear (MKL) streams 12 GB/s, MKL with W stored (in, out) 25 GB/s, OpenBLAS
    25-37 GB/s."""
    ops = ops or default_ops(device)
    key = f"{shape[0]}x{shape[1]} {dtype} rows={rows} {ops.__name__} on {_device_name(device)}"
    if not _KERNEL_CACHE:
        _KERNEL_CACHE.update(_read_kernel_cache())
    if key not in _KERNEL_CACHE:
        out_f, in_f = shape
        copies = max(1, min(64, (64 << 20) // (out_f * in_f * torch.finfo(dtype).bits // 8)))
        x = ops.of(torch.randn(rows, in_f, device=device))
        timings = {}
        for kernel in kernels_for(dtype, device, ops):
            arena = HugePageArena() if device.type == "cpu" else None  # as the decoder stores them
            mats = [PackedMatrix(torch.randn(out_f, in_f, device=device), None, dtype, kernel, ops, rows, arena)
                    for _ in range(copies)]
            runs = []
            for _ in range(5):
                sync(device)
                t0 = time.perf_counter()
                for m in mats:
                    m(x)
                sync(device)
                runs.append(time.perf_counter() - t0)
            timings[kernel] = min(runs[1:])  # the first round is a warm-up; min: robust to other load
            del mats, arena
        _KERNEL_CACHE[key] = min(timings, key=timings.get)
        _write_kernel_cache()
    return _KERNEL_CACHE[key]


def _device_name(device: torch.device) -> str:
    """What a kernel choice depends on besides the shape: the processor and the libraries."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                chip = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), chip)
        except OSError:
            pass
    return f"{device.type}:{chip}, {os.cpu_count()} cpus, torch {torch.__version__}, numpy {np.__version__}"


def _kernel_cache_file() -> Optional[str]:
    """Where kernel choices persist between processes ($RETCONVERT_KERNEL_CACHE, default
    ~/.cache/retconvert/decoder-kernels.json); "off" keeps them in memory only. Timing every
    candidate costs seconds on first use, so generate() would otherwise pay it in every process."""
    path = os.environ.get("RETCONVERT_KERNEL_CACHE")
    if path == "off":
        return None
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "retconvert", "decoder-kernels.json")


def _read_kernel_cache() -> Dict[str, str]:
    path = _kernel_cache_file()
    try:
        with open(path) as f:
            cached = json.load(f)
    except (TypeError, OSError, ValueError):  # no cache (yet), unreadable or corrupt: time again
        return {}
    return {k: v for k, v in cached.items() if v in KERNELS} if isinstance(cached, dict) else {}


def _write_kernel_cache():
    """Merge this process's choices into the file, atomically; a read-only home is no error."""
    path = _kernel_cache_file()
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        merged = {**_read_kernel_cache(), **_KERNEL_CACHE}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PackedMatrix:
    """A packed weight (and optional bias) for `y = x W^T + b`, in the chosen kernel and dtype.
    Inputs and outputs are fp32 arrays of the backend `ops` (numpy or torch)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype, kernel: str,
                 ops, rows: int = 1, arena: Optional[HugePageArena] = None):
        if kernel == "auto":
            kernel = fastest_kernel(weight.shape, dtype, weight.device, rows, ops)
        self.kernel, self.dtype, self.ops = kernel, dtype, ops
        library, layout = kernel.split(":")
        w = weight.detach().to(dtype)  # (out, in)
        w = w.t() if layout == "in_out" else w
        self.w = torch.empty(w.shape, dtype=dtype, device=w.device) if arena is None else arena.empty(w.shape, dtype)
        self.w.copy_(w)  # contiguous, in the chosen layout
        self.w_op = self.w if layout == "in_out" else self.w.t()  # (in, out), possibly a view
        self.w_numpy = self.w_op.numpy() if library == "numpy" else None
        self.b = None if bias is None else ops.of(bias.detach().float().contiguous())

    def __call__(self, x, residual=None):
        """x (B, in) -> (B, out), fp32; `residual` (B, out) is added."""
        if self.w_numpy is not None:  # numpy backend, fp32: no conversions at all
            y = x @ self.w_numpy
        elif self.ops is NumpyOps:  # torch kernel under the numpy backend: shared memory both ways
            y = torch.mm(torch.from_numpy(x).to(self.dtype), self.w_op).float().numpy()
        else:
            y = torch.mm(x.to(self.dtype), self.w_op).float()
        if self.b is not None:
            y += self.b
        if residual is not None:
            y += residual
        return y
