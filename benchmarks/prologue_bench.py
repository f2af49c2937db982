"""Time the Flux attention prologue on a GPU: ``rmsnorm_rope`` on q and k (the floor for those
bytes), the unfused path's K/V quantiser (``kernels.kv_quant.quantize_kv``, per codes-launch shape in
KV_VARIANTS; the fastest is kept for ``--flux``) and
``rmsnorm_rope_quantize`` (``int8-fp8``, Hopper V order) per launch shape of its statistics launch, in total (``do_bench``, L2 flushed) and per kernel (``torch.profiler``), at
Flux-dev double-stream shapes (512 text + 4096 / 16384 image tokens, 24 heads, D 128, bf16). Each
shape's outputs are checked against the first shape's (q and V bit for bit, K codes one step).

    python benchmarks/prologue_bench.py --out results            # JSON: results/prologue_bench.json
    python benchmarks/prologue_bench.py --flux                   # then examples/flux/run.py, same process,
                                                                 # with the fastest shape (what session 6 ran)

``--flux`` in the same process disturbed session 6's 1024px rows (every mode 6–17 % slow, the SDPA
baseline included); for recorded Flux numbers run ``examples/flux/run.py`` in its own process with
the default launch shapes (what session 8 did).

Session 6's numbers (H200) are in docs/perf/NOTES.md; the shapes there were measured with an
earlier per-head statistics kernel as the first row (since removed).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

import torch

# (tokens per program, heads per program, warps) of prologue_token_stats_kernel
SHAPES = {"tok32h8w4": (32, 8, 4), "tok16h8w4": (16, 8, 4), "tok64h8w4": (64, 8, 4), "tok32h4w2": (32, 4, 2),
          "tok32h8w8": (32, 8, 8)}

# (codes programs per block (1: K and V together, 2: K and V apart), warps) of kv_quant's codes launch;
# the first is session 6's launch (sm_90a: 255 registers at 8 warps, 128 at 16). Session 7 also swept
# token-major statistics for kv_quant (the prologue's launch): -4.3 % at 16k keys, +14 % at 4.6k, dropped.
KV_VARIANTS = {"p1w8": (1, 8), "p2w8": (2, 8), "p2w16": (2, 16)}


def flux_parts(S_img: int, S_txt: int = 512, H: int = 24, D: int = 128, dev: str = "cuda"):
    """q, k, v image parts (1, S_img, H, D) bf16 and the prologue's keyword arguments (text parts,
    RMSNorm weights, repeat-interleaved cos/sin tables), from a seeded generator."""
    g = torch.Generator(device=dev).manual_seed(0)

    def mk(s):
        return torch.randn(1, s, H * D, device=dev, dtype=torch.bfloat16, generator=g).unflatten(-1, (H, D))

    def w():
        return (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(torch.bfloat16)

    q, k, v, qp, kp, vp = mk(S_img), mk(S_img), mk(S_img), mk(S_txt), mk(S_txt), mk(S_txt)
    ang = torch.randn(S_txt + S_img, D // 2, device=dev, generator=g)
    cos, sin = (t.repeat_interleave(2, -1).contiguous() for t in (ang.cos(), ang.sin()))
    kw = {"norm_q": w(), "norm_k": w(), "eps": 1e-6, "cos": cos, "sin": sin, "q_prefix": qp, "k_prefix": kp,
          "v_prefix": vp, "norm_q_prefix": w(), "norm_k_prefix": w()}
    return q, k, v, kw


def kernel_times(fn, n: int = 5) -> dict[str, float]:
    """GPU µs per call of each kernel ``fn`` launches (torch.profiler, n calls after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / n, 1)
    return out


def bench_shape(P, rmsnorm_rope_triton, do_bench, S_img: int, per_token: dict, kv_total: dict) -> dict:
    """One Flux resolution: rmsnorm_rope on q, k and every statistics-launch shape of the prologue."""
    q, k, v, kw = flux_parts(S_img)
    row = {"rmsnorm_rope_qk_us": 1e3 * do_bench(lambda: (
        rmsnorm_rope_triton(q, kw["norm_q"], kw["cos"], kw["sin"], 1e-6, x_prefix=kw["q_prefix"],
                            weight_prefix=kw["norm_q_prefix"]),
        rmsnorm_rope_triton(k, kw["norm_k"], kw["cos"], kw["sin"], 1e-6, x_prefix=kw["k_prefix"],
                            weight_prefix=kw["norm_k_prefix"])))}
    # the unfused path's K/V quantiser (kv_quant: statistics + codes launches) on the normed K and the
    # concatenated V, as the attention call runs it when the prologue is only rmsnorm_rope
    from qflash.config import resolve_quant
    from qflash.kernels.kv_quant import quantize_kv

    kn = rmsnorm_rope_triton(k, kw["norm_k"], kw["cos"], kw["sin"], 1e-6, x_prefix=kw["k_prefix"],
                             weight_prefix=kw["norm_k_prefix"]).transpose(1, 2)
    vn = torch.cat([kw["v_prefix"], v], dim=1).transpose(1, 2)
    from qflash.kernels import kv_quant as KQ

    cfg = resolve_quant("int8-fp8")
    first = None
    for name, (parts, warps) in KV_VARIANTS.items():
        KQ.QUANT_PARTS, KQ.QUANT_WARPS = parts, warps
        out = quantize_kv(kn, vn, cfg, 128, v_permuted=True)
        if first is None:
            first = out
        else:
            dk = (out[0].float() - first[0].float()).abs()
            row[f"kv_{name}_check"] = {
                "k_step_max": dk.max().item(), "k_moved": (dk > 0).float().mean().item(),
                "ks_equal": bool(torch.equal(out[1], first[1])), "vs_equal": bool(torch.equal(out[3], first[3])),
                "v_equal": bool(torch.equal(out[2].view(torch.uint8), first[2].view(torch.uint8)))}
        row[f"kv_{name}_us"] = 1e3 * do_bench(lambda: quantize_kv(kn, vn, cfg, 128, v_permuted=True))
        row[f"kv_{name}_kernels"] = kernel_times(lambda: quantize_kv(kn, vn, cfg, 128, v_permuted=True))
        kv_total[name] += row[f"kv_{name}_us"] / (S_img + 512)
        print(S_img, "kv_quant", name, f"{row[f'kv_{name}_us']:.1f} us", row[f"kv_{name}_kernels"],
              row.get(f"kv_{name}_check", ""), flush=True)
    first = None

    def run():
        return P.rmsnorm_rope_quantize_triton(q, k, v, "int8-fp8", v_order="hopper", **kw)

    for name, (t, h, w) in SHAPES.items():
        P.TOKEN_T, P.TOKEN_HEADS, P.TOKEN_WARPS = t, h, w
        qo, qkv = run()
        if first is None:
            first = (qo, qkv)
        else:
            dk = (qkv.k.float() - first[1].k.float()).abs()
            row[f"{name}_check"] = {
                "q_equal": bool(torch.equal(qo, first[0])), "k_step_max": dk.max().item(),
                "k_moved": (dk > 0).float().mean().item(),
                "v_equal": bool(torch.equal(qkv.v.view(torch.uint8), first[1].v.view(torch.uint8)))}
        us = 1e3 * do_bench(run)
        row[f"{name}_us"] = us
        row[f"{name}_kernels"] = kernel_times(run)
        per_token[name] += us / (S_img + 512)
        print(S_img, name, f"{us:.1f} us", row[f"{name}_kernels"], flush=True)
    print(S_img, "rmsnorm_rope q+k", f"{row['rmsnorm_rope_qk_us']:.1f} us", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--flux", action="store_true", help="then run examples/flux/run.py with the fastest shapes")
    ap.add_argument("--flux-modes", nargs="+", default=["sdpa", "sdpa+fused", "int8-fp8+fused", "int8-fp8+fusedq"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prologue_bench: needs a CUDA GPU")
        return 1
    from triton.testing import do_bench

    from qflash.fused import qkv_prologue as P
    from qflash.fused.rmsnorm_rope import rmsnorm_rope_triton

    res = {"gpu": torch.cuda.get_device_name(), "shapes": {}}
    per_token = dict.fromkeys(SHAPES, 0.0)
    kv_total = dict.fromkeys(KV_VARIANTS, 0.0)
    for S_img in (4096, 16384):
        res["shapes"][S_img] = bench_shape(P, rmsnorm_rope_triton, do_bench, S_img, per_token, kv_total)
        torch.cuda.empty_cache()
    best = min(per_token, key=per_token.get)
    kv_best = min(kv_total, key=kv_total.get)
    res["best"], res["kv_best"] = best, kv_best
    print("best", best, "kv_best", kv_best, flush=True)
    from qflash.kernels import kv_quant as KQ

    KQ.QUANT_PARTS, KQ.QUANT_WARPS = KV_VARIANTS[kv_best]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prologue_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    P.TOKEN_T, P.TOKEN_HEADS, P.TOKEN_WARPS = SHAPES[best]
    if args.flux:
        sys.argv = ["run.py", "--out", args.out, "--modes", *args.flux_modes, "--breakdown"]
        runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "flux", "run.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
