"""Cost of one small attention call: CPU time per call and GPU time per call, SDPA vs each preset.

    python benchmarks/launch_overhead.py [--out DIR] [--shapes S1,S2] [--presets P1,P2]
                                         [--profile PRESET@SHAPE ...] [--torch-profile PRESET@SHAPE ...]

For each shape (default: the six small shapes of ``qflash bench``) and each implementation
(SDPA's default backend, then ``qflash.attention`` per preset):

- ``cpu_us``: wall-clock time per call of a loop of back-to-back calls, synchronised once at the
  end (the host cost of a call when the GPU keeps up: argument checks, dispatch, allocation,
  launches).
- ``graph_us``: GPU time per call under CUDA-graph replay (the call captured once, replayed
  ``n`` times between two CUDA events): the kernels alone, no host cost.

Prints one table and writes ``launch_overhead.json`` under ``--out``. ``--profile int8@1x1x1024x128``:
cProfile of ``qflash.attention`` for that preset and shape (repeatable). ``--torch-profile`` (same
spelling): torch.profiler table of the call (kernels with their GPU times, launches, allocations,
any host synchronisation). ``--no-table`` skips the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402
from qflash.bench.shapes import GPU_DEFAULT, parse_shapes  # noqa: E402

SMALL = [s for s in GPU_DEFAULT if s.batch * s.heads * s.seq * s.keys <= 2**23]


def cpu_us(fn, n=40, reps=7) -> float:
    """Host time per call: ``n`` back-to-back calls timed up to the return of the last one (the
    GPU drains afterwards; few enough calls that the launch queue never fills and holds the host
    up), median of ``reps`` such loops."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[reps // 2]


def graph_us(fn, n=200) -> float:
    """GPU time per call without the CPU launch cost: the call captured once in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture (compiles, plan caches)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=None, help="BxHxS[:Sk]xD,... (default: the small bench shapes)")
    ap.add_argument("--presets", default="none,int8,int8-fp8,fp8")
    ap.add_argument("--profile", action="append", default=[], metavar="PRESET@SHAPE")
    ap.add_argument("--torch-profile", action="append", default=[], metavar="PRESET@SHAPE")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--pieces", action="store_true", help="host µs of each step of a cached call (1x1x64x64)")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes) if args.shapes else SMALL
    presets = args.presets.split(",")
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    hdr = f"{'shape':<16} {'impl':<10} {'family':<9} {'cpu us':>7} {'x sdpa':>6} {'gpu us':>7} {'x sdpa':>6}"
    print(hdr)
    for shape in [] if args.no_table else shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda s: torch.randn(shape.batch, shape.heads, s, shape.head_dim, device="cuda",  # noqa: E731
                                   dtype=torch.bfloat16, generator=g)
        q, k, v = mk(shape.seq), mk(shape.keys), mk(shape.keys)
        impls = [("sdpa", "cudnn/flash", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))]
        from qflash.bench.impls import qflash_backend
        for p in presets:
            # "hopper>portable": the Hopper family hands small calls to the portable one
            fam = qflash_backend(p, q, k, v).replace("hopper>portable", "hop>port")
            impls.append((p, fam, lambda p=p: qflash.attention(q, k, v, quant=p)))
        base = None
        for name, fam, fn in impls:
            c, gu = cpu_us(fn), graph_us(fn)
            base = base or (c, gu)
            rows.append({"shape": shape.spec, "impl": name, "family": fam, "cpu_us": c, "graph_us": gu,
                         "cpu_vs_sdpa": c / base[0], "graph_vs_sdpa": gu / base[1]})
            print(f"{shape.spec:<16} {name:<10} {fam:<9} {c:7.1f} {c / base[0]:6.2f} {gu:7.1f} {gu / base[1]:6.2f}",
                  flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "launch_overhead.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=1)

    if args.pieces:
        host_pieces()
    for what in args.profile:
        preset, q, k, v = _profile_inputs(what)
        import cProfile
        import pstats

        for _ in range(20):
            qflash.attention(q, k, v, quant=preset)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            qflash.attention(q, k, v, quant=preset)
        torch.cuda.synchronize()
        pr.disable()
        print(f"== cProfile {what} (200 calls)")
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)
    for what in args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        preset, q, k, v = _profile_inputs(what)
        for _ in range(10):
            qflash.attention(q, k, v, quant=preset)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                qflash.attention(q, k, v, quant=preset)
            torch.cuda.synchronize()
        print(f"== torch.profiler {what} (20 calls)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=60))


def host_pieces() -> None:
    """Host µs of each step of a repeated ``qflash.attention`` call at 1x1x64x64 (the call cache's
    path), next to SDPA's whole call, each timed alone in a 2000-call loop."""
    import timeit

    from qflash import api, ops
    from qflash.kernels import fastlaunch

    q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for p in ("none", "int8"):
        for _ in range(3):
            qflash.attention(q, k, v, quant=p)
    key = api._call_key(q, k, v, "int8", False, None, "HND", False, "auto")
    plan = api._CALLS.get(key)
    dev = q.device
    steps = {
        "sdpa call": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "qflash.attention none": lambda: qflash.attention(q, k, v, quant="none"),
        "qflash.attention int8": lambda: qflash.attention(q, k, v, quant="int8"),
        "_call_key": lambda: api._call_key(q, k, v, "int8", False, None, "HND", False, "auto"),
        "_eager_fast_path": lambda: ops._eager_fast_path(q, k, v, None),
        "replay_ready": lambda: fastlaunch.replay_ready(dev),
        "torch.cuda.current_device": torch.cuda.current_device,
        "torch.empty 1x1x64x64 bf16": lambda: torch.empty(q.shape, dtype=q.dtype, device=dev),
        "torch.empty 4 KiB u8": lambda: torch.empty(4096, dtype=torch.uint8, device=dev),
        "PlanCache.replay int8": (lambda: fastlaunch.PlanCache.replay(plan, dev, (q, k, v, torch.empty_like(q), None)))
        if plan is not None else None,
        "current raw stream": lambda: torch._C._cuda_getCurrentRawStream(0),
    }
    print(f"int8 plan in the call cache: {plan is not None}"
          + (f" ({len(plan.launches)} launches, {plan.ws_bytes} B scratch)" if plan is not None else ""))
    for name, fn in steps.items():
        if fn is None:
            continue
        n = 2000
        t = min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6
        torch.cuda.synchronize()
        print(f"  {name:<32} {t:6.2f} us")


def _profile_inputs(what: str):
    preset, spec = what.split("@")
    shape = parse_shapes(spec)[0]
    q, k, v = (torch.randn(shape.batch, shape.heads, s, shape.head_dim, device="cuda", dtype=torch.bfloat16)
               for s in (shape.seq, shape.keys, shape.keys))
    return preset, q, k, v


if __name__ == "__main__":
    main()
