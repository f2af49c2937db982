"""Sweep attention-kernel configs at one shape; print the best per preset (feeds configs.TABLES).

    python benchmarks/sweep.py --shape 1x24x4608x128 [--causal] --presets int8,int8-fp8
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402
from qflash.kernels.portable.launch import attention_fwd, quantize_qkv  # noqa: E402
from qflash.kernels.portable.tuning import KernelConfig  # noqa: E402

CANDIDATES = [
    KernelConfig(bm, bn, w, st)
    for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))
    if not (bm == 64 and w == 8)
]
# base configs crossed with the kernel variants (TMA descriptor loads, rotated loop) by --variants
VARIANT_BASES = [KernelConfig(*c) for c in ((64, 128, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3), (128, 64, 8, 3),
                                            (64, 64, 4, 3), (128, 64, 4, 3))]
SHORTLIST = [KernelConfig(*c) for c in ((128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2),
                                        (128, 128, 8, 3), (64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3))]


def main(argv=None):
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1x24x4608x128")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--presets", default="int8,int8-fp8")
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--kblock", type=int, default=0, help="override K granularity to block(N)")
    ap.add_argument("--short", action="store_true", help="only the shortlist of configs")
    ap.add_argument("--configs", default="",
                    help="explicit configs 'bm,bn,warps,stages[,tma][,rot];...' (overrides the lists)")
    ap.add_argument("--variants", type=int, default=0,
                    help="N: the first N of VARIANT_BASES, each plain / tma / rotate / tma+rotate")
    args = ap.parse_args(argv)
    B, H, S, D = (int(x) for x in args.shape.split("x"))
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
                    warmup=50, rep=200, return_mode="median")
    print(f"shape {args.shape} causal={args.causal} sdpa {sdpa:.4f} ms", flush=True)
    results = []
    for p in args.presets.split(","):
        cfg = qflash.resolve_quant(p)
        if args.kblock:
            cfg = cfg.with_(k=qflash.OperandQuant(cfg.k.precision, qflash.Granularity.block(args.kblock)))
        quant_ms = do_bench(lambda: quantize_qkv(q, k, v, cfg), warmup=20, rep=100, return_mode="median") if cfg.quantizes_qk else 0.0
        best = None
        if args.configs:
            from ab import parse  # benchmarks/ab.py (this script's folder is on sys.path)

            cands = [parse(spec) for spec in args.configs.split(";")]
        elif args.variants:
            cands = [KernelConfig(b.block_m, b.block_n, b.num_warps, b.num_stages, tma=t, rotate=r)
                     for b in VARIANT_BASES[:args.variants] for t in (False, True) for r in (False, True)]
        else:
            cands = SHORTLIST if args.short else CANDIDATES
        for kc in cands:
            try:
                t0 = time.time()
                attention_fwd(q, k, v, cfg, causal=args.causal, kernel_config=kc)
                torch.cuda.synchronize()
                ms = do_bench(lambda: attention_fwd(q, k, v, cfg, causal=args.causal, kernel_config=kc),
                              warmup=20, rep=100, return_mode="median")
            except Exception as exc:
                print(f"  {p} {kc}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                continue
            results.append(dict(preset=p, config=kc.__dict__, ms=ms, sdpa_ms=sdpa, quant_ms=quant_ms))
            if best is None or ms < best[0]:
                best = (ms, kc)
            print(f"  {p:9s} bm{kc.block_m} bn{kc.block_n} w{kc.num_warps} s{kc.num_stages}"
                  f"{' tma' if kc.tma else ''}{' rot' if kc.rotate else ''}: {ms:.4f} ms "
                  f"x{sdpa / ms:.3f} (compile+first {time.time() - t0:.1f}s)", flush=True)
        if best:
            print(f"BEST {p}: {best[0]:.4f} ms x{sdpa / best[0]:.3f} {best[1]} quant {quant_ms:.4f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"sweep_{args.shape}{'_c' if args.causal else ''}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
