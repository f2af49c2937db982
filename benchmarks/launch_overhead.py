"""CPU cost of one qflash call at a tiny shape (where launches, not math, set the time).

    python benchmarks/launch_overhead.py [--profile] [--do-bench] [--torch-profile]

``--profile``: cProfile of ``attention_fwd``. ``--do-bench``: 1x1x64x64 timed as ``qflash bench``
times it (``do_bench``, L2 cleared before each call, the preset passed by name). ``--torch-profile``:
torch.profiler tables (launches, allocations, any host synchronisation) of ``qflash.attention``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402
from qflash.kernels.portable.launch import attention_fwd, quantize_qkv  # noqa: E402


def per_call_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
print(f"sdpa: {per_call_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)):.1f} us/call")
for p in ("none", "int8", "int8-fp8", "fp8"):
    cfg = qflash.resolve_quant(p)
    print(f"{p}: attention_fwd {per_call_us(lambda: attention_fwd(q, k, v, cfg)):.1f} us/call; "
          f"qflash.attention {per_call_us(lambda: qflash.attention(q, k, v, quant=cfg)):.1f} us/call"
          + (f"; quantize_qkv {per_call_us(lambda: quantize_qkv(q, k, v, cfg)):.1f} us" if cfg.quantizes_qk else ""))
print(f"torch.mean: {per_call_us(lambda: torch.mean(k, dim=2, dtype=torch.float32)):.1f} us; "
      f"torch.empty: {per_call_us(lambda: torch.empty(1, 1, 64, 64, device='cuda')):.1f} us")



def graph_us(fn, n=200):
    """GPU time per call without the CPU launch cost: the call captured once in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


for shape in ((1, 1, 64, 64), (1, 1, 512, 64), (1, 1, 1024, 128)):
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    row = [f"sdpa {graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)):.1f}"]
    for p in ("none", "int8", "int8-fp8", "fp8"):
        cfg = qflash.resolve_quant(p)
        row.append(f"{p} {graph_us(lambda: attention_fwd(q, k, v, cfg)):.1f}")
        if p != "none":  # the other mode: two launches (quantiser + attention) vs one (fused)
            row.append(f"{p}/2-launch {graph_us(lambda: attention_fwd(q, k, v, cfg, fused_quant=False)):.1f}")
            row.append(f"{p}/fused {graph_us(lambda: attention_fwd(q, k, v, cfg, fused_quant=True)):.1f}")
    print(f"GPU us per call (CUDA graph replay) {shape}: " + ", ".join(row))
q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

if "--profile" in sys.argv:
    import cProfile
    import pstats

    cfg = qflash.resolve_quant("int8-fp8")
    for _ in range(20):
        attention_fwd(q, k, v, cfg)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        attention_fwd(q, k, v, cfg)
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)

if "--do-bench" in sys.argv:
    from triton.testing import do_bench

    for p in ("none", "int8", "int8-fp8", "fp8"):
        cfg = qflash.resolve_quant(p)
        api = lambda p=p: qflash.attention(q, k, v, quant=p)  # noqa: E731
        fwd = lambda cfg=cfg: attention_fwd(q, k, v, cfg)  # noqa: E731
        api_ms = sorted(do_bench(api, warmup=25, rep=100, return_mode="all"))
        fwd_ms = sorted(do_bench(fwd, warmup=25, rep=100, return_mode="all"))
        print(f"{p}: do_bench median api {api_ms[len(api_ms) // 2] * 1e3:.1f} us (min {api_ms[0] * 1e3:.1f}), "
              f"attention_fwd {fwd_ms[len(fwd_ms) // 2] * 1e3:.1f} us (min {fwd_ms[0] * 1e3:.1f}); "
              f"CPU api {per_call_us(api):.1f} us, fwd {per_call_us(fwd):.1f} us", flush=True)

if "--torch-profile" in sys.argv:
    from torch.profiler import ProfilerActivity, profile

    for p in ("int8", "int8-fp8"):
        for _ in range(10):
            qflash.attention(q, k, v, quant=p)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                qflash.attention(q, k, v, quant=p)
            torch.cuda.synchronize()
        print(f"== torch.profiler {p} (20 calls)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
