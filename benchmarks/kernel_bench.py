"""Kernel benchmark for the targets table of issue 3: qflash presets vs SDPA, same run, same card.

    python benchmarks/kernel_bench.py [--out DIR] [--shapes ...] [--presets ...] [--sage]

Times every preset end to end (quantisation included; through ``qflash.attention``, i.e. the family
the dispatcher picks, or with ``--portable`` the portable family's ``attention_fwd``) with triton.testing.do_bench (median),
reruns SDPA default (and the flash backend) in the same process, measures accuracy at each
shape against an fp32 exact reference, and prints a short table last. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402
from qflash.kernels.portable.launch import attention_fwd, quantize_qkv  # noqa: E402

SHAPES = {
    "seed-64": (1, 1, 64, 64, False),
    "seed-512": (1, 1, 512, 64, False),
    "seed-1024": (1, 1, 1024, 128, False),
    "flux-1024": (1, 24, 4608, 128, False),
    "long-16k": (1, 24, 16384, 128, False),
    "causal-8k": (1, 32, 8192, 128, True),
}


def ops_count(B, H, S, D, causal):
    return 4 * B * H * S * S * D / (2 if causal else 1)


def bench(fn, quick=False):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    med = do_bench(fn, warmup=25 if quick else 100, rep=100 if quick else 400, return_mode="median")
    mean = do_bench(fn, warmup=5, rep=50 if quick else 200, return_mode="mean")
    return med, mean


def exact_fp32(q, k, v, causal, heads=4):
    """fp32 reference on the first `heads` heads (chunked so it fits in memory)."""
    q, k, v = (t[:, :heads].float() for t in (q, k, v))
    outs = []
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            S = s.shape[-1]
            s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        outs.append(torch.softmax(s, -1) @ v[:, h])
    return torch.stack(outs, 1)


def errors(o, ref, heads=4):
    o = o[:, :heads].double()
    ref = ref.double()
    rel = ((o - ref).norm() / ref.norm()).item()
    cos = F.cosine_similarity(o.flatten(), ref.flatten(), dim=0).item()
    return rel, cos


def load_sage():
    try:
        import sageattention
        from sageattention import sageattn_qk_int8_pv_fp8_cuda  # noqa: F401

        return sageattention
    except Exception as exc:  # not installed here
        print(f"sageattention not available: {exc}", file=sys.stderr)
        return None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--presets", default="int8,int8-fp8,int4,fp8,none")
    ap.add_argument("--sage", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time the quantiser alone")
    ap.add_argument("--portable", action="store_true",
                    help="time the portable Triton family's attention_fwd directly (before 2026-12-02 this "
                         "was the only mode: its rows are not what qflash.attention runs on sm_90)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    import triton

    meta = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "path": "portable attention_fwd" if args.portable else "qflash.attention"}
    print(json.dumps(meta))
    sage = load_sage() if args.sage else None
    rows = []
    presets = [p for p in args.presets.split(",") if p]
    for name in args.shapes.split(","):
        B, H, S, D, causal = SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        ref = exact_fp32(q, k, v, causal)
        ops = ops_count(B, H, S, D, causal)
        base = {}
        cands = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            cands["sdpa-flash"] = flash
        except Exception:
            pass
        for p in presets:
            cfg = qflash.resolve_quant(p)
            if args.portable:
                cands[p] = (lambda cfg=cfg: attention_fwd(q, k, v, cfg, causal=causal)[0])
            else:  # what users get: the dispatcher's family (Hopper for int8-fp8 / fp8 on sm_90)
                cands[p] = (lambda p=p: qflash.attention(q, k, v, quant=p, causal=causal))
        if sage is not None:
            cands["sage-fp8-sm90"] = lambda: sage.sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout="HND", is_causal=causal)
            cands["sage-triton"] = lambda: sage.sageattn_qk_int8_pv_fp16_triton(q, k, v, tensor_layout="HND", is_causal=causal)
        for cname, fn in cands.items():
            try:
                out = fn()
                rel, cos = errors(out, ref)
                med, mean = bench(fn, args.quick)
            except Exception as exc:
                print(f"{name} {cname}: FAILED {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
                continue
            if cname == "sdpa":
                base["t"] = med
            row = dict(shape=name, B=B, H=H, S=S, D=D, causal=causal, impl=cname, median_ms=med, mean_ms=mean,
                       tops=ops / med / 1e9, speedup=base.get("t", float("nan")) / med, rel_l2=rel, cos=cos)
            if args.breakdown and cname in presets and qflash.resolve_quant(cname).quantizes_qk:
                cfg = qflash.resolve_quant(cname)
                row["quant_ms"] = bench(lambda: quantize_qkv(q, k, v, cfg), True)[0]
            rows.append(row)
            print(f"{name:10s} {cname:14s} {med:8.4f} ms  {row['tops']:7.1f} TOPS  x{row['speedup']:.3f}  "
                  f"relL2 {rel * 100:.3f}%  cos {cos:.6f}" + (f"  quant {row['quant_ms']:.4f} ms" if "quant_ms" in row else ""),
                  flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "kernel_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\n| shape | impl | median ms | TOPS | vs SDPA | relL2 % | cos |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r['median_ms']:.4f} | {r['tops']:.0f} | {r['speedup']:.2f}x | "
              f"{r['rel_l2'] * 100:.2f} | {r['cos']:.5f} |")


if __name__ == "__main__":
    main()
