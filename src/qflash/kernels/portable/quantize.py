"""Fused runtime quantiser: one Triton launch quantises Q, K and (for FP8 P·V) V.

Reads fp16/bf16/fp32 inputs through their strides (HND or NHD views, no copies) and writes:

==========  ===================================  =========  ==============================
tensor      shape                                dtype      notes
==========  ===================================  =========  ==============================
q codes     (B, Hq, Sq, D)  [int4: D // 2]       int8/u8/f8  (q - mean_q(block)) / scale
q scale     (B, Hq, ceil(Sq / Q_BLOCK))          fp32       Q_BLOCK = 1 for per-token
q mean      (B, Hq, ceil(Sq / QM_BLOCK), D)      fp32       smooth_q only
k codes     (B, Hkv, Sk, D) [int4: D // 2]       int8/u8/f8  (k - mean_k) / scale
k scale     (B, Hkv, ceil(Sk / K_BLOCK))         fp32
v codesᵀ    (B, Hkv, D, Sk_pad)                  fp8 e4m3   transposed: keys contiguous
v scale     (B, Hkv, Sk_pad / V_BLOCK, D)        fp32       per key block and channel
==========  ===================================  =========  ==============================

The arithmetic is exactly ``qflash.quant.core``'s (fp32, ``inv = qmax / amax``, round half to
even), so the fake-quant reference reproduces these codes. ``mean_k`` (and ``mean_v``) are
token means computed beforehand (they need every token, so they cannot come from one block).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common import CQK_FP8, CQK_INT4, QK_FLOAT, QK_FP8, QK_INT4, QK_INT8  # noqa: F401  (host codes re-exported)
from ..pdl import grid_dependency
from .interpreter import apply_if_interpreting

# Under TRITON_INTERPRET=1 the interpreter's fp8/bf16 conversions, bf16 dots and fma differ from the
# GPU's: fix them (once) before any of the family's kernels runs (every kernel module imports this one).
apply_if_interpreting()
from ..kv_quant import _reduce_partials, max_nan_reduce


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def absmax(x, axis):
    """max |x| along ``axis``, NaN if any element is NaN (``tl.max`` drops NaNs, on the GPU and in the
    interpreter alike). ``max.NaN.f32`` costs what ``max.f32`` does on sm_80+."""
    return max_nan_reduce(tl.abs(x), axis)


@triton.jit
def guard_amax(amax):
    """An all-zero group gets amax = 1 (any scale reproduces zeros); NaN stays NaN (``amax > tiny``
    would make it 1 and hide a NaN input behind finite codes: a NaN scale makes its rows NaN)."""
    return tl.where(amax <= 1e-30, 1.0, amax)


@triton.jit
def scaled_additive_mask(m):
    """An additive mask value (natural units, fp32) in the kernels' log2 units.

    ``torch.finfo(dtype).min`` (Hugging Face's "masked") times log2(e) overflows fp32 to -inf, which
    would turn a row masked with it entirely into an empty row (zeros); SDPA gives the mean of V
    there (the scores vanish next to the mask). Values below -FLT_MAX / log2(e) become -FLT_MAX,
    so such a row stays finite and uniform; a true -inf stays -inf.
    """
    return tl.where(m >= -2.3587e38, m * 1.4426950408889634, tl.where(m == float("-inf"), float("-inf"), -3.4028234663852886e38))


@triton.jit
def _round_half_even(x):
    # 1.5 * 2**23: (x + M) - M rounds fp32 |x| < 2**22 to the nearest integer, ties to even
    return (x + 12582912.0) - 12582912.0


@triton.jit
def quant_codes(x, KIND: tl.constexpr, PER_ROW: tl.constexpr):
    """Symmetric codes of an fp32 tile x [R, C]: (codes, scale), scale [R] per row or a scalar.

    codes are int8 (INT8, and INT4 values in [-7, 7], unpacked) or fp8 e4m3; ``x ≈ codes * scale``.
    The arithmetic is ``qflash.quant.core``'s: ``inv = qmax / amax`` (IEEE division), round half
    to even, an all-zero group gets ``amax = 1``; a group holding a NaN gets a NaN scale (its
    codes are meaningless, the rows that use the scale become NaN, as SDPA's would).
    """
    if KIND == CQK_INT4:
        QMAX: tl.constexpr = 7.0
    elif KIND == CQK_FP8:
        QMAX: tl.constexpr = 448.0
    else:
        QMAX: tl.constexpr = 127.0
    if PER_ROW:
        amax = guard_amax(absmax(x, 1))
        inv = tl.math.div_rn(tl.full(amax.shape, QMAX, tl.float32), amax)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
        y = x * inv[:, None]
    else:
        amax = guard_amax(max_nan_reduce(absmax(x, 1), 0))
        inv = tl.math.div_rn(QMAX, amax)
        scale = tl.math.div_rn(amax, QMAX)
        y = x * inv
    if KIND == CQK_FP8:
        codes = tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv)
    else:
        codes = tl.clamp(_round_half_even(y), -QMAX, QMAX).to(tl.int8)
    return codes, scale


@triton.jit
def fp8_channel_codes(x):
    """FP8 e4m3 codes of an fp32 tile x [R, C] with one scale per column: (codes, scale [C])."""
    amax = guard_amax(absmax(x, 0))
    inv = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    return tl.clamp(x * inv[None, :], -448.0, 448.0).to(tl.float8e4nv), scale


@triton.jit
def _split_stats(k_base, stride_kn, v_base, stride_vn, s0, s1, offs_d, dmask, K_MEAN: tl.constexpr,
                 V_MEAN: tl.constexpr, V_AMAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """(K mean, V mean, V's per-column max |v|) over rows [s0, s1) of (S, D) K and V slices, fp32
    (D,) each, zeros (ones for the max) where not asked for. One pass, 2·BLOCK_N rows of K and V
    per iteration with all their loads in flight together (each iteration otherwise waits one
    memory latency); elementwise accumulators, reduced across the tile once at the end."""
    k_sum = tl.zeros([BLOCK_N, offs_d.shape[0]], tl.float32)
    v_sum = tl.zeros([BLOCK_N, offs_d.shape[0]], tl.float32)
    v_top = tl.zeros([BLOCK_N, offs_d.shape[0]], tl.float32)
    for start in range(s0, s1, 2 * BLOCK_N):
        offs_a = start + tl.arange(0, BLOCK_N)
        offs_b = offs_a + BLOCK_N
        mask_a = (offs_a < s1)[:, None] & dmask[None, :]
        mask_b = (offs_b < s1)[:, None] & dmask[None, :]
        if K_MEAN:
            k_a = tl.load(k_base + offs_a[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=mask_a, other=0.0)
            k_b = tl.load(k_base + offs_b[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=mask_b, other=0.0)
        if V_MEAN or V_AMAX:
            v_a = tl.load(v_base + offs_a[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=mask_a, other=0.0)
            v_b = tl.load(v_base + offs_b[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=mask_b, other=0.0)
        if K_MEAN:
            k_sum += k_a.to(tl.float32) + k_b.to(tl.float32)
        if V_MEAN:
            v_sum += v_a.to(tl.float32) + v_b.to(tl.float32)
        if V_AMAX:
            v_top = _max_nan(v_top, _max_nan(tl.abs(v_a.to(tl.float32)), tl.abs(v_b.to(tl.float32))))
    # tl.cast, not .to: with Sk == 1 Triton specialises the bounds to Python ints (s0 = 0, s1 = 1)
    n = tl.cast(s1 - s0, tl.float32)
    k_mean = tl.zeros([offs_d.shape[0]], tl.float32)
    v_mean = tl.zeros([offs_d.shape[0]], tl.float32)
    v_amax = tl.full([offs_d.shape[0]], 1.0, tl.float32)
    if K_MEAN:
        k_mean = tl.sum(k_sum, axis=0) / n
    if V_MEAN:
        v_mean = tl.sum(v_sum, axis=0) / n
    if V_AMAX:
        v_amax = max_nan_reduce(v_top, 0)  # NaN-propagating: a NaN in V gives a NaN channel scale
    return k_mean, v_mean, v_amax


@triton.jit
def _quantize_rows(
    x_base, stride_xs,
    out_base, stride_os,
    scale_base, stride_ss,
    mean_base,
    row0, S,
    KIND: tl.constexpr,  # QK_INT8 / QK_INT4 / QK_FP8
    PER_TOKEN: tl.constexpr,  # True: one scale per row; False: one scale for the ROWS rows
    SUBTRACT_MEAN: tl.constexpr,  # 0: no, 1: load a (D,) mean from mean_base, 2: compute the block mean and
    # store it, 3: subtract ``mean_in`` (D_pad,) fp32
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    mean_in=None, PACK: tl.constexpr = True,
):
    """Quantise rows [row0, row0 + ROWS) of one (batch, head) slice; write codes and scales.
    ``PACK`` (INT4): two codes per byte; False: one int8 per code (values in [-7, 7])."""
    offs_r = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rmask = offs_r < S
    dmask = offs_d < HEAD_DIM
    m2 = rmask[:, None] & dmask[None, :]
    x = tl.load(x_base + offs_r[:, None].to(tl.int64) * stride_xs + offs_d[None, :], mask=m2, other=0.0)
    x = x.to(tl.float32)
    if SUBTRACT_MEAN == 1:
        mean = tl.load(mean_base + offs_d, mask=dmask, other=0.0)
        x = tl.where(m2, x - mean[None, :], 0.0)
    elif SUBTRACT_MEAN == 3:
        x = tl.where(m2, x - mean_in[None, :], 0.0)
    elif SUBTRACT_MEAN == 2:
        n_valid = tl.minimum(S - row0, ROWS).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_valid
        tl.store(mean_base + offs_d, mean, mask=dmask)
        x = tl.where(m2, x - mean[None, :], 0.0)
    codes, scale = quant_codes(x, KIND, PER_TOKEN)
    if PER_TOKEN:
        tl.store(scale_base + offs_r * stride_ss, scale, mask=rmask)
    else:
        tl.store(scale_base + (row0 // ROWS) * stride_ss, scale)
    if KIND == CQK_FP8:
        tl.store(out_base + offs_r[:, None].to(tl.int64) * stride_os + offs_d[None, :], codes, mask=m2)
    else:
        if KIND == CQK_INT4 and PACK:
            lo, hi = tl.split(tl.reshape(codes, [ROWS, HEAD_DIM_PAD // 2, 2]))
            packed = (lo & 0xF) | (hi << 4)
            offs_p = tl.arange(0, HEAD_DIM_PAD // 2)
            pmask = rmask[:, None] & (offs_p < HEAD_DIM // 2)[None, :]
            tl.store(out_base + offs_r[:, None].to(tl.int64) * stride_os + offs_p[None, :],
                     packed.to(tl.uint8, bitcast=True), mask=pmask)
        else:
            tl.store(out_base + offs_r[:, None].to(tl.int64) * stride_os + offs_d[None, :], codes, mask=m2)


@triton.jit
def _quantize_v_block(
    v_base, stride_vs,
    vt_base, stride_vtd,
    scale_base,
    mean_base,
    row0, S,
    SUBTRACT_MEAN: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    vmax_base=None, n_chunks=0, V_GLOBAL: tl.constexpr = False, CHUNKS: tl.constexpr = 16,
    amax_in=None, AMAX_IN: tl.constexpr = False,
):
    """FP8 e4m3 codes of V rows [row0, row0 + ROWS), one scale per channel, stored transposed.

    ``V_GLOBAL``: the scale is per channel over *all* keys (V granularity channel(0)), from the
    ``n_chunks`` partial maxima (n_chunks, D) at ``vmax_base`` (``kv_quant.kv_stats_kernel``);
    ``AMAX_IN``: from ``amax_in`` (D_pad,), the max |v| per channel over all keys."""
    offs_r = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rmask = offs_r < S
    dmask = offs_d < HEAD_DIM
    m2 = rmask[:, None] & dmask[None, :]
    x = tl.load(v_base + offs_r[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=m2, other=0.0)
    x = x.to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(mean_base + offs_d, mask=dmask, other=0.0)
        x = tl.where(m2, x - mean[None, :], 0.0)
    if V_GLOBAL or AMAX_IN:
        if AMAX_IN:
            amax = guard_amax(amax_in)
        else:
            amax = guard_amax(_reduce_partials(vmax_base, n_chunks, offs_d, True, CHUNKS, HEAD_DIM))
        inv = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
        codes = tl.clamp(x * inv[None, :], -448.0, 448.0).to(tl.float8e4nv)
    else:
        codes, scale = fp8_channel_codes(x)
    tl.store(scale_base + offs_d, scale, mask=dmask)
    # padded rows (>= S) are written as zeros so the attention kernel can read whole tiles;
    # transposed in registers first so each thread writes runs of consecutive keys (coalesced)
    tl.store(vt_base + offs_d[:, None].to(tl.int64) * stride_vtd + offs_r[None, :], tl.trans(codes), mask=dmask[:, None])


@triton.jit
def quantize_qkv_kernel(
    Q, K, V,
    QC, QS, QM, KC, KS, KM, VT, VS, VM,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_qcb, stride_qch, stride_qcs,
    stride_qsb, stride_qsh, stride_qss,
    stride_qmb, stride_qmh, stride_qms,
    stride_kcb, stride_kch, stride_kcs,
    stride_ksb, stride_ksh, stride_kss,
    stride_kmb, stride_kmh,
    stride_vtb, stride_vth, stride_vtd,
    stride_vsb, stride_vsh, stride_vss,
    stride_vmb, stride_vmh,
    Hq, Hkv, Sq, Sk, n_chunks,
    KIND: tl.constexpr,
    Q_PER_TOKEN: tl.constexpr, K_PER_TOKEN: tl.constexpr,
    Q_ROWS: tl.constexpr, K_ROWS: tl.constexpr, V_ROWS: tl.constexpr,
    SMOOTH_Q: tl.constexpr, SMOOTH_K: tl.constexpr, QUANT_V: tl.constexpr, SMOOTH_V: tl.constexpr,
    STATS: tl.constexpr, SELF_STATS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PACK_INT4: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Grid (max row blocks over Q, K, V, B * Hq, 3): program (i, bh, role) quantises block i of
    Q (role 0), K (role 1) or V (role 2) of its head (K and V only for head indices below Hkv):
    the three are independent, so they run side by side rather than one after another in a
    program. Inputs have a contiguous channel dim (stride 1); other strides are free (HND or NHD).

    ``STATS``: the token statistics come from ``kv_quant.kv_stats_kernel``'s ``n_chunks`` partials
    per head instead of host tensors: KM then holds the K partial sums (B, Hkv, n_chunks, D) (the
    mean is their sum / Sk) and, with ``QUANT_V``, VM the V partial maxima (same shape) for one
    FP8 scale per V channel over all keys (written to VS (B, Hkv, D); SMOOTH_V must be off).
    ``SELF_STATS`` (short key ranges, no statistics launch): each K program takes the K mean over
    all keys itself (program 0 writes it to KM, (B, Hkv, D)), each V program V's channel maxima
    (for one FP8 scale per channel, VS as with ``STATS``); SMOOTH_V must be off.
    ``PACK_INT4``: INT4 Q and K codes two per byte; False: one int8 per code (the attention kernel
    then reads them as INT8: the same products, no unpacking per tile).
    ``USE_PDL``: programmatic dependent launch (``kernels.pdl``)."""
    grid_dependency(USE_PDL)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    role = tl.program_id(2)
    b = bh // Hq
    h = bh % Hq
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dmask = offs_d < HEAD_DIM
    if role == 0 and pid * Q_ROWS < Sq:
        _quantize_rows(
            Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, stride_qs,
            QC + b.to(tl.int64) * stride_qcb + h.to(tl.int64) * stride_qch, stride_qcs,
            QS + b.to(tl.int64) * stride_qsb + h.to(tl.int64) * stride_qsh, stride_qss,
            QM + b.to(tl.int64) * stride_qmb + h.to(tl.int64) * stride_qmh + pid * stride_qms,
            pid * Q_ROWS, Sq,
            KIND, Q_PER_TOKEN, 2 if SMOOTH_Q else 0, Q_ROWS, HEAD_DIM, HEAD_DIM_PAD, PACK=PACK_INT4,
        )
    if role == 1 and h < Hkv:
        if pid * K_ROWS < Sk and SELF_STATS and SMOOTH_K:
            k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            k_mean, _, _ = _split_stats(k_base, stride_ks, k_base, stride_ks, 0, Sk, offs_d, dmask,
                                        True, False, False, 64)
            if pid == 0:
                tl.store(KM + b.to(tl.int64) * stride_kmb + h.to(tl.int64) * stride_kmh + offs_d, k_mean, mask=dmask)
            _quantize_rows(
                k_base, stride_ks,
                KC + b.to(tl.int64) * stride_kcb + h.to(tl.int64) * stride_kch, stride_kcs,
                KS + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh, stride_kss,
                KM, pid * K_ROWS, Sk,
                KIND, K_PER_TOKEN, 3, K_ROWS, HEAD_DIM, HEAD_DIM_PAD, k_mean, PACK_INT4,
            )
        elif pid * K_ROWS < Sk and STATS and SMOOTH_K:
            k_mean = _reduce_partials(KM + b.to(tl.int64) * stride_kmb + h.to(tl.int64) * stride_kmh, n_chunks,
                                      tl.arange(0, HEAD_DIM_PAD), False, 16, HEAD_DIM) / Sk
            _quantize_rows(
                K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, stride_ks,
                KC + b.to(tl.int64) * stride_kcb + h.to(tl.int64) * stride_kch, stride_kcs,
                KS + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh, stride_kss,
                KM, pid * K_ROWS, Sk,
                KIND, K_PER_TOKEN, 3, K_ROWS, HEAD_DIM, HEAD_DIM_PAD, k_mean, PACK_INT4,
            )
        elif pid * K_ROWS < Sk:
            _quantize_rows(
                K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, stride_ks,
                KC + b.to(tl.int64) * stride_kcb + h.to(tl.int64) * stride_kch, stride_kcs,
                KS + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh, stride_kss,
                KM + b.to(tl.int64) * stride_kmb + h.to(tl.int64) * stride_kmh,
                pid * K_ROWS, Sk,
                KIND, K_PER_TOKEN, 1 if SMOOTH_K else 0, K_ROWS, HEAD_DIM, HEAD_DIM_PAD, PACK=PACK_INT4,
            )
    if role == 2 and h < Hkv and QUANT_V:
        if pid * V_ROWS < Sk and SELF_STATS:
            v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
            _, _, v_amax = _split_stats(v_base, stride_vs, v_base, stride_vs, 0, Sk, offs_d, dmask,
                                        False, False, True, 64)
            _quantize_v_block(
                v_base, stride_vs,
                VT + b.to(tl.int64) * stride_vtb + h.to(tl.int64) * stride_vth, stride_vtd,
                VS + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh + pid * stride_vss,
                VM, pid * V_ROWS, Sk,
                False, V_ROWS, HEAD_DIM, HEAD_DIM_PAD, amax_in=v_amax, AMAX_IN=True,
            )
        elif pid * V_ROWS < Sk:
            _quantize_v_block(
                V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, stride_vs,
                VT + b.to(tl.int64) * stride_vtb + h.to(tl.int64) * stride_vth, stride_vtd,
                VS + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh + pid * stride_vss,
                VM + b.to(tl.int64) * stride_vmb + h.to(tl.int64) * stride_vmh,
                pid * V_ROWS, Sk,
                SMOOTH_V, V_ROWS, HEAD_DIM, HEAD_DIM_PAD,
                VM + b.to(tl.int64) * stride_vmb + h.to(tl.int64) * stride_vmh, n_chunks, STATS, 16,
            )
