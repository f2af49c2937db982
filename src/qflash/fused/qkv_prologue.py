"""The attention prologue that writes attention operands: RMSNorm + RoPE (+ the text/image concat)
of Q and K, and K/V quantised straight into a preset's ``QuantizedKV`` format — three Triton
launches, no bf16 K or V in between.

What it replaces, per attention call of a Flux block (``int8-fp8``, Hopper family)::

    v = cat([v_txt, v_img])                            # read 2 + write 2 bytes per element
    q = rmsnorm_rope(q_img, ..., x_prefix=q_txt)       # read 2 + write 2
    k = rmsnorm_rope(k_img, ..., x_prefix=k_txt)       # read 2 + write 2
    kv_quant statistics pass (K mean, V channel max)   # read 2 + 2
    kv_quant codes pass (K codes, Vᵀ codes)            # read 2 + 2, write 1 + 1

= 22 bytes moved per (token, head, channel) in a double-stream block (18 in a single-stream one,
no V concat), six launches. The three launches here:

- **statistics** (``prologue_token_stats_kernel``, grid ``(ceil(S / TOKEN_T), B, ceil(H / TOKEN_HEADS))``):
  each program walks TOKEN_T tokens one at a time over TOKEN_HEADS heads (a token's heads are one
  contiguous stretch of memory, as in ``rmsnorm_rope``); reads Q (2), writes the normed/rotated Q
  (2) in its dtype (the Hopper kernel quantises Q per token itself); reads raw K (2) and V (2),
  applies RMSNorm + RoPE to K in registers and keeps per-chunk partial K sums (for the smoothing
  mean) and V channel maxima (for the per-channel FP8 scale) -> (B·H, chunks, D) fp32.
- **reduce** (``prologue_reduce_kernel``): the chunks' partials -> one K sum and one |V| maximum per
  head and channel (a fixed order: the same sums every run). Tiny.
- **codes** (``prologue_quant_kernel``, grid ``(ceil(S / 128), B·H)``): reads raw K (2) and V (2)
  again, recomputes the norm and rotation (cheap: a few FLOPs per byte), subtracts the mean, writes
  K codes (1) + scales and Vᵀ codes (1) + per-channel scales (or, for presets with P·V in float, V
  concatenated, 2).

= 14 bytes per (token, head, channel) in either block type (+ the partials: 8·D bytes per head and
32 tokens), three launches. The statistics pass reads K so that nothing is written twice: writing
the normed bf16 K once (2) and reading it back (2) would cost as much as recomputing it. cos/sin
(fp32, repeat-interleaved) come from L2 (the table, S·D·8 bytes, is 17 MB at Flux 2048px).
Measured on an H200 (Flux-dev, 24 heads, D 128, session 6): statistics 75 / 173 us, reduce 5 / 22
us, codes 160 / 546 us at 1024 / 2048px; the codes pass is what is left to speed up (NOTES).

Numerics: the normed/rotated K is rounded to the input dtype before it is quantised, exactly as
the unfused path (``rmsnorm_rope`` writes it in that dtype), so the codes equal
``qflash.quant.kv.quantize_kv_reference(rmsnorm_rope(...))``'s up to the summation order of the
K mean (a code on a rounding boundary may move by one step) and, for FP8, the conversion's
rounding (Triton's CPU interpreter rounds fp32 -> e4m3 differently from PyTorch in ~2 % of
values; GPUs agree to 99.8 %, see tests/test_hopper.py).

Inputs are "NHD" (B, S, H, D) views, as Flux's processor has them (projection outputs
unflattened; any strides with a contiguous head dim): ``x`` and an optional ``x_prefix``
(B, S_p, H, D) that comes first in the sequence (Flux's text tokens). ``cos``/``sin``:
(S_p + S, D) fp32, repeat-interleaved (``FluxPosEmbed``). Outputs: Q (B, S_p + S, H, D)
contiguous in the input dtype and a ``QuantizedKV`` (HND codes; shapes in ``qflash.quant.kv``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import GranularityKind, Precision, QuantConfig, resolve_quant
from ..kernels.common import next_pow2
from ..kernels.kv_quant import _max_nan, _symmetric_codes, max_nan_reduce
from ..quant.kv import V_BLOCK, V_ORDERS, QuantizedKV, quantize_kv_reference, unsupported_reason
from .rmsnorm_rope import rmsnorm_rope_reference

__all__ = [
    "rmsnorm_rope_quantize",
    "rmsnorm_rope_quantize_reference",
    "rmsnorm_rope_quantize_triton",
    "quantize_kv_triton",
    "triton_unsupported_reason",
]

# Launch shapes. Statistics (prologue_token_stats_kernel): TOKEN_T tokens x TOKEN_HEADS heads per
# program, one token at a time (its heads' rows are one contiguous stretch, as in rmsnorm_rope);
# measured on an H200 at Flux-dev 1024/2048px (docs/perf/NOTES.md, session 6): 75 / 173 us, vs
# 265 / 965 us for the earlier per-head 64-row tiles (255 registers, 197 spills on sm_90a).
TOKEN_T = 32
TOKEN_HEADS = 8
TOKEN_WARPS = 4
# Codes (prologue_quant_kernel), from sm_90a compiles on a CPU (``qflash.fused.compile_check``: spill
# instructions at D 128 with RoPE): 128-row sub-tile x 16 warps 261 (64 x 16 and 64 x 8 spilled more)
QUANT_WARPS = 16
QUANT_SUB = 128  # rows the codes pass holds at once (of its V_BLOCK keys)


@triton.jit
def _absmax_nan(x, AXIS: tl.constexpr):
    """Maxima of |x| along AXIS, NaN where that slice holds a NaN (``kv_quant.max_nan_reduce``)."""
    return max_nan_reduce(tl.abs(x), AXIS)


@triton.jit
def _reduce_partials(base, n_chunks, offs_d, IS_MAX: tl.constexpr, CHUNKS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Sum (or NaN-propagating max) of the n_chunks <= CHUNKS partial rows (CHUNKS, D) at ``base``.

    The codes launch reads one row (n_chunks = 1) through this masked CHUNKS-row load, the form it
    was timed with on the H200: a plain row load instead changed ptxas's allocation on sm_90a (64
    registers, 1034 spill instructions instead of 128 and 270)."""
    offs_c = tl.arange(0, CHUNKS)
    x = tl.load(base + offs_c[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(offs_c < n_chunks)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if IS_MAX:
        return _absmax_nan(x, 0)  # partial maxima are >= 0
    return tl.sum(x, axis=0)


@triton.jit
def _load_rows(xa, sab, sas, sah, xb, sbb, sbs, sbh, b, h, rows, S_A, S, offs_d, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` of the concatenation [x_prefix; x] of head h, batch b, as fp32 (R, D_PAD); zeros
    past S and in padded channels. Each row picks its source (prefix rows first)."""
    # two loads with complementary masks, not one load through a per-row select of the two
    # pointers: a selected pointer loses its alignment, so the load would not be vectorised (and
    # the kernel spilled: 840 spill instructions instead of 168 at D 128, measured on sm_90a)
    in_a = (rows < S_A)[:, None]
    m2 = (rows < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    pa = xa + b.to(tl.int64) * sab + rows.to(tl.int64)[:, None] * sas + h.to(tl.int64) * sah + offs_d[None, :]
    pb = xb + b.to(tl.int64) * sbb + (rows - S_A).to(tl.int64)[:, None] * sbs + h.to(tl.int64) * sbh + offs_d[None, :]
    xa_ = tl.load(pa, mask=m2 & in_a, other=0.0)
    xb_ = tl.load(pb, mask=m2 & ~in_a, other=0.0)
    return tl.where(in_a, xa_, xb_).to(tl.float32)


@triton.jit
def _load_cos_sin(COS, SIN, rows, S, stride_cs, HAS_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_PAD: tl.constexpr):
    """cos, sin at the even columns (R, D_PAD / 2) fp32 (zeros past S): the tables are
    repeat-interleaved (cos[2j] == cos[2j+1]), so half the registers. Loaded once per program and
    reused for every head of its group (per head they would be read from L2 H times over)."""
    if HAS_ROPE:
        offs_j = tl.arange(0, HEAD_DIM_PAD // 2)
        m2 = (rows < S)[:, None] & (offs_j < HEAD_DIM // 2)[None, :]
        cptr = rows[:, None].to(tl.int64) * stride_cs + 2 * offs_j[None, :]
        c = tl.load(COS + cptr, mask=m2, other=0.0)
        s = tl.load(SIN + cptr, mask=m2, other=0.0)
    else:
        c = tl.zeros([1, 1], tl.float32)
        s = c
    return c, s


@triton.jit
def _norm_rope(x, rows, S_A, WA, WB, c, s, eps, offs_d, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
               ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """RMSNorm (each row with its part's weight) then RoPE (half tables c, s) of fp32 rows x
    (R, D_PAD): per element the expressions of ``rmsnorm_rope``'s kernel
    (``y·c + partner·s``, partner = (-odd, even)), so the rounded results agree bit for bit."""
    if HAS_NORM:
        dmask = offs_d < HEAD_DIM
        wa = tl.load(WA + offs_d, mask=dmask, other=0.0).to(tl.float32)
        wb = tl.load(WB + offs_d, mask=dmask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        x = x * r[:, None] * tl.where((rows < S_A)[:, None], wa[None, :], wb[None, :])
    if HAS_ROPE:
        x_even, x_odd = tl.split(tl.reshape(x, (ROWS, HEAD_DIM_PAD // 2, 2)))
        y_even = x_even * c + (-x_odd) * s
        y_odd = x_odd * c + x_even * s
        x = tl.reshape(tl.join(y_even, y_odd), (ROWS, HEAD_DIM_PAD))
    return x


@triton.jit
def _token_rows(XA, XB, sab, sas, sah, sbb, sbs, sbh, WA, WB, b, t, S_A, offs_h, offs_d, m2,
                HAS_NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Token t's rows of heads offs_h (BLOCK_H, D_PAD) fp32 from [x_prefix; x], and its norm weight
    (D_PAD) fp32 (ones without a norm). The source is a scalar branch (as ``rmsnorm_rope``): the
    pointers keep their alignment, so the loads stay vectorised."""
    if t < S_A:
        ptrs = XA + b.to(tl.int64) * sab + t * sas + offs_h[:, None].to(tl.int64) * sah + offs_d[None, :]
        x = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
        if HAS_NORM:
            w = tl.load(WA + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
        else:
            w = tl.full(offs_d.shape, 1.0, tl.float32)
    else:
        ptrs = (XB + b.to(tl.int64) * sbb + (t - S_A) * sbs + offs_h[:, None].to(tl.int64) * sbh
                + offs_d[None, :])
        x = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
        if HAS_NORM:
            w = tl.load(WB + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
        else:
            w = tl.full(offs_d.shape, 1.0, tl.float32)
    return x, w


@triton.jit
def _token_norm_rope(x, w, c, s, eps, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """``rmsnorm_rope``'s arithmetic on one token's (BLOCK_H, D_PAD) rows: RMSNorm with weight w,
    then y·c + partner·s, partner = (-y[2j+1], y[2j]) (c, s: the token's (D_PAD,) table rows)."""
    if HAS_NORM:
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        x = x * r[:, None] * w[None, :]
    if HAS_ROPE:
        y_even, y_odd = tl.split(tl.reshape(x, (BLOCK_H, HEAD_DIM_PAD // 2, 2)))
        partner = tl.reshape(tl.join(-y_odd, y_even), (BLOCK_H, HEAD_DIM_PAD))
        x = x * c[None, :] + partner * s[None, :]
    return x


@triton.jit
def prologue_token_stats_kernel(
    QA, QB, KA, KB, VA, VB, WQA, WQB, WKA, WKB, COS, SIN, QO, KSum, VMax,
    sqab, sqas, sqah, sqbb, sqbs, sqbh,
    skab, skas, skah, skbb, skbs, skbh,
    svab, svas, svah, svbb, svbs, svbh,
    sqob, sqos, sqoh, stride_cs,
    H, S_A, S, n_chunks, T, eps,
    HAS_Q: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, SMOOTH_K: tl.constexpr,
    V_STATS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """Grid (n_chunks, B, ceil(H / BLOCK_H)): T consecutive tokens of BLOCK_H heads, one token at a
    time (its heads' rows are one contiguous stretch of memory, as in ``rmsnorm_rope``):
    normed/rotated Q -> QO; partial sums of the normed/rotated K (rounded to the input dtype) and
    channel maxima of |V| over the T tokens -> KSum / VMax (B·H, n_chunks, D) fp32."""
    ch = tl.program_id(0)
    b = tl.program_id(1)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    hmask = offs_h < H
    dmask = offs_d < HEAD_DIM
    m2 = hmask[:, None] & dmask[None, :]
    ksum = tl.zeros([BLOCK_H, HEAD_DIM_PAD], tl.float32)
    vmax = tl.zeros([BLOCK_H, HEAD_DIM_PAD], tl.float32)
    for t_ in range(ch * T, tl.minimum(ch * T + T, S)):
        t = tl.full([], 0, tl.int64) + t_  # int64 offsets (and a tensor under the CPU interpreter)
        c = tl.zeros([HEAD_DIM_PAD], tl.float32)
        s = c
        if HAS_ROPE:
            c = tl.load(COS + t * stride_cs + offs_d, mask=dmask, other=0.0)
            s = tl.load(SIN + t * stride_cs + offs_d, mask=dmask, other=0.0)
        if HAS_Q:
            x, w = _token_rows(QA, QB, sqab, sqas, sqah, sqbb, sqbs, sqbh, WQA, WQB, b, t, S_A, offs_h, offs_d, m2,
                               HAS_NORM, HEAD_DIM)
            x = _token_norm_rope(x, w, c, s, eps, HAS_NORM, HAS_ROPE, BLOCK_H, HEAD_DIM, HEAD_DIM_PAD)
            optr = (QO + b.to(tl.int64) * sqob + t * sqos + offs_h[:, None].to(tl.int64) * sqoh
                    + offs_d[None, :])
            tl.store(optr, x.to(QO.dtype.element_ty), mask=m2)
        if SMOOTH_K:
            k, w = _token_rows(KA, KB, skab, skas, skah, skbb, skbs, skbh, WKA, WKB, b, t, S_A, offs_h, offs_d, m2,
                               HAS_NORM, HEAD_DIM)
            k = _token_norm_rope(k, w, c, s, eps, HAS_NORM, HAS_ROPE, BLOCK_H, HEAD_DIM, HEAD_DIM_PAD)
            ksum += tl.where(m2, k.to(KA.dtype.element_ty).to(tl.float32), 0.0)  # as the unfused path stores it
        if V_STATS:
            v, _ = _token_rows(VA, VB, svab, svas, svah, svbb, svbs, svbh, VA, VA, b, t, S_A, offs_h, offs_d, m2,
                               False, HEAD_DIM)
            vmax = _max_nan(vmax, tl.abs(v))
    out = ((b * H + offs_h).to(tl.int64)[:, None] * n_chunks + ch) * HEAD_DIM + offs_d[None, :]
    if SMOOTH_K:
        tl.store(KSum + out, ksum, mask=m2)
    if V_STATS:
        tl.store(VMax + out, vmax, mask=m2)


@triton.jit
def prologue_reduce_kernel(KSum, VMax, KTot, VTot, n_chunks,
                           SMOOTH_K: tl.constexpr, V_STATS: tl.constexpr, RC: tl.constexpr, RD: tl.constexpr,
                           HEAD_DIM: tl.constexpr):
    """Grid (B·H, ceil(D / RD)): the n_chunks partial rows of one head summed (K) and maxed (|V|,
    NaN-propagating) -> KTot / VTot (B·H, D), what ``prologue_quant_kernel`` reads. A fixed order:
    the same sums every run."""
    bh = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * RD + tl.arange(0, RD)
    dmask = offs_d < HEAD_DIM
    acc = tl.zeros([RD], tl.float32)
    mx = tl.zeros([RD], tl.float32)
    for c0 in range(0, n_chunks, RC):
        offs_c = c0 + tl.arange(0, RC)
        ptr = (bh * n_chunks + offs_c)[:, None] * HEAD_DIM + offs_d[None, :]
        m = (offs_c < n_chunks)[:, None] & dmask[None, :]
        if SMOOTH_K:
            acc += tl.sum(tl.load(KSum + ptr, mask=m, other=0.0), axis=0)
        if V_STATS:
            mx = _max_nan(mx, _absmax_nan(tl.load(VMax + ptr, mask=m, other=0.0), 0))
    if SMOOTH_K:
        tl.store(KTot + bh * HEAD_DIM + offs_d, acc, mask=dmask)
    if V_STATS:
        tl.store(VTot + bh * HEAD_DIM + offs_d, mx, mask=dmask)


@triton.jit
def _k_rows(KA, KB, WKA, WKB, COS, SIN, mean, rows, b, h,
            skab, skas, skah, skbb, skbs, skbh, stride_cs, S_A, S, eps, offs_d,
            HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, SMOOTH_K: tl.constexpr, SUB: tl.constexpr,
            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """K rows (SUB, D_PAD) fp32: normed, rotated, rounded to the input dtype, mean subtracted."""
    c, s = _load_cos_sin(COS, SIN, rows, S, stride_cs, HAS_ROPE, HEAD_DIM, HEAD_DIM_PAD)
    k = _load_rows(KA, skab, skas, skah, KB, skbb, skbs, skbh, b, h, rows, S_A, S, offs_d, HEAD_DIM)
    k = _norm_rope(k, rows, S_A, WKA, WKB, c, s, eps, offs_d, HAS_NORM, HAS_ROPE, SUB, HEAD_DIM, HEAD_DIM_PAD)
    k = k.to(KA.dtype.element_ty).to(tl.float32)
    if SMOOTH_K:
        k = tl.where((rows < S)[:, None] & (offs_d < HEAD_DIM)[None, :], k - mean[None, :], 0.0)
    return k


@triton.jit
def prologue_quant_kernel(
    KA, KB, VA, VB, WKA, WKB, COS, SIN, KSum, VMax,
    KC, KS, KM, VT, VS,
    skab, skas, skah, skbb, skbs, skbh,
    svab, svas, svah, svbb, svbs, svbh,
    stride_cs,
    H, S_A, S, n_blocks, eps,
    KIND: tl.constexpr, K_PER_TOKEN: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
    SMOOTH_K: tl.constexpr, QUANT_V: tl.constexpr, V_PERMUTED: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr, SUB: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """Grid (ceil(S / BLOCK_N), B·H): BLOCK_N keys of one head, in sub-tiles of SUB rows -> K codes
    KC (B, H, S, D) and scales KS (B, H, S) per token or (B, H, n_blocks) per block, the K mean KM
    (B, H, D) (program 0); Vᵀ codes VT (B, H, D, n_blocks·BLOCK_N) (zero past S) + VS (B, H, D) per
    channel, or (QUANT_V False) V copied to VT (B, H, S, D) in its dtype. Codes:
    ``qflash.quant.core``'s arithmetic.

    A block scale needs the whole block's maximum before any code: the block's K rows are computed
    twice (maximum, then codes), SUB rows at a time — recomputing is cheaper than holding a
    128-row fp32 tile and its rotation temporaries (that version spilled thousands of registers).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    IS_INT: tl.constexpr = KIND == 1
    KMAX: tl.constexpr = 127.0 if KIND == 1 else 448.0
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dmask = offs_d < HEAD_DIM
    mean = tl.zeros([HEAD_DIM_PAD], tl.float32)
    if SMOOTH_K:
        mean = _reduce_partials(KSum + bh.to(tl.int64) * HEAD_DIM, 1, offs_d, False, CHUNKS, HEAD_DIM) / S
        if pid == 0:
            tl.store(KM + bh.to(tl.int64) * HEAD_DIM + offs_d, mean, mask=dmask)
    kc_base = KC + bh.to(tl.int64) * S * HEAD_DIM
    kargs = (skab, skas, skah, skbb, skbs, skbh, stride_cs, S_A, S, eps, offs_d)

    # --- K ---------------------------------------------------------------------------------------
    if K_PER_TOKEN:
        for i in tl.static_range(BLOCK_N // SUB):
            rows = pid * BLOCK_N + i * SUB + tl.arange(0, SUB)
            k = _k_rows(KA, KB, WKA, WKB, COS, SIN, mean, rows, b, h, *kargs, HAS_NORM, HAS_ROPE, SMOOTH_K, SUB,
                        HEAD_DIM, HEAD_DIM_PAD)
            amax = _absmax_nan(k, 1)
            amax = tl.where(amax <= 1e-30, 1.0, amax)  # NaN stays NaN
            inv = tl.math.div_rn(tl.full([SUB], KMAX, tl.float32), amax)
            tl.store(kc_base + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                     _symmetric_codes(k, inv[:, None], KMAX, IS_INT), mask=(rows < S)[:, None] & dmask[None, :])
            tl.store(KS + bh.to(tl.int64) * S + rows, tl.math.div_rn(amax, tl.full([SUB], KMAX, tl.float32)),
                     mask=rows < S)
    else:
        amax = tl.zeros([SUB], tl.float32)
        for i in tl.static_range(BLOCK_N // SUB):
            rows = pid * BLOCK_N + i * SUB + tl.arange(0, SUB)
            k = _k_rows(KA, KB, WKA, WKB, COS, SIN, mean, rows, b, h, *kargs, HAS_NORM, HAS_ROPE, SMOOTH_K, SUB,
                        HEAD_DIM, HEAD_DIM_PAD)
            amax = _max_nan(amax, _absmax_nan(k, 1))
        amax = _absmax_nan(amax, 0)
        amax = tl.where(amax <= 1e-30, 1.0, amax)  # NaN stays NaN
        inv = tl.math.div_rn(KMAX, amax)
        for i in tl.static_range(BLOCK_N // SUB):
            rows = pid * BLOCK_N + i * SUB + tl.arange(0, SUB)
            k = _k_rows(KA, KB, WKA, WKB, COS, SIN, mean, rows, b, h, *kargs, HAS_NORM, HAS_ROPE, SMOOTH_K, SUB,
                        HEAD_DIM, HEAD_DIM_PAD)
            tl.store(kc_base + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                     _symmetric_codes(k, inv, KMAX, IS_INT), mask=(rows < S)[:, None] & dmask[None, :])
        tl.store(KS + bh.to(tl.int64) * n_blocks + pid, tl.math.div_rn(amax, KMAX))

    # --- V ---------------------------------------------------------------------------------------
    if QUANT_V:
        vmax = _reduce_partials(VMax + bh.to(tl.int64) * HEAD_DIM, 1, offs_d, True, CHUNKS, HEAD_DIM)
        vmax = tl.where(vmax <= 1e-30, 1.0, vmax)  # NaN stays NaN
        qmax_d = tl.full([HEAD_DIM_PAD], 448.0, tl.float32)
        v_inv = tl.math.div_rn(qmax_d, vmax)
        if pid == 0:
            tl.store(VS + bh.to(tl.int64) * HEAD_DIM + offs_d, tl.math.div_rn(vmax, qmax_d), mask=dmask)
    for i in tl.static_range(BLOCK_N // SUB):
        rows = pid * BLOCK_N + i * SUB + tl.arange(0, SUB)
        v = _load_rows(VA, svab, svas, svah, VB, svbb, svbs, svbh, b, h, rows, S_A, S, offs_d, HEAD_DIM)
        if QUANT_V:
            v_codes = _symmetric_codes(v, v_inv[None, :], 448.0, False)
            if V_PERMUTED:
                # the Hopper kernel's P-operand order within each 32-key chunk (kernels/kv_quant.py,
                # hopper.fwd_kernel._p_operand); SUB is a multiple of 32
                v_codes = tl.reshape(tl.permute(tl.reshape(v_codes, [SUB // 32, 2, 2, 4, 2, HEAD_DIM_PAD]),
                                                [0, 1, 3, 2, 4, 5]), [SUB, HEAD_DIM_PAD])
            vt_base = VT + bh.to(tl.int64) * HEAD_DIM * (n_blocks * BLOCK_N)
            # padded keys (>= S) are zeros (their V loads were), so the attention reads whole tiles
            tl.store(vt_base + offs_d[:, None].to(tl.int64) * (n_blocks * BLOCK_N) + rows[None, :],
                     tl.trans(v_codes), mask=dmask[:, None])
        else:
            tl.store(VT + bh.to(tl.int64) * S * HEAD_DIM + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                     v.to(VT.dtype.element_ty), mask=(rows < S)[:, None] & dmask[None, :])


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def triton_unsupported_reason(cfg: QuantConfig, head_dim: int, rope: bool) -> str | None:
    """None if the Triton prologue runs ``cfg`` at this head dim, else why not."""
    why = unsupported_reason(cfg)
    if why is not None:
        return why
    g = cfg.k.granularity
    if g.kind is GranularityKind.BLOCK and g.size != V_BLOCK:
        return f"K granularity {g} (the Triton prologue: token or block({V_BLOCK}))"
    if rope and head_dim & (head_dim - 1):
        return f"RoPE needs a power-of-two head dim in the Triton prologue, got {head_dim}"
    if head_dim > 256:
        return f"head dim {head_dim} > 256"
    return None


def _config(quant) -> QuantConfig:
    cfg = resolve_quant(quant)
    why = unsupported_reason(cfg)
    if why is not None:
        raise ValueError(f"rmsnorm_rope_quantize: quant {cfg.name!r} cannot be pre-quantised: {why}")
    return cfg


def _strides3(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _launch(q, q_prefix, k, k_prefix, v, v_prefix, wq, wq_prefix, wk, wk_prefix, cos, sin, eps, cfg, v_order):
    """The three launches on (B, S, H, D) views; returns (q_out | None, QuantizedKV)."""
    B, S_main, H, D = k.shape
    S_A = k_prefix.shape[1] if k_prefix is not None else 0
    S = S_A + S_main
    dev, dtype = k.device, k.dtype
    has_norm, has_rope, has_q = wk is not None, cos is not None, q is not None
    pad = max(next_pow2(D), 16)
    nb = math.ceil(S / V_BLOCK)
    smooth_k, quant_v = bool(cfg.smooth_k), cfg.quantizes_pv
    per_token = cfg.k.granularity.kind is GranularityKind.TOKEN
    code_dtype = torch.int8 if cfg.k.precision is Precision.INT8 else torch.float8_e4m3fn

    kc = torch.empty((B, H, S, D), dtype=code_dtype, device=dev)
    ks = torch.empty((B, H, S if per_token else nb), dtype=torch.float32, device=dev)
    km = torch.empty((B, H, D), dtype=torch.float32, device=dev) if smooth_k else None
    if quant_v:
        vt = torch.empty((B, H, D, nb * V_BLOCK), dtype=torch.float8_e4m3fn, device=dev)
        vs = torch.empty((B, H, D), dtype=torch.float32, device=dev)
    else:
        vt, vs = torch.empty((B, H, S, D), dtype=dtype, device=dev), None
    q_out = torch.empty((B, S, H, D), dtype=dtype, device=dev) if has_q else None
    dummy = ks

    ka = k_prefix if k_prefix is not None else k
    va = v_prefix if v_prefix is not None else v
    qa = (q_prefix if q_prefix is not None else q) if has_q else ka
    qb = q if has_q else k
    wka = (wk_prefix if k_prefix is not None else wk) if has_norm else dummy
    wkb = wk if has_norm else dummy
    wqa = (wq_prefix if q_prefix is not None else wq) if has_norm and has_q else dummy
    wqb = wq if has_norm and has_q else dummy
    c = cos.float().contiguous() if has_rope else dummy
    s = sin.float().contiguous() if has_rope else dummy
    stride_cs = c.stride(0) if has_rope else 0
    eps = float(eps)
    kstr = (*_strides3(ka), *_strides3(k))
    vstr = (*_strides3(va), *_strides3(v))
    if S == 0 or B * H == 0:
        if km is not None:
            km.zero_()
        if vs is not None:
            vs.fill_(1.0 / 448.0)
        return q_out, QuantizedKV(cfg, kc, ks, km, vt.zero_(), vs, v_order if quant_v else "keys", dtype)
    # statistics (+ Q) launch over token chunks, then the partials reduced to one row per head
    heads = min(TOKEN_HEADS, next_pow2(H))
    n_tc = math.ceil(S / TOKEN_T)
    kpart = torch.empty((B * H, n_tc, D), dtype=torch.float32, device=dev) if smooth_k else dummy
    vpart = torch.empty((B * H, n_tc, D), dtype=torch.float32, device=dev) if quant_v else dummy
    ksum = torch.empty((B * H, D), dtype=torch.float32, device=dev) if smooth_k else dummy
    vmax = torch.empty((B * H, D), dtype=torch.float32, device=dev) if quant_v else dummy
    if smooth_k or quant_v or has_q:
        prologue_token_stats_kernel[(n_tc, B, math.ceil(H / heads))](
            qa, qb, ka, k, va, v, wqa, wqb, wka, wkb, c, s, q_out if has_q else dummy, kpart, vpart,
            *(_strides3(qa) if has_q else (0, 0, 0)), *(_strides3(qb) if has_q else (0, 0, 0)),
            *kstr, *vstr, *(_strides3(q_out) if has_q else (0, 0, 0)), stride_cs,
            H, S_A, S, n_tc, TOKEN_T, eps,
            HAS_Q=has_q, HAS_NORM=has_norm, HAS_ROPE=has_rope, SMOOTH_K=smooth_k, V_STATS=quant_v,
            BLOCK_H=heads, HEAD_DIM=D, HEAD_DIM_PAD=pad, num_warps=TOKEN_WARPS,
        )
    if smooth_k or quant_v:
        rd = min(32, pad)
        prologue_reduce_kernel[(B * H, math.ceil(D / rd))](
            kpart, vpart, ksum, vmax, n_tc, SMOOTH_K=smooth_k, V_STATS=quant_v, RC=64, RD=rd, HEAD_DIM=D,
            num_warps=2)
    prologue_quant_kernel[(nb, B * H)](
        ka, k, va, v, wka, wkb, c, s, ksum, vmax,
        kc, ks, km if km is not None else dummy, vt, vs if vs is not None else dummy,
        *kstr, *vstr, stride_cs,
        H, S_A, S, nb, eps,
        KIND=1 if code_dtype is torch.int8 else 3, K_PER_TOKEN=per_token, HAS_NORM=has_norm, HAS_ROPE=has_rope,
        SMOOTH_K=smooth_k, QUANT_V=quant_v, V_PERMUTED=quant_v and v_order == "hopper", CHUNKS=32,
        BLOCK_N=V_BLOCK, SUB=QUANT_SUB, HEAD_DIM=D, HEAD_DIM_PAD=pad, num_warps=QUANT_WARPS,
    )
    return q_out, QuantizedKV(cfg, kc, ks, km, vt, vs, v_order if quant_v else "keys", dtype)


def _check_part(name, x, like):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a (B, S, H, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if like is not None:
        if x.shape[0] != like.shape[0] or x.shape[2:] != like.shape[2:]:
            raise ValueError(f"{name} must be (B={like.shape[0]}, S, H={like.shape[2]}, D={like.shape[3]}), "
                             f"got {tuple(x.shape)}")
        if x.dtype != like.dtype or x.device != like.device:
            raise ValueError(f"{name} ({x.dtype}, {x.device}) must match k ({like.dtype}, {like.device})")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def _check(q, k, v, q_prefix, k_prefix, v_prefix, norm_q, norm_k, norm_q_prefix, norm_k_prefix, cos, sin, v_order):
    _check_part("k", k, None)
    for name, t in (("q", q), ("v", v)):
        if t is not None:
            _check_part(name, t, k)
            if t.shape[1] != k.shape[1]:
                raise ValueError(f"{name} must have k's sequence length {k.shape[1]}, got {tuple(t.shape)}")
    prefixes = (("q_prefix", q_prefix, q), ("k_prefix", k_prefix, k), ("v_prefix", v_prefix, v))
    if (k_prefix is None) != (v_prefix is None) or (q is not None and (q_prefix is None) != (k_prefix is None)):
        raise ValueError("give the prefix (text tokens) of q, k and v together, or none of them")
    for name, t, main in prefixes:
        if t is not None:
            _check_part(name, t, k)
            if t.shape[1] != k_prefix.shape[1]:
                raise ValueError(f"{name} must have {k_prefix.shape[1]} tokens like k_prefix, got {tuple(t.shape)}")
    D = k.shape[-1]
    if q is not None and (norm_q is None) != (norm_k is None):
        raise ValueError("give norm_q and norm_k together (or neither)")
    for name, w, needed in (("norm_q", norm_q, q is not None and norm_k is not None), ("norm_k", norm_k, False),
                            ("norm_q_prefix", norm_q_prefix, q_prefix is not None and norm_k is not None),
                            ("norm_k_prefix", norm_k_prefix, k_prefix is not None and norm_k is not None)):
        if w is None and needed:
            raise ValueError(f"{name} is needed (the RMSNorm weight of that part)")
        if w is not None and (not isinstance(w, torch.Tensor) or tuple(w.shape) != (D,)):
            raise ValueError(f"{name} must be a ({D},) tensor, got {getattr(w, 'shape', type(w).__name__)}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    S = k.shape[1] + (k_prefix.shape[1] if k_prefix is not None else 0)
    if cos is not None and (tuple(cos.shape) != (S, D) or tuple(sin.shape) != (S, D)):
        raise ValueError(f"cos and sin must be ({S}, {D}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if v_order not in V_ORDERS:
        raise ValueError(f"v_order must be one of {V_ORDERS}, got {v_order!r}")
    if any(t is not None and t.stride(-1) != 1 for t in (q, k, v, q_prefix, k_prefix, v_prefix)):
        raise ValueError("q, k, v (and their prefixes) need a contiguous last (head) dim")


def rmsnorm_rope_quantize_reference(q, k, v, quant, *, norm_q=None, norm_k=None, eps=1e-6, cos=None, sin=None,
                                    q_prefix=None, k_prefix=None, v_prefix=None, norm_q_prefix=None,
                                    norm_k_prefix=None, v_order="keys"):
    """The unfused definition: ``rmsnorm_rope_reference`` of q and k (rounded to their dtype), the V
    concat, ``quantize_kv_reference``. Same arguments and results as ``rmsnorm_rope_quantize``."""
    cfg = _config(quant)
    _check(q, k, v, q_prefix, k_prefix, v_prefix, norm_q, norm_k, norm_q_prefix, norm_k_prefix, cos, sin, v_order)

    def prep(x, w, x_p, w_p):
        if w is None:  # no norm: the rotation alone, with the kernel's arithmetic
            y = torch.cat([x_p, x], dim=1) if x_p is not None else x
            if cos is None:
                return y.contiguous()
            yf = y.float()
            even, odd = yf[..., 0::2], yf[..., 1::2]
            rot = torch.stack([-odd, even], dim=-1).flatten(-2)
            return (yf * cos.float()[None, :, None, :] + rot * sin.float()[None, :, None, :]).to(x.dtype)
        return rmsnorm_rope_reference(x, w, cos, sin, eps, x_prefix=x_p, weight_prefix=w_p)

    kk = prep(k, norm_k, k_prefix, norm_k_prefix)
    vv = torch.cat([v_prefix, v], dim=1) if v_prefix is not None else v
    qq = prep(q, norm_q, q_prefix, norm_q_prefix) if q is not None else None
    qkv = quantize_kv_reference(kk.transpose(1, 2), vv.transpose(1, 2), cfg, v_order)
    return qq, qkv


def rmsnorm_rope_quantize_triton(q, k, v, quant, *, norm_q=None, norm_k=None, eps=1e-6, cos=None, sin=None,
                                 q_prefix=None, k_prefix=None, v_prefix=None, norm_q_prefix=None, norm_k_prefix=None,
                                 v_order="keys"):
    """The three Triton launches (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    cfg = _config(quant)
    _check(q, k, v, q_prefix, k_prefix, v_prefix, norm_q, norm_k, norm_q_prefix, norm_k_prefix, cos, sin, v_order)
    why = triton_unsupported_reason(cfg, k.shape[-1], cos is not None)
    if why is not None:
        raise NotImplementedError(f"rmsnorm_rope_quantize_triton: {why}")
    return _launch(q, q_prefix, k, k_prefix, v, v_prefix, norm_q, norm_q_prefix, norm_k, norm_k_prefix,
                   cos, sin, eps, cfg, v_order)


def rmsnorm_rope_quantize(q, k, v, quant="int8-fp8", *, norm_q=None, norm_k=None, eps=1e-6, cos=None, sin=None,
                          q_prefix=None, k_prefix=None, v_prefix=None, norm_q_prefix=None, norm_k_prefix=None,
                          v_order="keys"):
    """RMSNorm + RoPE of q and k, the [prefix; x] concat of q, k, v, and K/V quantised for ``quant``.

    Args:
        q, k, v: (B, S, H, D) fp16/bf16/fp32, contiguous head dim (q may be None: K/V only).
        quant: preset name or ``QuantConfig`` (``int8``, ``int8-fp8``, ``fp8``; see
            ``qflash.quant.kv.unsupported_reason``).
        norm_q, norm_k: (D,) RMSNorm weights (None: no norm); eps: the norms' epsilon.
        cos, sin: (S_p + S, D) fp32 rotary tables (None: no rotation).
        q_prefix, k_prefix, v_prefix: (B, S_p, H, D) tokens placed first (Flux's text tokens), with
            norm weights norm_q_prefix / norm_k_prefix.
        v_order: "keys", "hopper" (Vᵀ in the Hopper kernel's P-operand order; what the Hopper
            family reads without a gather) or "auto" (``qflash.preferred_v_order``: what the kernel
            family that attention will pick for these operands reads directly).

    Returns ``(q_out, qkv)``: q_out (B, S_p + S, H, D) contiguous in q's dtype (None without q) and
    a ``QuantizedKV`` to pass to ``qflash.attention(q_out, qkv, layout="NHD")``.

    Runs the three Triton launches on CUDA (module docstring), the PyTorch reference elsewhere or
    where the Triton kernels do not apply (``triton_unsupported_reason``).
    """
    cfg = resolve_quant(quant)
    if v_order == "auto" and isinstance(k, torch.Tensor) and k.dim() == 4:
        from ..kernels.dispatch import preferred_kv_order  # what qflash.preferred_v_order answers

        v_order = preferred_kv_order(cfg, k.device, k.dtype, k.shape[-1])
    if (isinstance(k, torch.Tensor) and k.is_cuda and k.dim() == 4
            and triton_unsupported_reason(cfg, k.shape[-1], cos is not None) is None):
        return rmsnorm_rope_quantize_triton(q, k, v, cfg, norm_q=norm_q, norm_k=norm_k, eps=eps, cos=cos, sin=sin,
                                            q_prefix=q_prefix, k_prefix=k_prefix, v_prefix=v_prefix,
                                            norm_q_prefix=norm_q_prefix, norm_k_prefix=norm_k_prefix, v_order=v_order)
    return rmsnorm_rope_quantize_reference(q, k, v, cfg, norm_q=norm_q, norm_k=norm_k, eps=eps, cos=cos, sin=sin,
                                           q_prefix=q_prefix, k_prefix=k_prefix, v_prefix=v_prefix,
                                           norm_q_prefix=norm_q_prefix, norm_k_prefix=norm_k_prefix, v_order=v_order)


def quantize_kv_triton(k: torch.Tensor, v: torch.Tensor, quant, v_order: str = "keys") -> QuantizedKV:
    """``QuantizedKV`` of HND k, v (B, H, S, D) by the prologue's three launches without norm or
    rotation (CUDA, or the CPU interpreter)."""
    cfg = resolve_quant(quant)
    why = triton_unsupported_reason(cfg, k.shape[-1], False)
    if why is not None:
        raise NotImplementedError(f"quantize_kv_triton: {why}")
    kk, vv = k.transpose(1, 2), v.transpose(1, 2)
    if kk.stride(-1) != 1:
        kk = kk.contiguous()
    if vv.stride(-1) != 1:
        vv = vv.contiguous()
    return _launch(None, None, kk, None, vv, None, None, None, None, None, None, None, 0.0, cfg, v_order)[1]
