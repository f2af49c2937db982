"""Interleaved A/B timing of attention-kernel configs at one shape (rounds alternate the configs,
so clock and thermal drift hit every config alike). Medians of the rounds; SDPA in every round.

    python benchmarks/ab.py --preset int8-fp8 --configs "64,128,4,3;64,128,4,3,tma,rot" --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402
from qflash.kernels.portable.launch import attention_fwd  # noqa: E402
from qflash.kernels.portable.tuning import KernelConfig  # noqa: E402


def parse(spec: str) -> KernelConfig:
    """'bm,bn,warps,stages[,tma][,rot]' -> KernelConfig (also sweep.py's --configs)."""
    parts = spec.split(",")
    return KernelConfig(*(int(x) for x in parts[:4]), tma="tma" in parts, rotate="rot" in parts)


def main(argv=None):
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1x24x4608x128")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--preset", default="int8-fp8")
    ap.add_argument("--configs", default="64,128,4,3;64,128,4,3,tma,rot")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    B, H, S, D = (int(x) for x in args.shape.split("x"))
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = qflash.resolve_quant(args.preset)
    fns = {"sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal)}
    for spec in args.configs.split(";"):
        kc = parse(spec)
        fns[spec] = lambda kc=kc: attention_fwd(q, k, v, cfg, causal=args.causal, kernel_config=kc)
    for name, fn in list(fns.items()):
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as exc:  # e.g. OutOfResources: tiles that do not fit shared memory
            print(f"  {name}: {type(exc).__name__}: {str(exc)[:100]}")
            del fns[name]
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    sdpa = statistics.median(times["sdpa"])
    print(f"{torch.cuda.get_device_name()} shape {args.shape} causal={args.causal} preset {args.preset}, "
          f"{args.rounds} interleaved rounds (median ms, min-max)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:28s} {med:.4f} ms ({min(ts):.4f}-{max(ts):.4f})  x{sdpa / med:.3f} vs sdpa")


if __name__ == "__main__":
    main()
