"""Flash-attention forward over quantised operands: one kernel family, variants are constexprs.

Per program: one block of BLOCK_M query rows of one (batch, query head). Scores are computed
in the log2 domain: ``s = (q_codes · k_codesᵀ) * q_scale * k_scale * sm_scale * log2(e)`` — the
softmax scale, log2(e) and the Q dequant scale are folded into one per-row multiplier — then an
online softmax with ``exp2``. P·V runs in the input dtype, or in FP8 e4m3 with P scaled by 448
and each tile's product flushed into the fp32 accumulator with its per-channel V scale (Hopper's
FP8 MMA accumulator keeps ~22 bits; one tile's partial sum stays well inside that).

With ``FUSED_QUANT`` (small problems, one launch instead of three) the kernel reads the bf16/fp16
inputs and quantises each Q, K and V tile itself with the fused quantiser's arithmetic
(``quantize.quant_codes``), computing the K/V token statistics in a first pass over the keys
(in the split-key mode, over the split's keys: see ``reference.fake_quant_attention``'s
``stat_block``). Its FP8 P·V multiplies the FP8-rounded P and V as bf16 (the same products).

Key tiles are visited in two passes: tiles that need no masking (inside Sk and below the causal
diagonal) run without any compare/select; the remaining tiles apply bounds, causal and mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common import CMASK_ADD, CMASK_BOOL, CMASK_NONE, CQK_FLOAT, CQK_INT4, CQK_INT8
from ..pdl import grid_dependency
from .quantize import _split_stats, fp8_channel_codes, guard_amax, quant_codes, scaled_additive_mask


@triton.jit
def _load_k_tile(k_base, offs_n, offs_d, stride_kn, Sk, KIND: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDED: tl.constexpr):
    """K tile as MMA operand [BLOCK_N, HEAD_DIM_PAD]; packed INT4 is unpacked to int8 here."""
    rows = offs_n[:, None].to(tl.int64) * stride_kn
    if KIND == CQK_INT4:
        offs_p = tl.arange(0, HEAD_DIM_PAD // 2)
        pmask = (offs_p < HEAD_DIM // 2)[None, :]
        if BOUNDED:
            pmask = pmask & (offs_n < Sk)[:, None]
        packed = tl.load(k_base + rows + offs_p[None, :], mask=pmask, other=0).to(tl.int8, bitcast=True)
        lo = (packed << 4) >> 4  # arithmetic shifts sign-extend each nibble
        hi = packed >> 4
        k = tl.reshape(tl.join(lo, hi), [BLOCK_N, HEAD_DIM_PAD])
    elif HEAD_DIM == HEAD_DIM_PAD and not BOUNDED:
        k = tl.load(k_base + rows + offs_d[None, :])
    else:
        mask = (offs_d < HEAD_DIM)[None, :]
        if BOUNDED:
            mask = mask & (offs_n < Sk)[:, None]
        k = tl.load(k_base + rows + offs_d[None, :], mask=mask, other=0.0)
    return k  # one return: Triton checks every return's type, even in pruned branches


@triton.jit
def _raw_tile(base, stride_n, start, end, Sk, offs_d, dmask, BLOCK_N: tl.constexpr):
    """Rows [start, start + BLOCK_N) of a (S, D) K or V slice in its own dtype, zeros past Sk;
    nothing is read when ``start >= end`` (the tile after a loop's last)."""
    offs = start + tl.arange(0, BLOCK_N)
    mask = ((offs < Sk) & (start < end))[:, None] & dmask[None, :]
    return tl.load(base + offs[:, None].to(tl.int64) * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _pv_fp8_tile(acc, alpha, p, v_base, stride_vn, vs_base, stride_vsb, v_desc, v_row0, offs_d, start_n,
                 V_SCALE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc·α + (P·V)·v_scale`` for one key tile of FP8 Vᵀ codes (keys contiguous, channels
    ``stride_vn`` apart, zero-padded to whole V blocks, so no key bounds); the tile's product
    starts from a fresh accumulator (see the module doc)."""
    dmask = offs_d < HEAD_DIM
    if USE_TMA:
        v = tl.trans(v_desc.load([v_row0, start_n]))
    else:
        v_ptrs = v_base + offs_d[None, :].to(tl.int64) * stride_vn + (start_n + tl.arange(0, BLOCK_N))[:, None]
        if HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
    v_scale = tl.load(vs_base + (start_n // V_SCALE_BLOCK) * stride_vsb + offs_d, mask=dmask, other=0.0)
    return acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v) * v_scale[None, :]


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, d_i, q, q_mult,
    k_base, stride_kn, ks_base, stride_ks,
    v_base, stride_vn, vs_base, stride_vsb,
    mask_base, stride_mm, stride_mn,
    bias_base,
    offs_m, offs_d, lo, hi, Sq, Sk, causal_off,
    k_mean, v_mean, v_amax, q_mean, qk_mult,
    k_desc, v_desc, k_row0, v_row0,
    KIND: tl.constexpr, K_SCALE_BLOCK: tl.constexpr, PV_FP8: tl.constexpr, V_SCALE_BLOCK: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    FUSED_QUANT: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr, USE_TMA: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi); MASKED applies bounds and causal masks.

    Scores stay in "raw" units x (the integer dot as an exact fp32, or the float dot) with
    ``s = x * c`` in log2 units; ``c`` is the row multiplier times the tile's K scale. Without bias
    or additive mask, ``P = exp2(fma(x, c, -m) - d)``: the running max m is the rounded
    ``max(x)·c`` and d (per row, ``_row_residual``) the exact excess of the largest product over it,
    so the largest P is exactly 1 (448 for FP8 P·V) at any logit size. Without d, P reaches
    2^(ulp(m)/2): beyond fp16 at |logits| ~1e8 (fp16 |q|, |k| ~1e4), and the FP8 scale of 448 is
    lost from logits ~1e6 on (m - log2 448 rounds).
    """
    dmask = offs_d < HEAD_DIM
    if PV_FP8:
        P_LOG2_SCALE: tl.constexpr = 8.807354922057604  # log2(448): P lands in [0, 448], the e4m3 range
    else:
        P_LOG2_SCALE: tl.constexpr = 0.0
    K_SCALAR: tl.constexpr = (K_SCALE_BLOCK % BLOCK_N) == 0
    FMA_FORM: tl.constexpr = (not HAS_BIAS) and MASK_KIND != CMASK_ADD
    if FUSED_QUANT:  # raw K/V tiles one ahead: the next tile's loads fly while this one computes
        k_next = _raw_tile(k_base, stride_kn, lo, hi, Sk, offs_d, dmask, BLOCK_N)
        v_next = _raw_tile(v_base, stride_vn, lo, hi, Sk, offs_d, dmask, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if FUSED_QUANT:
            k_raw = k_next
            v_raw = v_next
            k_next = _raw_tile(k_base, stride_kn, start_n + BLOCK_N, hi, Sk, offs_d, dmask, BLOCK_N)
            v_next = _raw_tile(v_base, stride_vn, start_n + BLOCK_N, hi, Sk, offs_d, dmask, BLOCK_N)
            kf = k_raw.to(tl.float32)
            if SMOOTH_K:
                kf = tl.where((offs_n < Sk)[:, None], kf - k_mean[None, :], 0.0)
            k, k_scale_f = quant_codes(kf, KIND, not K_SCALAR)
        elif USE_TMA and not MASKED:
            k = k_desc.load([k_row0 + start_n, 0])
        else:
            k = _load_k_tile(k_base, offs_n, offs_d, stride_kn, Sk, KIND, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, MASKED)
        if KIND == CQK_FLOAT:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            qk = tl.dot(q, tl.trans(k))
        if KIND == CQK_INT8 or KIND == CQK_INT4:
            # int32 -> fp32 on the full-rate ALUs: reinterpreting qk + 0x4B400000 gives qk + 1.5 * 2**23
            # exactly (|qk| < 2**22); subtracting it back is exact too. (Folding the subtraction into the
            # exp2 FMA would cancel catastrophically when the scales are large.)
            x = (qk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            x = qk
        if KIND == CQK_FLOAT:
            c = q_mult
        elif K_SCALAR:
            if FUSED_QUANT:
                c = q_mult * k_scale_f
            else:
                c = q_mult * tl.load(ks_base + (start_n // K_SCALE_BLOCK) * stride_ks)
        else:
            if FUSED_QUANT:
                k_scale = k_scale_f
            elif MASKED:
                k_scale = tl.load(ks_base + offs_n * stride_ks, mask=offs_n < Sk, other=0.0)
            else:
                k_scale = tl.load(ks_base + offs_n * stride_ks)
            x = x * k_scale[None, :]
            c = q_mult
        if not FMA_FORM:
            x = x * c[:, None]  # from here on x is s, in log2 units
            if HAS_BIAS and FUSED_QUANT:
                x += (tl.sum(kf * q_mean[None, :], axis=1) * qk_mult)[None, :]
            elif HAS_BIAS:
                if MASKED:
                    x += tl.load(bias_base + offs_n, mask=offs_n < Sk, other=0.0)[None, :]
                else:
                    x += tl.load(bias_base + offs_n)[None, :]
            if MASK_KIND == CMASK_ADD:
                mptr = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
                mmask = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
                x += scaled_additive_mask(tl.load(mptr, mask=mmask, other=0.0).to(tl.float32))
        if MASK_KIND == CMASK_BOOL:
            mptr = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
            mmask = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
            keep = tl.load(mptr, mask=mmask, other=0) != 0
            x = tl.where(keep, x, float("-inf"))
        if MASKED:
            valid = (offs_n < Sk)[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            x = tl.where(valid, x, float("-inf"))
        if FMA_FORM:
            x_max = tl.max(x, axis=1)
            # a row with no visible key so far keeps m = -inf even with a NaN multiplier (-inf·NaN)
            m_new = tl.maximum(m_i, tl.where(x_max == float("-inf"), float("-inf"), x_max * c))
        else:
            m_new = tl.maximum(m_i, tl.max(x, axis=1))
        if MASKED or MASK_KIND != CMASK_NONE:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep exp2 finite
        else:
            m_use = m_new
        if FMA_FORM:
            d_new = _row_residual(x_max, c, m_i, m_new, m_use, d_i)
            p = tl.math.exp2(tl.math.fma(x, c[:, None], -m_use[:, None]) + (P_LOG2_SCALE - d_new)[:, None])
            if MASKED or MASK_KIND == CMASK_BOOL:
                # a NaN row multiplier (a NaN in that q row) must not reach the keys it does not see:
                # -inf · NaN is NaN, and a row that sees no key is zeros whatever its q holds
                p = tl.where(x == float("-inf"), 0.0, p)
        else:
            d_new = d_i  # x is already s, rounded: the max's x - m is exactly 0
            if PV_FP8:
                p = tl.math.exp2((x - m_use[:, None]) + P_LOG2_SCALE)  # m - log2(448) would round at huge m
            else:
                p = tl.math.exp2(x - m_use[:, None])
        alpha = tl.math.exp2((m_i - m_use) + (d_i - d_new))
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PV_FP8:
            # V is stored transposed and zero-padded to whole V blocks: no bounds needed.
            # Each tile's product starts from zero (fresh FP8 accumulator) and is flushed into the
            # fp32 accumulator with the tile's per-channel V scale.
            if FUSED_QUANT:
                vf = v_raw.to(tl.float32)
                if SMOOTH_V:
                    vf = tl.where((offs_n < Sk)[:, None], vf - v_mean[None, :], 0.0)
                if V_SCALE_BLOCK == 0:  # one scale per channel over all keys (v_amax, from a pre-pass)
                    v = tl.clamp(vf * tl.math.div_rn(tl.full(v_amax.shape, 448.0, tl.float32), v_amax)[None, :],
                                 -448.0, 448.0).to(tl.float8e4nv)
                    v_scale = tl.math.div_rn(v_amax, tl.full(v_amax.shape, 448.0, tl.float32))
                else:
                    v, v_scale = fp8_channel_codes(vf)  # V_SCALE_BLOCK == BLOCK_N: the tile is the block
                # P and V rounded to FP8, multiplied as bf16 (every e4m3 value is a bf16, so each
                # product is the FP8 one, summed in fp32): V stays in the key-major layout it was
                # loaded in, where the FP8 MMA needs it transposed through shared memory
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv).to(tl.bfloat16),
                                                    v.to(tl.bfloat16)) * v_scale[None, :]
            else:
                acc = _pv_fp8_tile(acc, alpha, p, v_base, stride_vn, vs_base, stride_vsb, v_desc, v_row0, offs_d,
                                   start_n, V_SCALE_BLOCK, USE_TMA, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
        elif FUSED_QUANT:
            acc = tl.dot(p.to(v_raw.dtype), v_raw, acc * alpha[:, None], input_precision=DOT_PRECISION)
        else:
            v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
            if MASKED or HEAD_DIM != HEAD_DIM_PAD:
                vmask = dmask[None, :]
                if MASKED:
                    vmask = vmask & (offs_n < Sk)[:, None]
                v = tl.load(v_ptrs, mask=vmask, other=0.0)
            else:
                v = tl.load(v_ptrs)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        d_i = d_new
    return acc, l_i, m_i, d_i


@triton.jit
def _row_residual(x_max, c, m_i, m_new, m_use, d_i):
    """The running residual d: ``max(x·c) - m`` exactly (one FMA per row), kept across tiles.

    m is the rounded max; where a tile raises it, d restarts from that tile's residual; where it
    does not, d keeps the larger of the old one and this tile's (a tie after rounding).
    """
    r = tl.math.fma(x_max, c, -m_use)
    r = tl.where(x_max == float("-inf"), float("-inf"), r)  # a fully masked tile: no residual
    return tl.where(m_new > m_i, r, tl.maximum(d_i, r))


@triton.jit
def _qk_tile(q, k_base, stride_kn, ks_base, stride_ks, k_desc, k_row0, offs_d, start_n, Sk,
             KIND: tl.constexpr, K_SCALE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr,
             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """Raw scores of one full key tile (int32 for integer kinds) and the tile's K scale."""
    if USE_TMA:
        k = k_desc.load([k_row0 + start_n, 0])
    else:
        k = _load_k_tile(k_base, start_n + tl.arange(0, BLOCK_N), offs_d, stride_kn, Sk, KIND, HEAD_DIM,
                         HEAD_DIM_PAD, BLOCK_N, False)
    if KIND == CQK_FLOAT:
        k_scale = 1.0
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        k_scale = tl.load(ks_base + (start_n // K_SCALE_BLOCK) * stride_ks)
        qk = tl.dot(q, tl.trans(k))
    return qk, k_scale


@triton.jit
def _exp_scores(x, c, m_i, d_i, P_LOG2_SCALE: tl.constexpr):
    """New running max and residual, and ``exp2(fma(x, c, -m) - d + P_LOG2_SCALE)`` (see _attn_tiles)."""
    x_max = tl.max(x, axis=1)
    m_new = tl.maximum(m_i, x_max * c)
    d_new = _row_residual(x_max, c, m_i, m_new, m_new, d_i)
    return m_new, d_new, tl.math.exp2(tl.math.fma(x, c[:, None], -m_new[:, None]) + (P_LOG2_SCALE - d_new)[:, None])


@triton.jit
def _softmax_pv(acc, l_i, m_i, d_i, qk, c, start_n,
                v_base, stride_vn, vs_base, stride_vsb, v_desc, v_row0, offs_d,
                KIND: tl.constexpr, PV_FP8: tl.constexpr, V_SCALE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One unmasked tile's online-softmax update and P·V (the FMA form of ``_attn_tiles``)."""
    if PV_FP8:
        P_LOG2_SCALE: tl.constexpr = 8.807354922057604
    else:
        P_LOG2_SCALE: tl.constexpr = 0.0
    if KIND == CQK_INT8 or KIND == CQK_INT4:
        xi = (qk + 0x4B400000).to(tl.float32, bitcast=True)  # qk + 1.5·2²³, exact (see _attn_tiles)
        m_new, d_new, p = _exp_scores(xi - 12582912.0, c, m_i, d_i, P_LOG2_SCALE)
    else:
        m_new, d_new, p = _exp_scores(qk, c, m_i, d_i, P_LOG2_SCALE)
    alpha = tl.math.exp2((m_i - m_new) + (d_i - d_new))
    l_i = l_i * alpha + tl.sum(p, axis=1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    dmask = offs_d < HEAD_DIM
    if PV_FP8:
        acc = _pv_fp8_tile(acc, alpha, p, v_base, stride_vn, vs_base, stride_vsb, v_desc, v_row0, offs_d,
                           start_n, V_SCALE_BLOCK, USE_TMA, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    else:
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
        if HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=dmask[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new, d_new


@triton.jit
def _attn_tiles_rotated(
    acc, l_i, m_i, d_i, q, q_mult,
    k_base, stride_kn, ks_base, stride_ks,
    v_base, stride_vn, vs_base, stride_vsb,
    k_desc, v_desc, k_row0, v_row0, offs_d, lo, hi, Sk,
    KIND: tl.constexpr, K_SCALE_BLOCK: tl.constexpr, PV_FP8: tl.constexpr, V_SCALE_BLOCK: tl.constexpr,
    USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The unmasked pass of ``_attn_tiles`` (no mask, no bias, scalar K scale per tile) with the
    loop rotated: tile j+1's Q·Kᵀ is issued before tile j's softmax, so the asynchronous MMA can
    run under the exp2 work. Needs ``lo < hi`` (whole tiles)."""
    qk, ks = _qk_tile(q, k_base, stride_kn, ks_base, stride_ks, k_desc, k_row0, offs_d, lo, Sk,
                      KIND, K_SCALE_BLOCK, USE_TMA, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, DOT_PRECISION)
    for start_n in range(lo, hi - BLOCK_N, BLOCK_N):
        qk_next, ks_next = _qk_tile(q, k_base, stride_kn, ks_base, stride_ks, k_desc, k_row0, offs_d,
                                    start_n + BLOCK_N, Sk, KIND, K_SCALE_BLOCK, USE_TMA, HEAD_DIM, HEAD_DIM_PAD,
                                    BLOCK_N, DOT_PRECISION)
        acc, l_i, m_i, d_i = _softmax_pv(acc, l_i, m_i, d_i, qk, q_mult * ks, start_n,
                                    v_base, stride_vn, vs_base, stride_vsb, v_desc, v_row0, offs_d,
                                    KIND, PV_FP8, V_SCALE_BLOCK, USE_TMA, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N,
                                    DOT_PRECISION)
        qk = qk_next
        ks = ks_next
    acc, l_i, m_i, d_i = _softmax_pv(acc, l_i, m_i, d_i, qk, q_mult * ks, hi - BLOCK_N,
                                v_base, stride_vn, vs_base, stride_vsb, v_desc, v_row0, offs_d,
                                KIND, PV_FP8, V_SCALE_BLOCK, USE_TMA, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N,
                                DOT_PRECISION)
    return acc, l_i, m_i, d_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, QS, KS, VS, Mask, Bias, VMean, LseCorr, Out, Lse, KDesc, VDesc,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_qsb, stride_qsh, stride_qss,
    stride_ksb, stride_ksh, stride_kss,
    stride_vsb, stride_vsh, stride_vss,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bblk,
    stride_vmb, stride_vmh,
    stride_ob, stride_oh, stride_om,
    Hq, GQA_GROUP, Sq, Sk, causal_off, qk_mult, split_keys, stride_os,
    KIND: tl.constexpr, Q_SCALE_BLOCK: tl.constexpr, K_SCALE_BLOCK: tl.constexpr,
    PV_FP8: tl.constexpr, V_SCALE_BLOCK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_BLOCK: tl.constexpr,
    SMOOTH_V: tl.constexpr, RETURN_LSE: tl.constexpr, HAS_LSE_CORR: tl.constexpr,
    FUSED_QUANT: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_Q: tl.constexpr,
    USE_TMA: tl.constexpr, ROTATE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq). Strides are in elements; every pointer offset is int64.

    The channel dim of Q, K, V and Out is contiguous (stride 1, so loads vectorise); for FP8 P·V,
    V holds Vᵀ codes (B, Hkv, D, Sk_pad) and ``stride_vn`` is the stride between channels.
    ``USE_TMA``: K codes and Vᵀ codes are read through the tensor descriptors KDesc
    ((B·Hkv·Sk, D) rows, block [BLOCK_N, D]) and VDesc ((B·Hkv·D, Sk_pad), block [D, BLOCK_N]).
    ``ROTATE``: in the unmasked pass, the next tile's Q·Kᵀ is issued before this tile's softmax.
    ``IS_CAUSAL``: query i sees key j iff ``j <= i + causal_off`` (``Sk - Sq`` bottom-right, 0
    top-left; ``kernels.common.causal_offset``).
    ``DOT_PRECISION``: ``input_precision`` of the float dots (Q·Kᵀ for KIND 0, P·V outside FP8),
    "ieee" for fp32 inputs (``launch.FP32_DOT_PRECISION``). It must be explicit: Triton 3.6 takes a
    missing one from ``knobs.language.fp32_default``, not from the ``default_dot_input_precision``
    launch option.
    ``USE_PDL``: programmatic dependent launch (``kernels.pdl``; nothing global is touched before it).
    """
    grid_dependency(USE_PDL)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GQA_GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mrow = offs_m < Sq
    dmask = offs_d < HEAD_DIM

    # Q tile [BLOCK_M, HEAD_DIM_PAD] and the per-row score multiplier (scales folded together)
    q_base = Q + b * stride_qb + h * stride_qh
    q_rows = offs_m[:, None].to(tl.int64) * stride_qm
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k_mean = tl.zeros([HEAD_DIM_PAD], tl.float32)
    v_mean = tl.zeros([HEAD_DIM_PAD], tl.float32)
    v_amax = tl.full([HEAD_DIM_PAD], 1.0, tl.float32)
    q_mean = tl.zeros([HEAD_DIM_PAD], tl.float32)
    lse_corr = tl.zeros([BLOCK_M], tl.float32)
    # the keys the one-launch mode takes its statistics (K/V means, V's channel max) over: all of
    # them, or in the split-key mode this split's block of keys, those the causal diagonal hides
    # from this query tile included (so every query tile uses the same statistics). A split's own
    # K mean shifts its scores by q·mean per row; its lse gets that back (HAS_LSE_CORR) before
    # the merge weighs the splits.
    stat_lo = 0
    stat_hi = Sk
    if SPLIT:
        stat_lo = tl.program_id(2) * split_keys
        stat_hi = tl.minimum(Sk, stat_lo + split_keys)
    if FUSED_QUANT:
        V_AMAX: tl.constexpr = PV_FP8 and V_SCALE_BLOCK == 0
        k_mean, v_mean, v_amax = _split_stats(k_base, stride_kn, v_base, stride_vn, stat_lo, stat_hi, offs_d, dmask,
                                              SMOOTH_K, SMOOTH_V, V_AMAX, BLOCK_N)
        if V_AMAX:
            v_amax = guard_amax(v_amax)  # quant.core: an all-zero group gets amax = 1, NaN stays NaN
        xq = tl.load(q_base + q_rows + offs_d[None, :], mask=mrow[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if HAS_LSE_CORR:  # K smoothing's lse term, q·k_mean per row: now, so xq dies here
            lse_corr = tl.sum(xq * k_mean[None, :], axis=1) * (qk_mult * 0.6931471805599453)
        xs = xq
        if SMOOTH_Q:  # BLOCK_M is the Q-mean block here
            q_mean = tl.sum(xq, axis=0) / tl.minimum(Sq - start_m, BLOCK_M).to(tl.float32)
            xs = tl.where(mrow[:, None], xq - q_mean[None, :], 0.0)
        q, q_scale = quant_codes(xs, KIND, Q_SCALE_BLOCK == 1)
    elif KIND == CQK_INT4:
        offs_p = tl.arange(0, HEAD_DIM_PAD // 2)
        packed = tl.load(q_base + q_rows + offs_p[None, :],
                         mask=mrow[:, None] & (offs_p < HEAD_DIM // 2)[None, :], other=0).to(tl.int8, bitcast=True)
        q = tl.reshape(tl.join((packed << 4) >> 4, packed >> 4), [BLOCK_M, HEAD_DIM_PAD])
    else:
        q = tl.load(q_base + q_rows + offs_d[None, :], mask=mrow[:, None] & dmask[None, :], other=0.0)
    if KIND == CQK_FLOAT:
        q_mult = tl.full([BLOCK_M], qk_mult, tl.float32)
    elif FUSED_QUANT:
        q_mult = q_scale * qk_mult
    else:
        q_scale = tl.load(QS + b * stride_qsb + h * stride_qsh + (offs_m // Q_SCALE_BLOCK) * stride_qss,
                          mask=mrow, other=0.0)
        q_mult = q_scale * qk_mult

    ks_base = KS + b * stride_ksb + hk * stride_ksh
    vs_base = VS + b * stride_vsb + hk * stride_vsh
    mask_base = Mask + b * stride_mb + h * stride_mh
    bias_base = Bias + b * stride_bb + h * stride_bh + (start_m // BIAS_BLOCK) * stride_bblk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    d_i = tl.zeros([BLOCK_M], tl.float32)  # the max's exact excess over m (see _attn_tiles)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # key range: [0, hi), of which [0, full_end) needs no bounds or causal masking
    if IS_CAUSAL:
        hi = tl.minimum(Sk, start_m + BLOCK_M + causal_off)
        hi = tl.maximum(hi, 0)
        full_end = tl.minimum((tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N, (Sk // BLOCK_N) * BLOCK_N)
    else:
        hi = Sk
        full_end = (Sk // BLOCK_N) * BLOCK_N
    full_end = tl.minimum(full_end, hi)
    lo = 0
    if SPLIT:  # this program covers keys [lo, lo + split_keys) only; a merge kernel combines the splits
        lo = tl.program_id(2) * split_keys
        hi = tl.minimum(hi, lo + split_keys)
        full_end = tl.maximum(tl.minimum(full_end, hi), lo)
    k_row0 = ((b * (Hq // GQA_GROUP) + hk) * Sk).to(tl.int32)
    v_row0 = ((b * (Hq // GQA_GROUP) + hk) * HEAD_DIM).to(tl.int32)
    if ROTATE:
        if full_end > lo:
            acc, l_i, m_i, d_i = _attn_tiles_rotated(
                acc, l_i, m_i, d_i, q, q_mult,
                k_base, stride_kn, ks_base, stride_kss,
                v_base, stride_vn, vs_base, stride_vss,
                k_desc=KDesc, v_desc=VDesc, k_row0=k_row0, v_row0=v_row0,
                offs_d=offs_d, lo=lo, hi=full_end, Sk=Sk,
                KIND=KIND, K_SCALE_BLOCK=K_SCALE_BLOCK, PV_FP8=PV_FP8, V_SCALE_BLOCK=V_SCALE_BLOCK,
                USE_TMA=USE_TMA, HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, BLOCK_N=BLOCK_N,
                DOT_PRECISION=DOT_PRECISION,
            )
    else:
        acc, l_i, m_i, d_i = _attn_tiles(
            acc, l_i, m_i, d_i, q, q_mult,
            k_base, stride_kn, ks_base, stride_kss,
            v_base, stride_vn, vs_base, stride_vss,
            mask_base, stride_mm, stride_mn, bias_base,
            offs_m, offs_d, lo, full_end, Sq, Sk, causal_off,
            k_mean, v_mean, v_amax, q_mean, qk_mult,
            KDesc, VDesc, k_row0, v_row0,
            KIND, K_SCALE_BLOCK, PV_FP8, V_SCALE_BLOCK, MASK_KIND, HAS_BIAS, False, IS_CAUSAL,
            FUSED_QUANT, SMOOTH_K, SMOOTH_V, USE_TMA,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )
    acc, l_i, m_i, d_i = _attn_tiles(
        acc, l_i, m_i, d_i, q, q_mult,
        k_base, stride_kn, ks_base, stride_kss,
        v_base, stride_vn, vs_base, stride_vss,
        mask_base, stride_mm, stride_mn, bias_base,
        offs_m, offs_d, full_end, hi, Sq, Sk, causal_off,
        k_mean, v_mean, v_amax, q_mean, qk_mult,
        KDesc, VDesc, k_row0, v_row0,
        KIND, K_SCALE_BLOCK, PV_FP8, V_SCALE_BLOCK, MASK_KIND, HAS_BIAS, True, IS_CAUSAL,
        FUSED_QUANT, SMOOTH_K, SMOOTH_V, USE_TMA,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )

    # l = 0 exactly iff no key was visible; a NaN l (NaN input) counts as "has keys" and stays NaN
    has_keys = l_i != 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    if SMOOTH_V and not FUSED_QUANT:
        v_mean = tl.load(VMean + b * stride_vmb + hk * stride_vmh + offs_d, mask=dmask, other=0.0)
    if SMOOTH_V:
        out = tl.where(has_keys[:, None], out + v_mean[None, :], 0.0)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    lse_row = bh.to(tl.int64) * Sq
    if SPLIT:  # partial results: (B, Hq, splits, Sq, D) fp32 and lse (B·Hq, splits, Sq)
        o_ptrs += tl.program_id(2).to(tl.int64) * stride_os
        lse_row = (bh.to(tl.int64) * tl.num_programs(2) + tl.program_id(2)) * Sq
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mrow[:, None] & dmask[None, :])
    if RETURN_LSE:
        log2_l = tl.math.log2(tl.where(has_keys, l_i, 1.0)) + d_i
        if PV_FP8:
            log2_l -= 8.807354922057604  # l summed P scaled by 448
        lse = tl.where(has_keys, (m_i + log2_l) * 0.6931471805599453, float("-inf"))
        if MASK_KIND == CMASK_ADD:
            # a row under a finfo.min mask (m clamped at -FLT_MAX, see scaled_additive_mask): its lse is
            # finfo.min + log(n) = -FLT_MAX in fp32, not m·ln 2 (the backward recognises it)
            lse = tl.where(m_i < -3.0e38, -3.4028234663852886e38, lse)
        # (the K-smoothing correction only where a key was seen: -inf + NaN (a NaN q row) would be NaN)
        if HAS_LSE_CORR and FUSED_QUANT:
            lse += tl.where(has_keys, lse_corr, 0.0)
        elif HAS_LSE_CORR:
            lse += tl.where(has_keys, tl.load(LseCorr + bh.to(tl.int64) * Sq + offs_m, mask=mrow, other=0.0), 0.0)
        tl.store(Lse + lse_row + offs_m, lse, mask=mrow)
        if SPLIT and MASK_KIND == CMASK_ADD:
            # a row whose keys all sit under a finfo.min mask has the lse -FLT_MAX in every split,
            # where log(l) (its key count) is lost: a second plane of Lse keeps log(l) for the merge,
            # which weighs such splits by it (SDPA gives the mean of V over all of the row's keys)
            plane = tl.num_programs(1).to(tl.int64) * tl.num_programs(2) * Sq
            tl.store(Lse + plane + lse_row + offs_m, tl.log(tl.where(has_keys, l_i, 1.0)), mask=mrow)
