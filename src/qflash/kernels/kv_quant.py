"""K/V quantiser for 8-bit attention: Triton kernels (any CUDA GPU, and the CPU interpreter) that
write K codes and FP8 Vᵀ in the layouts the attention kernels read.

The Hopper family quantises K and V here (and Q inside its attention kernel: each Q tile is read
once there); the portable family quantises V here when V has one scale per channel over all
keys (its own fused quantiser does per-block scales).

==========  ===================================  =========  ========================================
tensor      shape                                dtype      notes
==========  ===================================  =========  ========================================
k codes     (B, Hkv, Sk, D)                      int8/f8    (k - mean_k) / k_scale, symmetric
k scale     (B, Hkv, nb)                         fp32       one per BLOCK_N keys; nb = cdiv(Sk, BLOCK_N)
v codesᵀ    (B, Hkv, D, nb·BLOCK_N)              fp8 e4m3   keys contiguous, zero past Sk
v scale     (B, Hkv, nb, D) or (B, Hkv, D)       fp32       per key block and channel, or per channel
==========  ===================================  =========  ========================================

The arithmetic is ``qflash.quant.core``'s (fp32, ``inv = qmax / amax`` in IEEE division, round
half to even for INT8, an all-zero group gets ``amax = 1``, a group holding a NaN a NaN scale), so ``qflash.reference`` reproduces
the codes exactly. Token statistics that need every key (the K mean for smoothing, the V channel
maximum for one scale per channel) come from a statistics pass before it (``kv_stats_kernel``:
at most MAX_CHUNKS partials per head, summed in a fixed order by the quantiser).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import Precision, QuantConfig
from .common import interpreter_enabled
from .fastlaunch import FastLauncher
from .pdl import grid_dependency, pdl_enabled

__all__ = ["quantize_kv", "quantize_kv_kernel", "kv_stats_kernel", "stat_rows"]

KIND_INT8 = 1
KIND_FP8 = 3


MAX_CHUNKS = 16  # partials per head of the statistics pass (the quantiser sums them in one load)

# The codes launch (H200, docs/perf/NOTES.md "Sessions 7-8"): N_PARTS 2 gives K and V their own
# programs (half the tiles live per program), same codes bit for bit. kv_quant at Flux's K/V
# (4096+512 / 16384+512 keys): one part 93.4 / 269.2 µs, two parts 92.7 / 268.2 µs (within noise),
# two parts at 16 warps 108.2 / 317.6 µs.
QUANT_WARPS, QUANT_PARTS = 8, 2


def stat_rows(sk: int, block: int = 64) -> int:
    """Keys per statistics program: at most MAX_CHUNKS partials per head, a multiple of ``block``."""
    per = -(-sk // MAX_CHUNKS)
    return max(block, -(-per // block) * block)


@triton.jit
def _max_nan(a, b):
    # NaN-propagating max (``tl.max`` drops NaNs): a NaN input must give a NaN scale, never finite codes
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# Under TRITON_INTERPRET=1 a ``tl.reduce`` with a jitted combine function runs the combine in
# Python per element pair: 80 % of an int8 training step on the interpreter (cProfile). There the
# NaN flag comes from a sum and the maximum from ``tl.max`` (same values; a NaN result is the
# canonical NaN); compiled kernels keep the one-instruction ``max.NaN`` reduction.
_INTERPRETING = tl.constexpr(interpreter_enabled())


@triton.jit
def max_nan_reduce(x, axis):
    """max of x along ``axis``, NaN where that slice holds a NaN (``tl.max`` drops NaNs)."""
    if _INTERPRETING:
        m = tl.where(tl.sum((x != x).to(tl.int32), axis) > 0, float("nan"), tl.max(x, axis))
    else:
        m = tl.reduce(x, axis, _max_nan)
    return m


@triton.jit
def kv_stats_kernel(
    K, V, KSum, VMax,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    Hkv, Sk, n_chunks, ROWS,
    SMOOTH_K: tl.constexpr, V_PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Grid (n_chunks, B·Hkv): partial K sums and V channel maxima over ROWS keys (a multiple of BLOCK).

    Writes KSum / VMax (B·Hkv, n_chunks, D) fp32; the quantiser sums / maxes the partials in a
    fixed order, so the statistics are deterministic (no atomics). ``USE_PDL``: programmatic
    dependent launch (``kernels.pdl``).
    """
    grid_dependency(USE_PDL)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dmask = offs_d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    ksum = tl.zeros([BLOCK, HEAD_DIM_PAD], tl.float32)
    vmax = tl.zeros([BLOCK, HEAD_DIM_PAD], tl.float32)
    for r in range(pid * ROWS, tl.minimum(pid * ROWS + ROWS, Sk), BLOCK):
        offs_n = r + tl.arange(0, BLOCK)
        nmask = (offs_n < Sk)[:, None] & dmask[None, :]
        if SMOOTH_K:
            ksum += tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=nmask,
                            other=0.0).to(tl.float32)
        if V_PER_CHANNEL:
            vmax = _max_nan(vmax, tl.abs(tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs
                                                 + offs_d[None, :], mask=nmask, other=0.0).to(tl.float32)))
    out = (bh.to(tl.int64) * n_chunks + pid) * HEAD_DIM + offs_d
    if SMOOTH_K:
        tl.store(KSum + out, tl.sum(ksum, axis=0), mask=dmask)
    if V_PER_CHANNEL:
        tl.store(VMax + out, max_nan_reduce(vmax, 0), mask=dmask)


@triton.jit
def _reduce_partials(base, n_chunks, offs_d, IS_MAX: tl.constexpr, CHUNKS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Sum (or max) of the n_chunks ≤ CHUNKS partial rows at ``base`` in one load (no serial chain)."""
    offs_c = tl.arange(0, CHUNKS)
    x = tl.load(base + offs_c[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(offs_c < n_chunks)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if IS_MAX:
        return max_nan_reduce(x, 0)
    return tl.sum(x, axis=0)


@triton.jit
def _symmetric_codes(x, inv, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    y = x * inv
    # one return: Triton type-checks every return of a function, constexpr branches included
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0  # 1.5·2^23: round half to even for |y| < 2^22
        codes = tl.clamp(y, -QMAX, QMAX).to(tl.int8)
    else:
        codes = tl.clamp(y, -QMAX, QMAX).to(tl.float8e4nv)
    return codes


@triton.jit
def quantize_kv_kernel(
    K, V, KSum, VMax,
    KC, KS, VT, VS,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    Hkv, Sk, n_blocks, n_chunks,
    KIND: tl.constexpr, SMOOTH_K: tl.constexpr, V_PER_CHANNEL: tl.constexpr, V_PERMUTED: tl.constexpr,
    CHUNKS: tl.constexpr, QUANT_K: tl.constexpr, N_PARTS: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """Grid (n_blocks, B·Hkv, N_PARTS): one program quantises BLOCK_N keys of one head, K and V
    (N_PARTS 1) or, with N_PARTS 2, K in the programs of part 0 and V in those of part 1 (half the
    tiles live per program: more programs per SM).

    K/V are read through their strides (channel stride 1); codes are written contiguous.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    part = tl.program_id(2)
    b = bh // Hkv
    h = bh % Hkv
    IS_INT: tl.constexpr = KIND == 1
    KMAX: tl.constexpr = 127.0 if KIND == 1 else 448.0
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dmask = offs_d < HEAD_DIM
    nmask = offs_n < Sk
    m2 = nmask[:, None] & dmask[None, :]

    # --- K: one scale per block (QUANT_K False: V only, for the portable family) -------------
    if QUANT_K and part == 0:
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        if SMOOTH_K:
            mean = _reduce_partials(KSum + bh.to(tl.int64) * n_chunks * HEAD_DIM, n_chunks, offs_d, False,
                                    CHUNKS, HEAD_DIM) / Sk
            k = tl.where(m2, k - mean[None, :], 0.0)
        amax = max_nan_reduce(max_nan_reduce(tl.abs(k), 1), 0)
        amax = tl.where(amax <= 1e-30, 1.0, amax)  # NaN stays NaN
        k_codes = _symmetric_codes(k, tl.math.div_rn(KMAX, amax), KMAX, IS_INT)
        kc_base = KC + bh.to(tl.int64) * Sk * HEAD_DIM
        tl.store(kc_base + offs_n[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], k_codes, mask=m2)
        tl.store(KS + bh.to(tl.int64) * n_blocks + pid, tl.math.div_rn(amax, KMAX))

    # --- V: FP8 per channel (of this block, or of all keys), stored transposed ----------------
    if part == N_PARTS - 1:
        _quantize_v_block(V, VMax, VT, VS, stride_vb, stride_vh, stride_vs, b, h, bh, pid, n_blocks, n_chunks,
                          offs_n, offs_d, dmask, m2, V_PER_CHANNEL, V_PERMUTED, CHUNKS, BLOCK_N, HEAD_DIM,
                          HEAD_DIM_PAD)


@triton.jit
def _quantize_v_block(V, VMax, VT, VS, stride_vb, stride_vh, stride_vs, b, h, bh, pid, n_blocks, n_chunks,
                      offs_n, offs_d, dmask, m2, V_PER_CHANNEL: tl.constexpr, V_PERMUTED: tl.constexpr,
                      CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HEAD_DIM_PAD: tl.constexpr):
    """FP8 Vᵀ codes and scales of one BLOCK_N-key block of one head (``quantize_kv_kernel``'s V part)."""
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=m2,
                other=0.0).to(tl.float32)
    if V_PER_CHANNEL:
        vmax = _reduce_partials(VMax + bh.to(tl.int64) * n_chunks * HEAD_DIM, n_chunks, offs_d, True, CHUNKS,
                                HEAD_DIM)
    else:
        vmax = max_nan_reduce(tl.abs(v), 0)
    vmax = tl.where(vmax <= 1e-30, 1.0, vmax)  # NaN stays NaN
    qmax_d = tl.full([HEAD_DIM_PAD], 448.0, tl.float32)
    v_codes = _symmetric_codes(v, tl.math.div_rn(qmax_d, vmax)[None, :], 448.0, False)
    vt_base = VT + bh.to(tl.int64) * HEAD_DIM * (n_blocks * BLOCK_N)
    if V_PERMUTED:
        # key 32a + 16h + 8i + 2q + e goes to column 32a + 16h + 4q + 2i + e: the order in which the
        # Hopper kernel's P registers are laid out as the wgmma A operand (hopper.fwd_kernel._p_operand).
        # Permuted in registers, so the store below stays contiguous (scattered stores cost 5x).
        v_codes = tl.reshape(tl.permute(tl.reshape(v_codes, [BLOCK_N // 32, 2, 2, 4, 2, HEAD_DIM_PAD]),
                                        [0, 1, 3, 2, 4, 5]), [BLOCK_N, HEAD_DIM_PAD])
    # padded keys (>= Sk) are written as zeros so the attention kernels read whole tiles
    tl.store(vt_base + offs_d[:, None].to(tl.int64) * (n_blocks * BLOCK_N) + offs_n[None, :], tl.trans(v_codes),
             mask=dmask[:, None])
    if V_PER_CHANNEL:
        if pid == 0:
            tl.store(VS + bh.to(tl.int64) * HEAD_DIM + offs_d, tl.math.div_rn(vmax, qmax_d), mask=dmask)
    else:
        tl.store(VS + (bh.to(tl.int64) * n_blocks + pid) * HEAD_DIM + offs_d, tl.math.div_rn(vmax, qmax_d),
                 mask=dmask)


_STATS = FastLauncher(kv_stats_kernel, n_pointers=4)
_QUANT = FastLauncher(quantize_kv_kernel, n_pointers=8)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, block_n: int, v_permuted: bool = False,
                quant_k: bool = True):
    """K codes and scales, Vᵀ codes and scales (the table in this module's docstring), in at most two launches.

    Returns (kc, ks, vt, vs, K partial sums (B, Hkv, n_chunks, D) fp32 or None); the K mean is
    ``partials.sum(2) / Sk`` (only the lse correction needs it on the host side). ``quant_k``
    False quantises V alone (kc, ks and the partials are then None): the portable family's
    launcher uses that for V with one scale per channel.
    """
    B, Hkv, Sk, D = k.shape
    dev = k.device
    nb = -(-Sk // block_n)
    code_dtype = torch.int8 if cfg.k.precision is Precision.INT8 else torch.float8_e4m3fn
    per_channel = cfg.v.granularity.size == 0
    smooth_k = bool(cfg.smooth_k) and quant_k
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    rows = stat_rows(Sk)
    pad = max(1 << (D - 1).bit_length(), 16)  # power-of-two tile width (D 96 -> 128)
    n_chunks = -(-Sk // rows)
    vt = torch.empty((B, Hkv, D, nb * block_n), dtype=torch.float8_e4m3fn, device=dev)
    vs = torch.empty((B, Hkv, D) if per_channel else (B, Hkv, nb, D), dtype=torch.float32, device=dev)
    kc = torch.empty((B, Hkv, Sk, D), dtype=code_dtype, device=dev) if quant_k else None
    ks = torch.empty((B, Hkv, nb), dtype=torch.float32, device=dev) if quant_k else vs
    ksum = torch.empty((B, Hkv, n_chunks, D), dtype=torch.float32, device=dev) if smooth_k else vs
    vmax = torch.empty((B, Hkv, n_chunks, D), dtype=torch.float32, device=dev) if per_channel else vs
    if smooth_k or per_channel:
        # positional records through FastLauncher: ~30 µs less CPU per launch than kernel[grid](...)
        # (SMOOTH_K, V_PER_CHANNEL, BLOCK, HEAD_DIM, HEAD_DIM_PAD, USE_PDL are the constexprs, in order)
        _STATS(grid=(n_chunks, B * Hkv), pointers=(k, v, ksum, vmax),
               scalars=(*strides, Hkv, Sk, n_chunks, rows, smooth_k, per_channel, 64, D, pad, pdl_enabled(dev)),
               num_warps=8, num_stages=3)
    parts = QUANT_PARTS if quant_k else 1
    # constexprs: KIND, SMOOTH_K, V_PER_CHANNEL, V_PERMUTED, CHUNKS, QUANT_K, N_PARTS, BLOCK_N, HEAD_DIM,
    # HEAD_DIM_PAD
    _QUANT(grid=(nb, B * Hkv, parts), pointers=(k, v, ksum, vmax, kc if quant_k else vt, ks, vt, vs),
           scalars=(*strides, Hkv, Sk, nb, n_chunks, KIND_INT8 if code_dtype is torch.int8 else KIND_FP8, smooth_k,
                    per_channel, bool(v_permuted), MAX_CHUNKS, bool(quant_k), parts, block_n, D, pad),
           num_warps=QUANT_WARPS, num_stages=3)
    if not quant_k:
        return None, None, vt, vs, None
    return kc, ks, vt, vs, (ksum if smooth_k else None)
