"""What the benchmarks measure of the machine itself: its cores and thread count, its dense matmul peak,
the peak memory of a stretch of work, and progress lines with the time since the start.

torch is imported inside the functions that need it, so a harness that only starts other processes
(``vs_trl.py``) does not load it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def physical_cores() -> int:
    """Physical cores available to this process (psutil when installed, else the affinity mask)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))


def default_threads() -> tuple[int, str]:
    """(threads, where the number came from): OMP_NUM_THREADS when set to a positive integer, else the
    physical cores. (torch reads OMP_NUM_THREADS itself at start-up; the benchmark sets its thread
    count explicitly, so it has to honour the variable too.)"""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return physical_cores(), "physical cores"


class Progress:
    """One line per event on stderr, with the seconds since the start; silent with --no-progress."""

    def __init__(self, enabled: bool = True, *, width: int = 6) -> None:
        self.enabled, self.width, self.t0 = enabled, width, time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:{self.width}.1f} s] {message}", file=sys.stderr, flush=True)


def dense_matmul_peak(*, dtype: Any, device: str, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of ``size x size @ size x size`` (2 size^3 FLOPs), same dtype/threads as the model."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory during the timed steps: CUDA max_memory_allocated, or on CPU the peak RSS (VmHWM,
    reset through /proc/self/clear_refs when the kernel allows it; else ru_maxrss, a process-wide peak)."""

    def __init__(self, device: str):
        self.device = device
        self.how = ""

    def start(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "torch.cuda.max_memory_allocated - allocated before the steps"
            return
        self.base = _proc_status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.how = "peak RSS (VmHWM, reset before the steps) - RSS before the steps"
        except OSError:
            self.how = "process peak RSS (VmHWM; could not reset) - RSS before the steps"

    def delta_bytes(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() - self.base
        return (_proc_status_kb("VmHWM") - self.base) * 1024


def _proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
