"""Small-call cost at 1x1x64x64 bf16: ``qflash.attention`` called with a preset name (as
``qflash bench`` calls it) and ``attention_fwd`` under ``triton.testing.do_bench``, their CPU cost
per call, and a torch.profiler table (launches, allocations, any host synchronisation).

    python benchmarks/small_calls.py          (on a GPU machine, from the repo root)
"""
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash
from qflash.kernels.launch import attention_fwd

q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def cpu_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


for p in ("none", "int8", "int8-fp8", "fp8"):
    cfg = qflash.resolve_quant(p)
    api = lambda p=p: qflash.attention(q, k, v, quant=p)
    fwd = lambda cfg=cfg: attention_fwd(q, k, v, cfg)
    api_ms = sorted(do_bench(api, warmup=25, rep=100, return_mode="all"))
    fwd_ms = sorted(do_bench(fwd, warmup=25, rep=100, return_mode="all"))
    print(f"{p}: do_bench median api {api_ms[len(api_ms)//2]*1e3:.1f} us (min {api_ms[0]*1e3:.1f}), "
          f"attention_fwd {fwd_ms[len(fwd_ms)//2]*1e3:.1f} us (min {fwd_ms[0]*1e3:.1f}); "
          f"CPU api {cpu_us(api):.1f} us, fwd {cpu_us(fwd):.1f} us", flush=True)

from torch.profiler import ProfilerActivity, profile

for p in ("int8", "int8-fp8"):
    for _ in range(10):
        qflash.attention(q, k, v, quant=p)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            qflash.attention(q, k, v, quant=p)
        torch.cuda.synchronize()
    print(f"== profiler {p} (20 calls)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60))
