"""The harness's one timer: ``triton.testing.do_bench`` on the GPU, a wall-clock loop on the CPU.

``time_fn`` / ``time_gpu`` / ``time_cpu`` time a call for a duration (``qflash bench``, ``tune``);
``time_calls`` times a fixed number of calls one by one (CUDA events; the Flux end-to-end run) and
``median_ms`` is the median of either (the Flux prologue table).

GPU: ``do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")`` — Triton's own loop
(L2 cache flushed before every call, CUDA events around each) — and we take
``statistics.median`` and ``statistics.mean`` of its per-call times: the median is exactly what
``return_mode="median"`` returns, with the mean from the same samples at no extra cost.

CPU: ``time.perf_counter`` around each call after a warm-up, for ``rep_ms`` of calls (at least
``MIN_CALLS``, at most ``MAX_CALLS``). These time the reference path, not a kernel.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

MIN_CALLS = 3
MAX_CALLS = 200


def time_gpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> tuple[float, float, int]:
    """(median_ms, mean_ms, calls) of ``fn`` on the current CUDA device."""
    from triton.testing import do_bench

    times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return statistics.median(times), statistics.mean(times), len(times)


def time_cpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> tuple[float, float, int]:
    """(median_ms, mean_ms, calls) of ``fn`` by wall clock (one warm-up call at least)."""
    t_end = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < MIN_CALLS or (time.perf_counter() < t_end and len(times) < MAX_CALLS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), statistics.mean(times), len(times)


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float):
    """Dispatch to ``time_gpu`` or ``time_cpu`` by device."""
    if device.type == "cuda":
        return time_gpu(fn, warmup_ms, rep_ms)
    return time_cpu(fn, warmup_ms, rep_ms)


def describe_timer(device: torch.device, warmup_ms: float, rep_ms: float) -> str:
    if device.type == "cuda":
        return (f"triton.testing.do_bench(warmup={warmup_ms:g}, rep={rep_ms:g}, return_mode='all'); "
                "median and mean of its per-call times")
    return f"wall clock (time.perf_counter) per call, {warmup_ms:g} ms warm-up, {rep_ms:g} ms of calls"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> tuple[list[float], object]:
    """Times of ``reps`` calls of ``fn`` in ms after ``warmup`` calls, and the last call's result.

    CUDA: a pair of CUDA events around each call (the GPU time of the call's stream, launch
    overhead included since the forward is launched from Python), synchronised after each.
    CPU: ``time.perf_counter`` around each call.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def median_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median ms of ``fn``. CUDA: ``triton.testing.do_bench`` (back-to-back calls, so the GPU queue
    hides Python launch overhead as it does inside the model; L2 flushed before each call)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return statistics.median(time_calls(fn, device, warmup=warmup, reps=reps)[0])
