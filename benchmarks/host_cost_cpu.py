"""Host-side (Python) cost of one small qflash call, measurable on a CPU-only machine.

    python benchmarks/host_cost_cpu.py [--n 2000] [--profile PRESET]

The Triton kernels cannot run on a CPU outside the interpreter, so this times everything a call
does *except* the kernel launch itself: ``TRITON_INTERPRET=1`` is set and the interpreter's
``InterpretedFunction.run`` is replaced by a no-op, then ``qflash.attention`` (kernel path forced,
1x1x64x64 bf16, no autograd) is called in a loop: validation, the op / dispatch layers, config
and tuning lookups, allocations, the quantiser's token means, the kernel-argument building. GPU
launch cost (``benchmarks/launch_overhead.py``) is on top of this and is measured on a GPU.
Before/after comparisons of a refactor: run both commits on the same machine, a few times each.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402

interpreter.InterpretedFunction.run = lambda self, *a, **kw: None  # launches cost nothing here


def kernel_call():
    """qflash.attention with the kernel family forced (before issue 12: the op's "triton" backend)."""
    if "backend" in inspect.signature(qflash.attention).parameters:
        return lambda q, k, v, quant: qflash.attention(q, k, v, quant=quant, backend="portable")
    from qflash.api import validate_inputs
    from qflash.ops import call_attention_fwd

    def call(q, k, v, quant):
        validate_inputs(q, k, v, causal=False, attn_mask=None, scale=None, layout="HND", quant=quant)
        return call_attention_fwd(q, k, v, quant, backend="triton")[0]

    return call


def per_call_us(fn, n: int, repeats: int = 15) -> float:
    """Best of ``repeats`` loops of ``n`` calls (the minimum: this VM's neighbours add noise, never speed)."""
    for _ in range(50):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--profile", metavar="PRESET")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    call = kernel_call()
    q, k, v = (torch.randn(1, 1, 64, 64, dtype=torch.bfloat16) for _ in range(3))
    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.n):
            call(q, k, v, args.profile)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)
        return 0
    with torch.no_grad():
        for p in ("none", "int8", "int8-fp8", "fp8", "int4"):
            print(f"{p:9s} {per_call_us(lambda p=p: call(q, k, v, p), args.n):7.1f} us/call (host only, 1x1x64x64 bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
