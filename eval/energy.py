"""Energy counters: NVML on NVIDIA GPUs, RAPL on Linux CPUs. Nothing is ever guessed here.

A meter reads a cumulative counter in joules; `reason` says why none is readable.
"""

import glob
import importlib.util
import os
from pathlib import Path
from typing import List, Optional

import torch


class EnergyMeter:
    name = "none"
    scope = ""

    def read(self) -> float:  # joules, cumulative (wraparound handled by `joules_between`)
        raise NotImplementedError

    def joules_between(self, start, end) -> float:
        return end - start


class NvmlMeter(EnergyMeter):
    name = "nvml"

    def __init__(self, index: int):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.scope = f"whole GPU {index} ({pynvml.nvmlDeviceGetName(self.handle)}), other processes on it included"
        self.read()  # raises if the counter is not supported (pre-Volta GPUs)

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0  # mJ -> J


class RaplMeter(EnergyMeter):
    """Sum of the top-level package domains (intel-rapl:N, also AMD's RAPL-compatible counters)."""

    name = "rapl"

    def __init__(self, domains: List[Path]):
        self.domains = domains
        self.max_uj = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self.scope = (f"CPU package energy of {len(domains)} package(s) ({', '.join(d.name for d in domains)}); "
                      "includes every process on those packages, not DRAM/GPU")
        self.read()

    def read(self):
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def joules_between(self, start, end) -> float:
        total = 0
        for a, b, top in zip(start, end, self.max_uj):
            total += b - a if b >= a else b + top - a  # the counter wrapped at max_energy_range_uj
        return total / 1e6


def find_meter(device) -> "tuple[Optional[EnergyMeter], str]":
    """(meter, description) or (None, reason)."""
    device = torch.device(device)
    if device.type == "cuda":
        if importlib.util.find_spec("pynvml") is None:
            return None, "no energy counter: pynvml (nvidia-ml-py) is not installed, so NVML cannot be read"
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            try:
                index = int(visible.split(",")[index])
            except (ValueError, IndexError):
                pass
        try:
            meter = NvmlMeter(index)
            return meter, meter.scope
        except Exception as e:
            return None, f"no energy counter: NVML total energy is not readable ({type(e).__name__}: {e})"
    domains = [Path(p) for p in sorted(glob.glob("/sys/class/powercap/intel-rapl:*"))
               if Path(p).name.count(":") == 1]
    if not domains:
        return None, "no energy counter: no RAPL domains under /sys/class/powercap (not Linux on x86, or hidden)"
    try:
        meter = RaplMeter(domains)
        return meter, meter.scope
    except (OSError, ValueError) as e:
        return None, (f"no energy counter: RAPL energy_uj is not readable ({e}); "
                      "reading it usually needs root since Linux 5.10")
