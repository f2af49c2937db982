"""Forward+backward benchmark of the qflash backward (issue 7) against SDPA's default backend.

Usage (H100, bf16, the Flux 1024px shape by default):

    python benchmarks/bwd_bench.py                       # (1, 24, 4608, 128), non-causal
    python benchmarks/bwd_bench.py --causal --shape 1,32,8192,128
    python benchmarks/bwd_bench.py --no-sweep            # skip the tile-config sweep
    TRITON_INTERPRET=1 python benchmarks/bwd_bench.py --shape 1,2,64,64 --no-sweep   # CPU smoke run

What it does, in order (correctness before timing):

1. fp32 exact gradients (PyTorch's math SDPA in fp32, TF32 off) of fresh N(0,1) inputs.
2. Sweeps ``BwdConfig`` candidates for the bf16 backward (each checked against (1) first) and
   keeps the fastest; prints every candidate's time.
3. Times forward+backward (``triton.testing.do_bench``, median) of
   - ``sdpa``: F.scaled_dot_product_attention, default backend (cuDNN on H100), bf16;
   - ``qflash none``: the op with return_lse=True, so the backward reuses O and lse;
   - ``qflash none (no lse)``: qflash.attention(quant="none") as a user calls it today: the op
     is asked for no lse, so the backward recomputes O and lse (one extra forward);
   - ``qflash int8`` / ``int8-fp8``: quantised forward, STE backward (extra ``none`` forward);
   - ``qflash none + bwd int8``: exact forward, low-bit INT8 backward;
   and the backward alone (forward outputs precomputed) for sdpa and the qflash kernels.
4. Gradient relL2 (dq, dk, dv) of every row against (1), saved-activation bytes per preset.

The last lines printed are a Markdown table (the summary to paste into docs/PERFORMANCE.md).
Ratios are sdpa_time / qflash_time (> 1 means qflash is faster), measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:  # CPU smoke run through Triton's interpreter, with the test suite's dtype fixes
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import triton_interpreter_shim

    triton_interpreter_shim.apply()

import triton.compiler.errors  # after TRITON_INTERPRET is set: Triton reads it at import
import triton.runtime.errors

from qflash.autograd import saved_bytes
from qflash.config import PRESETS
from qflash.kernels.portable.bwd_launch import BwdConfig, attention_bwd, pick_bwd_config
from qflash.kernels.portable.launch import attention_fwd
from qflash.ops import call_attention_fwd

# Tile candidates for the sweep: (block_m1, block_n1, block_m2, block_n2, warps1, stages1, warps2, stages2)
CANDIDATES = [
    BwdConfig(32, 128, 128, 32, 4, 4, 4, 4),
    BwdConfig(32, 128, 128, 32, 8, 3, 8, 3),
    BwdConfig(64, 128, 128, 64, 8, 2, 8, 2),
    BwdConfig(64, 128, 128, 64, 8, 3, 8, 3),
    BwdConfig(64, 64, 64, 64, 4, 3, 4, 3),
    BwdConfig(32, 64, 64, 32, 4, 3, 4, 3),
    BwdConfig(64, 128, 64, 64, 8, 2, 4, 3),
    BwdConfig(128, 128, 128, 128, 8, 2, 8, 2),
    BwdConfig(32, 128, 128, 64, 4, 3, 8, 2),
    BwdConfig(16, 128, 128, 16, 4, 4, 4, 4),
]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median ms per call: triton.testing.do_bench on CUDA, a wall-clock loop elsewhere."""
    if CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,24,4608,128", help="B,H,S,D (Sq = Sk)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-sweep", action="store_true", help="use pick_bwd_config only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    B, H, S, D = (int(x) for x in args.shape.split(","))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = torch.device("cuda" if CUDA else "cpu")
    causal = args.causal
    name = f"({B},{H},{S},{D}) {args.dtype}{' causal' if causal else ''}"
    print(f"# qflash backward bench: {name} on {torch.cuda.get_device_name() if CUDA else 'CPU (interpreter)'}, "
          f"torch {torch.__version__}, triton {__import__('triton').__version__}")

    g = torch.Generator(device=dev).manual_seed(args.seed)
    q, k, v, do = (torch.randn(B, H, S, D, device=dev, generator=g).to(dtype) for _ in range(4))

    # ---- 1. fp32 exact gradients ------------------------------------------------------------
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        of = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)  # Sq == Sk: top-left == bottom-right
        ref = torch.autograd.grad(of, (qf, kf, vf), do.float())
    del of, qf, kf, vf
    if CUDA:
        torch.cuda.empty_cache()

    def errs(grads) -> tuple[float, float, float]:
        return tuple(rel_l2(a, b) for a, b in zip(grads, ref))

    out, lse = attention_fwd(q, k, v, PRESETS["none"], causal=causal, return_lse=True)

    # ---- 2. tile sweep of the bf16 backward ---------------------------------------------------
    best = pick_bwd_config(dev, D)
    if not args.no_sweep and CUDA:
        print("\n## tile sweep (backward only, fwd outputs precomputed)")
        print("| config | bwd ms | max relL2 |")
        print("|---|---|---|")
        best_t = math.inf
        for cand in [best] + [c for c in CANDIDATES if c != best]:
            try:
                gr = attention_bwd(q, k, v, out, lse, do, causal=causal, kernel_config=cand)[:3]
                e = max(errs(gr))
                if not e < 2e-2:
                    print(f"| {cand} | — | {e:.2e} (rejected) |")
                    continue
                t = bench(lambda cand=cand: attention_bwd(q, k, v, out, lse, do, causal=causal, kernel_config=cand))
            except (RuntimeError, ValueError, triton.runtime.errors.OutOfResources,
                    triton.compiler.errors.CompilationError) as exc:  # too much shared memory / registers
                print(f"| {cand} | failed: {type(exc).__name__}: {str(exc)[:80]} | |")
                continue
            print(f"| {cand} | {t:.3f} | {e:.2e} |")
            if t < best_t:
                best, best_t = cand, t
        print(f"best: {best}")
    kc = best

    # ---- 3. timings -------------------------------------------------------------------------
    rows = []  # (name, fwd+bwd ms, bwd-only ms or None, grads)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd_bwd(fwd):
        def run():
            o = fwd()
            torch.autograd.grad(o, (qg, kg, vg), do)
        return run

    def sdpa_fwd():
        return F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)

    sdpa_out = sdpa_fwd()
    sdpa_grads = torch.autograd.grad(sdpa_out, (qg, kg, vg), do, retain_graph=True)
    t_sdpa = bench(fwd_bwd(sdpa_fwd))
    t_sdpa_bwd = bench(lambda: torch.autograd.grad(sdpa_out, (qg, kg, vg), do, retain_graph=True))
    rows.append(("sdpa (default backend)", t_sdpa, t_sdpa_bwd, sdpa_grads))

    backend = "auto" if CUDA else "triton"

    def qf_op(quant, lse_kept, **bwd):
        return lambda: call_attention_fwd(qg, kg, vg, quant, causal=causal, return_lse=lse_kept, backend=backend,
                                          **bwd)[0]

    # the op's autograd picks pick_bwd_config; the sweep's best is used in the bwd-only rows
    for label, quant, lse_kept, bwd in (
            ("qflash none", "none", True, {}), ("qflash none (no lse: recompute)", "none", False, {}),
            ("qflash int8 fwd + STE bwd (reuses fwd O/lse)", "int8", False, {"bwd_recompute": False}),
            ("qflash int8 fwd + STE bwd (exact recompute)", "int8", False, {"bwd_recompute": True}),
            ("qflash int8-fp8 fwd + STE bwd (exact recompute)", "int8-fp8", False, {"bwd_recompute": True}),
            ("qflash int8-fp8 fwd + INT8 bwd (reuses fwd O/lse)", "int8-fp8", False,
             {"bwd_recompute": False, "bwd_lowbit": "int8"})):
        fn = qf_op(quant, lse_kept, **bwd)
        grads = torch.autograd.grad(fn(), (qg, kg, vg), do)
        rows.append((label, bench(fwd_bwd(fn)), None, grads))

    for lowbit in ("none", "int8"):
        grads = attention_bwd(q, k, v, out, lse, do, causal=causal, lowbit=lowbit, kernel_config=kc)[:3]
        t_bwd = bench(lambda lowbit=lowbit: attention_bwd(q, k, v, out, lse, do, causal=causal, lowbit=lowbit,
                                                          kernel_config=kc))
        t_fwd = bench(lambda: attention_fwd(q, k, v, PRESETS["none"], causal=causal, return_lse=True))
        rows.append((f"kernels: none fwd + {'bf16' if lowbit == 'none' else 'INT8'} bwd (tuned tiles)",
                     t_fwd + t_bwd, t_bwd, grads))

    # ---- 4. tables --------------------------------------------------------------------------
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    print("\n## saved activations per preset (bytes kept for backward)")
    for preset in ("none", "int8", "int8-fp8", "int4", "fp8"):
        sb = saved_bytes(B, H, H, S, S, D, quant=preset, dtype=dtype)
        print(f"- {preset}: {sb['total'] / 2**20:.1f} MiB ({', '.join(f'{k}' for k in sb if k != 'total')})")
    sb = saved_bytes(B, H, H, S, S, D, quant="none", dtype=dtype, return_lse=False)
    print(f"- none called without return_lse (O, lse recomputed): {sb['total'] / 2**20:.1f} MiB")
    sb = saved_bytes(B, H, H, S, S, D, quant="none", dtype=dtype, lowbit="int8", codes=True)
    print(f"- none + INT8 backward (q/k codes saved): {sb['total'] / 2**20:.1f} MiB")
    print(f"\n## {name}: forward+backward vs SDPA default, gradient relL2 vs fp32 exact")
    print(f"bwd kernel tiles: {kc}; fwd+bwd FLOPs counted as 3.5 x 4·B·H·S²·D{' / 2' if causal else ''}")
    print("| variant | fwd+bwd ms | vs sdpa | TFLOPS | bwd-only ms | bwd vs sdpa | dq relL2 | dk relL2 | dv relL2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, t, tb, grads in rows:
        e = errs(grads)
        bwd_cols = f"{tb:.3f} | {t_sdpa_bwd / tb:.2f}x" if tb is not None else "— | —"
        print(f"| {label} | {t:.3f} | {t_sdpa / t:.2f}x | {3.5 * flops / t / 1e9:.0f} | {bwd_cols} | "
              f"{e[0]:.2e} | {e[1]:.2e} | {e[2]:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
