"""Sequence-parallel attention (qflash.parallel, issue 17): correctness on gathered tensors, then timing.

Usage:

    torchrun --nproc-per-node 8 benchmarks/parallel_bench.py                  # N GPUs, NCCL
    torchrun --nproc-per-node 1 benchmarks/parallel_bench.py                  # world size 1 (or plain python)
    torchrun --nproc-per-node 2 benchmarks/parallel_bench.py --device cpu --tiny   # gloo on CPU, tiny shapes
    python benchmarks/parallel_bench.py --pieces                               # one GPU: the local pieces
    python benchmarks/parallel_bench.py --pieces --device cpu --tiny           # (smoke run of the same)

Distributed mode, in order:

1. Correctness: every rank draws the same global q, k, v (seeded), runs
   ``qflash.parallel.attention`` on its contiguous shard for each mode x preset, the outputs are
   gathered and rank 0 compares them with single-device ``qflash.attention`` on the global tensors
   (same preset) and with bf16 SDPA; a row fails above its bound (exit status 1 at the end).
2. Timing, per shape (Flux 2048px 1x24x16896x128, 1x24x65536x128, causal 1x32x131072x128):
   one device's bf16 SDPA and ``qflash.attention`` per preset on the whole sequence (every rank
   times its own device; the max is reported), then each mode x preset on 1/N shards
   (``check_ranks=False`` after one checked call; barrier, then the slowest rank's median).
   Reported: ms, speed-up over one device's bf16 SDPA and over one device's same preset, and the
   scaling efficiency ``t_1(preset) / (N · t_N)``.

``--pieces`` (one device, no process group): for N in ``--world``, times what one rank of N does
locally — Ulysses' attention on H/N heads of the whole sequence; the ring's block attentions (the
causal diagonal block and the half blocks of the zig-zag schedule), the fp32 LSE merge per step,
and quantising a K/V shard once (``qflash.quantize_kv``, int8-fp8) — and predicts the
N-device time from the bytes each rank moves at the bus bandwidths given (``--gbps``; defaults
from published NCCL figures for NVLink4, docs/perf/NOTES.md "Sequence parallelism"). It prints a
Markdown table for NOTES.md.

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are set before any process group exists, and no multicast API is called.
"""

from __future__ import annotations

import os

# NVLink multicast off, before any NCCL communicator exists (see the module docstring)
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import qflash
import qflash.parallel as qp

# (name, B, H, S, D, causal)
FULL_SHAPES = [("flux-2048px", 1, 24, 16896, 128, False), ("65k", 1, 24, 65536, 128, False),
               ("131k-causal", 1, 32, 131072, 128, True)]
TINY_SHAPES = [("tiny", 1, 8, 128, 32, False), ("tiny-long", 1, 8, 512, 32, False),
               ("tiny-causal", 1, 8, 512, 32, True)]
CHECK_FULL = ("check", 1, 24, 8448, 128)  # Flux 2048px at half length: the correctness pass
CHECK_TINY = ("check", 1, 8, 96, 32)
PRESETS = ("none", "int8", "int8-fp8")
MODES = ("ulysses", "ring", "hybrid")
# bounds of the correctness pass (relL2): vs one device's same preset / vs bf16 SDPA
BOUND_SAME = {"none": 5e-3, "int8": 0.02, "int8-fp8": 0.06}
BOUND_SDPA = {"none": 5e-3, "int8": 0.02, "int8-fp8": 0.06}
# Published NCCL bus bandwidths on NVLink4 (H100/H200 SXM, NVSwitch), GB/s per rank and direction:
# ~370 effective for all-to-all / P2P (450 line rate less ~20 % protocol, NVIDIA/nccl-tests#212),
# 180 where a P2P send/recv pair plateaus with default settings (NVIDIA/nccl-tests#268).
DEFAULT_GBPS = (370.0, 180.0)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int, iters: int, barrier: bool = False) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if barrier:
            dist.barrier()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def slowest(ms: float, device: torch.device) -> float:
    """The largest value over the ranks (each rank passes its own)."""
    t = torch.tensor([ms], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def init(args) -> tuple[int, int, torch.device]:
    backend = "nccl" if args.device == "cuda" else "gloo"
    if "RANK" in os.environ:  # torchrun
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:  # plain python: a group of one
        device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def hybrid_size(N: int, H: int) -> int | None:
    """The largest Ulysses group size strictly between 1 and N that divides N and H, or None."""
    sizes = [u for u in range(2, N) if N % u == 0 and H % u == 0]
    return max(sizes) if sizes else None


def mode_kwargs(mode: str, N: int, H: int, ring_kv: str = "auto"):
    if mode == "ulysses":
        return {} if H % N == 0 else None
    if mode == "hybrid":
        u = hybrid_size(N, H)
        return None if u is None else {"ulysses_size": u, "ring_kv": ring_kv}
    return {"ring_kv": ring_kv}


def global_qkv(B, H, S, D, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]


def shard(t: torch.Tensor, r: int, N: int) -> torch.Tensor:
    return t.tensor_split(N, dim=2)[r].contiguous()


def gather_seq(x: torch.Tensor, N: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(N)]  # equal shards in this benchmark
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=2)


def check(args, r, N, device, dtype) -> list[dict]:
    """Correctness pass: gathered parallel outputs vs one device (step 1 of the docstring)."""
    _, B, H, S, D = CHECK_TINY if args.tiny else CHECK_FULL
    rows = []
    for causal in (False, True):
        q, k, v = global_qkv(B, H, S, D, device, dtype, seed=1)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for quant in args.presets:
            single = qflash.attention(q, k, v, quant=quant, causal=causal)
            for mode in args.modes:
                kw = mode_kwargs(mode, N, H, "auto")
                if kw is None:
                    continue
                out = qp.attention(shard(q, r, N), shard(k, r, N), shard(v, r, N), mode=mode, quant=quant,
                                   causal=causal, **kw)
                full = gather_seq(out, N)
                row = {"mode": mode, "quant": quant, "causal": causal, "vs_single": rel_l2(full, single),
                       "vs_sdpa": rel_l2(full, sdpa), **kw}
                row["ok"] = row["vs_single"] < BOUND_SAME[quant] and row["vs_sdpa"] < BOUND_SDPA[quant]
                rows.append(row)
    return rows


def timing(args, r, N, device, dtype) -> list[dict]:
    """Step 2 of the docstring."""
    rows = []
    for name, B, H, S, D, causal in (TINY_SHAPES if args.tiny else FULL_SHAPES):
        if name not in args.shapes and args.shapes != ["all"]:
            continue
        q, k, v = global_qkv(B, H, S, D, device, dtype)
        t_sdpa = slowest(median_ms(functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
                                   device, args.warmup, args.iters), device)
        single = {}
        for quant in args.presets:
            single[quant] = slowest(median_ms(functools.partial(qflash.attention, q, k, v, quant=quant, causal=causal),
                                              device, args.warmup, args.iters), device)
        qs, ks, vs = shard(q, r, N), shard(k, r, N), shard(v, r, N)
        for mode in args.modes:
            kw = mode_kwargs(mode, N, H, args.ring_kv)
            if kw is None:
                continue
            for quant in args.presets:
                if kw.get("ring_kv") == "codes" and quant == "none":
                    kw = {**kw, "ring_kv": "auto"}  # codes: quantised presets only
                qp.attention(qs, ks, vs, mode=mode, quant=quant, causal=causal, **kw)  # checked once
                run = functools.partial(qp.attention, qs, ks, vs, mode=mode, quant=quant, causal=causal,
                                        check_ranks=False, **kw)
                t = slowest(median_ms(run, device, args.warmup, args.iters, barrier=True), device)
                rows.append({"shape": name, "B": B, "H": H, "S": S, "D": D, "causal": causal, "N": N, "mode": mode,
                             "quant": quant, **kw, "ms": t, "sdpa_1dev_ms": t_sdpa, "same_1dev_ms": single[quant],
                             "speedup_vs_sdpa_1dev": t_sdpa / t, "speedup_vs_same_1dev": single[quant] / t,
                             "efficiency": single[quant] / (N * t)})
    return rows


# --------------------------------------------------------------------------------------------
# --pieces: one device, what one rank of N computes, and a prediction
# --------------------------------------------------------------------------------------------


def pieces(args) -> list[dict]:
    from qflash.parallel.merge import merge_into

    device = torch.device("cuda") if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    el = torch.empty((), dtype=dtype).element_size()
    rows = []
    for name, B, H, S, D, causal in (TINY_SHAPES if args.tiny else FULL_SHAPES):
        if name not in args.shapes and args.shapes != ["all"]:
            continue
        q, k, v = global_qkv(B, H, S, D, device, dtype)
        t_sdpa = median_ms(functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal), device,
                           args.warmup, args.iters)
        single = {p: median_ms(functools.partial(qflash.attention, q, k, v, quant=p, causal=causal), device,
                               args.warmup, args.iters) for p in args.presets}
        for N in args.world:
            s = S // N
            shard_bytes = B * H * s * D * el
            row = {"shape": name, "N": N, "sdpa_1dev_ms": t_sdpa}
            # quantise a K/V shard once (the shared K/V quantiser), int8-fp8 recipe
            row["quantise_kv_shard_ms"] = _time_kv_quant(k[:, :, :s], v[:, :, :s], device, args)
            # the LSE merge of one ring step (fp32 running output of s rows)
            acc, lse = torch.zeros(B, H, s, D, device=device), torch.full((B, H, s), -1.0, device=device)
            part, plse = q[:, :, :s], torch.zeros(B, H, s, device=device)
            row["merge_step_ms"] = median_ms(functools.partial(merge_into, acc, lse, part, plse), device,
                                             args.warmup, args.iters)
            for p in args.presets:
                # Ulysses: H/N heads of the whole sequence, two all-to-alls of q, k, v in and o out
                hq = max(H // N, 1)
                att = functools.partial(qflash.attention, quant=p)
                # contiguous operands, as a rank holds them (the all-to-all / ring buffers are)
                qu, ku, vu = (t[:, :hq].contiguous() for t in (q, k, v))
                t_u = median_ms(functools.partial(att, qu, ku, vu, causal=causal), device, args.warmup, args.iters)
                del qu, ku, vu
                # Ring: per step one block (non-causal: s x s; causal zig-zag: s/2 x s, diagonal once)
                qs, ks, vs = (t[:, :, :s].contiguous() for t in (q, k, v))
                qh = qs[:, :, : s // 2].contiguous()
                t_blk = median_ms(functools.partial(att, qh if causal else qs, ks, vs, return_lse=True), device,
                                  args.warmup, args.iters)
                t_diag = median_ms(functools.partial(att, qs, ks, vs, causal=True, return_lse=True),
                                   device, args.warmup, args.iters) if causal else t_blk
                row[f"{p}:ulysses_local_ms"] = t_u
                row[f"{p}:ring_block_ms"] = t_blk
                row[f"{p}:ring_diag_ms"] = t_diag
                row[f"{p}:same_1dev_ms"] = single[p]
                for gbps in args.gbps:
                    bw = gbps * 1e6  # bytes per ms
                    a2a = 4 * shard_bytes * (N - 1) / N / bw  # q, k, v out and o back, (N-1)/N of each leaves
                    # K and V per ring step: input dtype (none), or the codes (ring_kv "codes":
                    # int8/fp8 K + fp8 V ~ 1 byte each; int8 keeps V in bf16)
                    kv_bytes = 2 * shard_bytes if p == "none" else (1.5 if p == "int8" else 1.0) * shard_bytes
                    kv_step = kv_bytes / bw
                    zigzag = (4 * shard_bytes / bw) if causal else 0.0  # q, k, v in and o out, ~all of it moves
                    ring = (t_diag + row["merge_step_ms"]) + (N - 1) * max(t_blk + row["merge_step_ms"], kv_step) + \
                        zigzag
                    row[f"{p}:ulysses_pred_ms@{gbps:g}"] = t_u + a2a
                    row[f"{p}:ring_pred_ms@{gbps:g}"] = ring
                    row[f"{p}:kv_step_ms@{gbps:g}"] = kv_step
            rows.append(row)
    return rows


def _time_kv_quant(k, v, device, args):
    if device.type != "cuda":  # a Triton kernel: CUDA only (the CPU interpreter would time Python)
        return float("nan")
    try:  # what the non-causal ring does once per rank (ring_kv="codes")
        kc, vc = k.contiguous(), v.contiguous()
        return median_ms(functools.partial(qflash.quantize_kv, kc, vc, "int8-fp8"), device, args.warmup, args.iters)
    except Exception as exc:  # noqa: BLE001 - the quantiser's signature may move; report, don't fail
        print(f"quantise-once not timed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return float("nan")


def print_pieces(rows, args) -> None:
    for p in args.presets:
        print(f"\n### {p}: one rank's pieces (ms) and predicted N-device time (GB/s per rank: "
              f"{', '.join(f'{g:g}' for g in args.gbps)})\n")
        heads = ["shape", "N", "1-dev sdpa", f"1-dev {p}", "ulysses local", "ring block", "ring diag", "merge/step",
                 "quantise K/V shard"]
        heads += [f"{m} pred @{g:g}" for g in args.gbps for m in ("ulysses", "ring")]
        heads += [f"best speed-up vs 1-dev sdpa @{g:g}" for g in args.gbps]
        print("| " + " | ".join(heads) + " |")
        print("|" + "---|" * len(heads))
        for row in rows:
            cells = [row["shape"], str(row["N"]), f"{row['sdpa_1dev_ms']:.3f}", f"{row[f'{p}:same_1dev_ms']:.3f}",
                     f"{row[f'{p}:ulysses_local_ms']:.3f}", f"{row[f'{p}:ring_block_ms']:.3f}",
                     f"{row[f'{p}:ring_diag_ms']:.3f}", f"{row['merge_step_ms']:.3f}",
                     f"{row['quantise_kv_shard_ms']:.3f}"]
            cells += [f"{row[f'{p}:{m}_pred_ms@{g:g}']:.3f}" for g in args.gbps for m in ("ulysses", "ring")]
            cells += [f"{row['sdpa_1dev_ms'] / min(row[f'{p}:ulysses_pred_ms@{g:g}'], row[f'{p}:ring_pred_ms@{g:g}']):.2f}x"
                      for g in args.gbps]
            print("| " + " | ".join(cells) + " |")


def print_timing(rows) -> None:
    heads = ["shape", "N", "mode", "quant", "ms", "1-dev sdpa bf16 ms", "1-dev same ms", "speed-up vs sdpa",
             "speed-up vs same", "efficiency"]
    print("\n| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for x in rows:
        mode = x["mode"] + (f" (U={x['ulysses_size']})" if "ulysses_size" in x else "") + \
            (f" kv={x['ring_kv']}" if x.get("ring_kv", "auto") != "auto" else "")
        print(f"| {x['shape']}{' causal' if x['causal'] else ''} | {x['N']} | {mode} | {x['quant']} | {x['ms']:.3f} | "
              f"{x['sdpa_1dev_ms']:.3f} | {x['same_1dev_ms']:.3f} | {x['speedup_vs_sdpa_1dev']:.2f}x | "
              f"{x['speedup_vs_same_1dev']:.2f}x | {x['efficiency']:.0%} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke runs)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--shapes", nargs="+", default=["all"], help="shape names (see FULL_SHAPES / TINY_SHAPES)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    ap.add_argument("--ring-kv", default="auto", choices=("auto", "codes", "input"),
                    help="what the ring passes (qflash.parallel.attention's ring_kv)")
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    ap.add_argument("--pieces", action="store_true", help="one device: time one rank's pieces, predict N devices")
    ap.add_argument("--world", nargs="+", type=int, default=[2, 4, 8], help="--pieces: the N to predict")
    ap.add_argument("--gbps", nargs="+", type=float, default=list(DEFAULT_GBPS),
                    help="--pieces: bus bandwidths per rank (GB/s) for the prediction")
    args = ap.parse_args(argv)
    if args.iters is None:
        args.iters = 3 if args.device == "cpu" else 20
    if args.warmup is None:
        args.warmup = 1 if args.device == "cpu" else 5
    if args.pieces:
        rows = pieces(args)
        print_pieces(rows, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"pieces": rows, "gbps": args.gbps}, f, indent=1)
        return 0
    r, N, device = init(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ok = True
    out = {"world_size": N, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        if not args.no_check:
            out["check"] = check(args, r, N, device, dtype)
            ok = all(x["ok"] for x in out["check"])
            if r == 0:
                for x in out["check"]:
                    print(f"check N={N} {x['mode']:8s} {x['quant']:9s} causal={x['causal']!s:5s} "
                          f"vs 1-dev same preset {x['vs_single']:.2e}  vs bf16 sdpa {x['vs_sdpa']:.2e}  "
                          f"{'ok' if x['ok'] else 'FAIL'}", flush=True)
        out["timing"] = timing(args, r, N, device, dtype)
        if r == 0:
            print_timing(out["timing"])
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
