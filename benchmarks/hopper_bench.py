"""Hopper-family benchmark: correctness against both references, then time against cuDNN in one run.

    python benchmarks/hopper_bench.py [--out DIR] [--shapes flux-1024,...] [--variants base,stages2,...]

For each variant (tile/pipeline settings of the Gluon kernel, ``VARIANTS``): checks the output on
awkward shapes against ``qflash.reference`` (fake-quant: tight; exact fp32: the preset's budget),
then times at the benchmark shapes with ``triton.testing.do_bench`` (median): SDPA default
(cuDNN) rerun in the same process, the portable Triton family (``qflash.attention``), the
Hopper family end to end (quantisation included) and its attention kernel alone. Every variant
runs in a child process with a timeout, so a deadlocked pipeline costs only its own time.
Prints a short table last; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

SHAPES = {  # name: (B, Hq, Hkv, Sq, Sk, D, causal)
    "flux-1024": (1, 24, 24, 4608, 4608, 128, False),
    "flux-2048": (1, 24, 24, 16896, 16896, 128, False),
    "b4-4k-d64": (4, 32, 32, 4096, 4096, 64, False),
    "causal-8k": (1, 32, 32, 8192, 8192, 128, True),
}
CHECKS = [  # awkward shapes: (B, Hq, Hkv, Sq, Sk, D, causal: None / "br" / "tl", lse, NHD inputs)
    (1, 4, 4, 4608, 4608, 128, None, False, False),
    (1, 2, 2, 256, 256, 128, None, False, False),
    (2, 4, 2, 1000, 777, 128, None, True, False),
    (1, 3, 1, 130, 1025, 64, None, True, False),
    (2, 4, 4, 300, 300, 128, None, False, True),
    (1, 2, 2, 64, 4096, 128, None, False, False),
    (1, 4, 2, 1000, 1000, 128, "br", True, False),
    (1, 2, 2, 300, 700, 128, "tl", True, True),
    (1, 2, 2, 700, 300, 64, "br", True, False),
    (1, 2, 1, 520, 260, 128, "tl", False, False),
]
VARIANTS = {  # HopperTiles fields over the defaults (kernels/hopper/tuning.py)
    "default": dict(),
    "stages4": dict(stages=4),
}


def child(args):
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import qflash
    from qflash.config import resolve_quant
    from qflash.kernels.hopper.launch import attention_fwd_hopper, build_launch
    from qflash.kernels.hopper.tuning import HopperTiles
    from qflash.kernels.kv_quant import quantize_kv
    from qflash.reference import exact_attention, fake_quant_attention

    var = VARIANTS[args.variant]
    tiles = HopperTiles(**var)
    res = {"variant": args.variant, "config": var, "checks": [], "timings": []}
    dev = "cuda"

    def rel(a, b):
        a, b = a.float(), b.float()
        return ((a - b).norm() / b.norm()).item()

    for preset in args.presets.split(","):
        cfg = resolve_quant(preset)
        for (B, Hq, Hkv, Sq, Sk, D, causal, want_lse, nhd) in CHECKS:
            g = torch.Generator(device=dev).manual_seed(Sq * 7 + Sk)
            q, k, v = (torch.randn(B, s, h, D, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2)
                       for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
            if not nhd:
                q, k, v = (x.contiguous() for x in (q, k, v))
            off = None if causal is None else (Sk - Sq if causal == "br" else 0)
            # the references' causal is bottom-right; top-left goes in as a boolean mask
            ref_kw = dict(causal=causal == "br")
            if causal == "tl":
                ref_kw["attn_mask"] = torch.ones(Sq, Sk, dtype=torch.bool, device=dev).tril()
            out = torch.full_like(q, float("nan"))
            o, lse = attention_fwd_hopper(q, k, v, cfg, return_lse=want_lse, causal_offset=off, out=out, tiles=tiles)
            torch.cuda.synchronize()
            fq = fake_quant_attention(q, k, v, cfg, return_lse=want_lse, block_n=tiles.block_n, **ref_kw)
            ex = exact_attention(q, k, v, return_lse=want_lse, compute_dtype=torch.float32, **ref_kw)
            fq_o, fq_l = fq if want_lse else (fq, None)
            ex_o, ex_l = ex if want_lse else (ex, None)
            row = dict(preset=preset, shape=[B, Hq, Hkv, Sq, Sk, D], causal=causal, nhd=nhd,
                       finite=bool(torch.isfinite(o).all()), rel_fake=rel(o, fq_o), rel_exact=rel(o, ex_o))
            if want_lse:
                fin = torch.isfinite(fq_l)
                row["lse_inf_match"] = bool(torch.equal(fin, torch.isfinite(lse)))
                row["lse_maxabs_fake"] = (lse[fin] - fq_l[fin]).abs().max().item() if fin.any() else 0.0
            res["checks"].append(row)
            print("CHECK", row, flush=True)

    for name in args.shapes.split(","):
        B, Hq, Hkv, Sq, Sk, D, causal = SHAPES[name]
        off = 0 if causal else None
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, h, s, D, device=dev, dtype=torch.bfloat16, generator=g)
                   for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
        ops = 4 * B * Hq * Sq * Sk * D / (2 if causal else 1)
        bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=args.rep, return_mode="median")  # noqa: E731
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        row = dict(shape=name, sdpa_ms=t_sdpa)
        for preset in args.presets.split(","):
            cfg = resolve_quant(preset)
            o, _ = attention_fwd_hopper(q, k, v, cfg, tiles=tiles, causal_offset=off)
            kc, ks, vt, vs, _ = quantize_kv(k, v, cfg, tiles.block_n, tiles.v_permuted)
            out = torch.empty_like(q)
            launch = build_launch(q, kc, ks, vt, vs, out, None, 1 / math.sqrt(D), tiles, off)
            t_full = bench(lambda: attention_fwd_hopper(q, k, v, cfg, tiles=tiles, causal_offset=off))
            t_kern = bench(launch)
            t_quant = bench(lambda: quantize_kv(k, v, cfg, tiles.block_n, tiles.v_permuted))
            t_port = bench(lambda: qflash.attention(q, k, v, quant=preset, causal=causal)) if args.portable else None
            row[preset] = dict(full_ms=t_full, kernel_ms=t_kern, quant_ms=t_quant, portable_ms=t_port,
                               speedup=t_sdpa / t_full, kernel_tops=ops / t_kern / 1e9, rel_vs_sdpa=rel(o, ref))
        res["timings"].append(row)
        print("TIME", row, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"hopper-{args.variant}.json"), "w") as f:
        json.dump(res, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/hopper_bench"))
    ap.add_argument("--shapes", default="flux-1024,flux-2048,causal-8k,b4-4k-d64")
    ap.add_argument("--presets", default="int8-fp8,fp8")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rep", type=int, default=200)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--portable", action="store_true", help="also time the portable Triton family")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    summary = []
    for var in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", var, "--out", args.out, "--shapes", args.shapes,
               "--presets", args.presets, "--rep", str(args.rep)] + (["--portable"] if args.portable else [])
        t0 = time.time()
        try:
            r = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
            tail = "\n".join(line for line in r.stderr.splitlines() if "Warning" not in line)[-5000:]
            print(f"##### {var} rc={r.returncode} {time.time() - t0:.0f}s\n{r.stdout[-8000:]}\n{tail}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"##### {var}: TIMEOUT after {args.timeout}s (deadlock?)", flush=True)
            continue
        path = os.path.join(args.out, f"hopper-{var}.json")
        if os.path.exists(path):
            summary.append(json.load(open(path)))
    print("\n==== summary (ms; speed-up = SDPA cuDNN / Hopper end to end) ====")
    for res in summary:
        worst = max((c["rel_fake"] for c in res["checks"]), default=float("nan"))
        bad = [c for c in res["checks"] if not c["finite"] or not c.get("lse_inf_match", True)]
        print(f"{res['variant']}: worst relL2 vs fake-quant {worst:.2e}; non-finite / lse -inf mismatches: {len(bad)}")
        for row in res["timings"]:
            cells = [f"{row['shape']} sdpa {row['sdpa_ms']:.3f}"]
            for p, d in row.items():
                if isinstance(d, dict):
                    port = f" port {d['portable_ms']:.3f}" if d["portable_ms"] else ""
                    cells.append(f"{p}: {d['full_ms']:.3f} ({d['speedup']:.2f}x) kern {d['kernel_ms']:.3f} "
                                 f"[{d['kernel_tops']:.0f} TOPS] q {d['quant_ms']:.3f}{port}")
            print("  " + " | ".join(cells))


if __name__ == "__main__":
    main()
