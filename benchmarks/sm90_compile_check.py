"""Compile the forward and backward kernels for sm_90a without a GPU; check shared memory and fp32 dots.

    python benchmarks/sm90_compile_check.py        (TRITON_INTERPRET must be unset)
    QFLASH_COMPILE_PRESETS=int4 python benchmarks/sm90_compile_check.py   (one preset of the main grid)

Uses the ptxas bundled with Triton. Every launch the launchers would make, for head dims 64, 96,
128 and 256, fp32 and bf16, presets none / int8 / int8-fp8 / int4 and short and long sequences, with the
configs the sm90 tables pick (and the TMA / rotated-loop variants at D128, and the one-launch mode
with ``tuning.fused_tiles``' tiles, split and unsplit, in bf16; the quantiser with CUDA's
statistics: the statistics launch, or its own below ``QUANT_SELF_STATS_MAX_SK``), is captured instead
of launched and compiled for sm_90a. Its shared memory is compared with the H100's per-block limit
(232,448 bytes), and fp32 launches must not multiply in plain TF32. It finds compile errors, tiles
that would fail with OutOfResources at launch and lost fp32 precision; it says nothing about speed
or results.
"""

from __future__ import annotations

import os
import re
import sys

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

import qflash  # noqa: E402
from qflash.kernels import fastlaunch, kv_quant  # noqa: E402
from qflash.kernels.portable import bwd_launch, launch, smooth_terms  # noqa: E402
from qflash.kernels.portable import tuning as configs  # noqa: E402

SMEM_LIMIT = 232448
# the presets of the main grid; QFLASH_COMPILE_PRESETS=int4 compiles one (the whole grid takes ~20 min on 2 cores)
PRESETS = tuple(os.environ.get("QFLASH_COMPILE_PRESETS", "none,int8,int8-fp8,int4").split(","))
TARGET = GPUTarget("cuda", 90, 32)
captured: list = []


def _capture_jit(self, grid):
    def run(*args, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        captured.append((self, [bound.get(n) for n in self.arg_names], opts))
    return run


def _capture_fast(self, grid, pointers, scalars, *, num_warps, num_stages):
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if self._pdl_at is not None and scalars[self._pdl_at]:
        opts["launch_pdl"] = True  # as FastLauncher compiles it
    captured.append((self.fn, list(pointers + scalars), opts))


def compile_one(fn, args, opts):
    """Shared memory bytes, and the input precisions of the kernel's fp32 dots (from its TTIR)."""
    # as Triton's launcher does, integer arguments equal to 1 are specialised to constexprs (a
    # single key or query turns Sk / Sq into a Python int inside the kernel)
    fixed = [p.is_constexpr or a is None or (type(a) is int and a == 1) for p, a in zip(fn.params, args)]
    sig = {p.name: ("constexpr" if c else mangle_type(a)) for p, a, c in zip(fn.params, args, fixed)}
    consts = {p.name: a for p, a, c in zip(fn.params, args, fixed) if c}
    compiled = triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=opts)
    # the precision of dots on fp32 operands ("ieee" is the attribute's default and is not printed)
    dots = {m.group(1) or "ieee" for m in re.finditer(r"tt\.dot [^:]*?(?:inputPrecision = (\w+))? : tensor<[0-9x]+xf32>",
                                                      compiled.asm["ttir"])}
    return compiled.metadata.shared, dots


def check(fn, args, opts, dtype, what, bad) -> None:
    """Compile one captured launch; flag it when over the shared-memory limit, or when an fp32
    launch multiplies in plain TF32 (~1e-3 relative error; run 20's fp32 gradient failures)."""
    try:
        smem, dots = compile_one(fn, args, opts)
    except Exception as e:  # noqa: BLE001 - report every launch that fails, then exit non-zero
        bad.append((fn.__name__, *what, f"does not compile: {str(e).splitlines()[-1][:160]}"))
        return
    if smem > SMEM_LIMIT:
        bad.append((fn.__name__, *what, f"shared memory {smem}"))
    if dtype == torch.float32 and "tf32" in dots:
        bad.append((fn.__name__, *what, f"fp32 dot in TF32 ({sorted(dots)})"))


def single_key_calls(D, dtype, bad) -> int:
    """One query over one key (Sq = Sk = 1, both specialised to constexprs), every preset, the
    launcher's own choice of mode; bf16 only. Returns the launches compiled."""
    if dtype != torch.bfloat16:
        return 0
    n = 0
    for preset in PRESETS:
        q, k, v = (torch.randn(1, 2, 1, D, dtype=dtype) for _ in range(3))
        for fused in (False, True):
            captured.clear()
            launch.attention_fwd(q, k, v, qflash.resolve_quant(preset), fused_quant=fused)
            for fn, args, opts in list(captured):
                check(fn, args, opts, dtype, (D, str(dtype), preset, f"1x1 fused={fused}"), bad)
                n += 1
    return n


def one_launch_mode(D, dtype, cuda, bad) -> int:
    """The one-launch mode (quantisation inside the attention kernel) with the tiles
    ``tuning.fused_tiles`` picks on sm90: one query over 512 keys split by 128 (per-split
    statistics), and 77 queries over 77 keys unsplit; bf16 only. Returns the launches compiled."""
    if dtype != torch.bfloat16:
        return 0
    n = 0
    for preset in PRESETS:
        cfg = qflash.resolve_quant(preset)
        if not cfg.quantizes_qk:
            continue
        for sq, sk, split in ((1, 512, 128), (77, 77, 0)):
            q = torch.randn(1, 2, sq, D, dtype=dtype)
            k, v = (torch.randn(1, 2, sk, D, dtype=dtype) for _ in range(2))
            captured.clear()
            tiles = configs.fused_tiles(cuda, D, 2 * -(-sq // 64), sq)
            kc = configs._pick(cuda, *configs.config_key(D, cfg.quantizes_pv, sq, sk, cfg.quantizes_qk))
            kc = configs.KernelConfig(tiles[0], kc.block_n, tiles[1], kc.num_stages)
            launch.attention_fwd(q, k, v, cfg, kernel_config=kc, fused_quant=True, split_keys=split)
            for fn, args, opts in captured:
                check(fn, args, opts, dtype, (D, str(dtype), preset, f"one launch {sq}x{sk} split {split}"), bad)
                n += 1
    return n


def main() -> int:
    JITFunction.__getitem__ = _capture_jit
    fastlaunch.FastLauncher.__call__ = _capture_fast
    configs.gpu_key = lambda device=None: "sm90"  # the sm90 table, as on an H100
    for module in (launch, smooth_terms, kv_quant):  # programmatic dependent launch, as on an H100
        module.pdl_enabled = lambda device: True
    configs.load_user_table = lambda path: {}
    configs.user_table_path = lambda device: "none"
    # the quantiser as CUDA runs it (GPU statistics: the statistics launch at 4096 keys, the
    # quantiser's own statistics at 512), not the CPU's torch means
    quantize_qkv = launch.quantize_qkv
    launch.quantize_qkv = lambda q, k, v, cfg, stats=None, self_stats=None, pack_int4=True: quantize_qkv(
        q, k, v, cfg, True if stats is None else stats, self_stats, pack_int4)
    cuda = torch.device("cuda", 0)
    bad, n = [], 0
    for D in (64, 96, 128, 256):
        for dtype in (torch.float32, torch.bfloat16):
            for preset in PRESETS:  # int4: Q smoothing's bias launch too
                cfg = qflash.resolve_quant(preset)
                for S in (512, 4096):
                    kc = configs._pick(cuda, *configs.config_key(D, cfg.quantizes_pv, S, S, cfg.quantizes_qk))
                    cap = configs.FP32_STAGE_CAPS["fwd"].get(64 if D <= 64 else 128 if D <= 128 else 256)
                    if dtype == torch.float32 and cap is not None:  # as launch.attention_fwd does
                        kc = configs.KernelConfig(kc.block_m, kc.block_n, kc.num_warps, min(kc.num_stages, cap),
                                                  kc.tma, kc.rotate)
                    q, k, v = (torch.randn(1, 2, S, D, dtype=dtype) for _ in range(3))
                    captured.clear()
                    launch.attention_fwd(q, k, v, cfg, kernel_config=kc, fused_quant=False, causal=S == 512)
                    for fn, args, opts in list(captured):
                        check(fn, args, opts, dtype, (D, str(dtype), preset, S), bad)
                        n += 1
            for preset in ("none", "int8-fp8", "fp8") if D == 128 else ():
                for tma, rotate in ((False, True), (True, True)):  # the variants test_kernel_variants runs
                    q, k, v = (torch.randn(1, 2, 512, D, dtype=dtype) for _ in range(3))
                    captured.clear()
                    launch.attention_fwd(q, k, v, qflash.resolve_quant(preset), fused_quant=False,
                                         kernel_config=configs.KernelConfig(64, 64, 4, 2, tma, rotate))
                    for fn, args, opts in list(captured):
                        check(fn, args, opts, dtype, (D, str(dtype), preset, f"tma={tma} rotate={rotate}"), bad)
                        n += 1
            n += one_launch_mode(D, dtype, cuda, bad)
            n += single_key_calls(D, dtype, bad)
            q, k, v, do = (torch.randn(1, 2, 256, D, dtype=dtype) for _ in range(4))
            captured.clear()
            bwd_launch.attention_bwd(q, k, v, torch.randn_like(q), torch.randn(1, 2, 256), do,
                                     kernel_config=bwd_launch.pick_bwd_config(cuda, D, dtype))
            for fn, args, opts in list(captured):
                check(fn, args, opts, dtype, (D, str(dtype), "backward", 256), bad)
                n += 1
    print(f"compiled {n} launches for sm_90a; over the shared-memory limit or fp32 in TF32: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
