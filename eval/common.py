"""Helpers of the eval suites other than measurement (that is retconvert.eval.measure): progress
lines, out-of-memory handling, the bytes a decoding cache holds."""

import gc
import sys
import time

import torch

_T0 = time.time()


def log(message: str):
    """A progress line on stderr: elapsed time, then the message."""
    elapsed = time.time() - _T0
    print(f"[eval {int(elapsed // 60):3d}:{elapsed % 60:04.1f}] {message}", file=sys.stderr, flush=True)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def free_memory(device=None):
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def cache_nbytes(cache) -> int:
    """Bytes held by a decoding cache: RetNetState.nbytes(), or the tensors of a KV cache."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    if hasattr(cache, "layers"):  # transformers >= 4.56 Cache: one object per layer
        return sum(_tensor_bytes(vars(layer)) for layer in cache.layers)
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return _tensor_bytes(list(cache.key_cache) + list(cache.value_cache))
    return _tensor_bytes(cache)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
