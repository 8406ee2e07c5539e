"""Memory of a conversion: glibc's allocator settings and the peak resident memory of each stage."""
from __future__ import annotations

import ctypes
import re
import resource
from pathlib import Path

import torch


def glibc(function: str, *args: int) -> None:
    """Calls a glibc allocator tuning function; elsewhere there is nothing to tune."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass


# glibc serves buffers below a threshold that adapts up to 32 MiB from its heap and keeps them after a free. At 7B
# shapes the activations (8-22 MiB) then fragment the heap by ~180 MiB a block in distillation (bench/memory.py
# shapes, measured); fixed at 4 MiB they are mapped and returned on free, for 10-25% slower 7B-shaped steps. SmolLM2's
# buffers are under it. The setting is the process's from the first conversion on.
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 4 << 20


def return_freed_memory_to_the_system() -> None:
    glibc("mallopt", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class StagePeaks:
    """Peak resident memory per conversion stage. Linux keeps a process's peak (VmHWM) and restarts it from the
    present size when 5 is written to /proc/self/clear_refs, so each stage gets its own peak, and a memory benchmark
    can extrapolate each stage to a deeper model on its own. Where that is missing, every stage reports the running
    peak of the process. A conversion on a GPU also reports each stage's peak of torch's allocations there."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.overall_mib = 0.0
        self.gpu = device if device.type == "cuda" else None
        self._restart()

    @staticmethod
    def _restart() -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    @staticmethod
    def _peak_mib() -> float:
        try:
            return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def end_stage(self) -> str:
        """This stage's peak for its log line; the next stage counts from the present, trimmed size."""
        peak = self._peak_mib()
        self.overall_mib = max(self.overall_mib, peak)
        glibc("malloc_trim", 0)  # a stage should not inherit the freed heap of the one before
        self._restart()
        gpu = ""
        if self.gpu is not None:
            gpu = f"peak GPU memory {torch.cuda.max_memory_allocated(self.gpu) / 2**20:.0f} MiB, "
            torch.cuda.reset_peak_memory_stats(self.gpu)
        return f"{gpu}peak RSS {peak:.0f} MiB"
