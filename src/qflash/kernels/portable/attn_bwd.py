"""Flash-attention backward (FlashAttention-2 style): one kernel family, variants are constexprs.

Three launches, no atomics, deterministic:

1. ``bwd_preprocess_kernel`` — grid (cdiv(Sq, BLOCK_M), B * Hq). Per query row:
   ``delta = rowsum(dO ⊙ O) - dlse`` (fp32) and ``lse2 = lse * log2(e)`` with ``-inf`` (a row
   with no visible key) turned into ``+inf`` so that ``exp2(s - lse2)`` is exactly 0 there and
   never NaN. Optionally writes INT8 codes of dO with one scale per row (low-bit option).
2. ``bwd_dkdv_kernel`` — grid (cdiv(Sk, BLOCK_N), B * Hkv). A program owns one key block of
   one key/value head, keeps dK and dV for it in fp32 registers, and loops over the query heads
   of its GQA group and over their query blocks: it recomputes ``Pᵀ = exp2(K·Qᵀ·c - lse2)``
   and accumulates ``dV += Pᵀ·dO``, ``dPᵀ = V·dOᵀ``, ``dSᵀ = Pᵀ ⊙ (dPᵀ - delta)``,
   ``dK += dSᵀ·Q``. Summing the group inside the program is GQA/MQA's dK/dV reduction.
3. ``bwd_dq_kernel`` — grid (cdiv(Sq, BLOCK_M), B * Hq). A program owns one query block and
   loops over key blocks: ``dQ += dS·K``. Optionally writes dS (fp32) for the gradient of a
   floating-point (additive) mask.

Scores are in log2 units: ``s2 = (q·kᵀ) * c + mask * log2(e)`` with ``c = scale * log2(e)``
(a finfo.min mask clamped as in the forward: ``quantize.scaled_additive_mask``, ``_lse2_split``),
so ``P = exp2(s2 - lse2)``; dQ and dK are multiplied by ``scale`` once at the end, and the
``log2(e)`` factors cancel (dS is the gradient w.r.t. the natural-unit score).

``grad_lse`` (when the forward's lse output is used) folds into delta: d lse_i / d s_ij = P_ij,
so ``dS = P ⊙ (dP - delta) + P ⊙ dlse = P ⊙ (dP - (delta - dlse))``.

Masking: with ``IS_CAUSAL`` query i sees key j iff ``j <= i + causal_off`` (bottom-right
alignment: ``causal_off = Sk - Sq``; top-left, PyTorch's: 0; ``kernels.common.causal_offset``); bool (keep) / additive masks are read by strides (stride 0 on broadcast
dims). Tiles that need no causal or bounds masking run without compares: each kernel splits its
loop into a masked and an unmasked range like the forward.

Low-bit option (constexpr flags; SageBwd's recipe, dO·Vᵀ always stays in the input dtype):

- ``QK_INT8``: the score recompute Q·Kᵀ uses INT8 codes of Q and of the smoothed K - mean_k
  (mean over tokens) with one fp32 scale per token: ``s = (qc·kcᵀ) * sq_i * sk_j * c + rb_i``
  where ``rb_i = c * q_i·mean_k`` restores the row term smoothing removed (SageAttention's K
  smoothing: channel offsets of K no longer eat the INT8 range). Both kernels.
- ``PDO_INT8``: ``dV += Pᵀ·dO`` in INT8: dO has per-token codes/scales; the dO scale is folded into
  Pᵀ's columns and ``Pᵀ ⊙ sdo`` is quantised per key row on the fly (the row is outside the
  reduction over queries, so its scale factors out of the dot).
- ``DS_INT8``: ``dK += dSᵀ·Q`` and ``dQ += dS·K`` in INT8: Q's (K's) per-token scale is folded into
  dSᵀ (dS) and the product is quantised per output row on the fly. The K codes are smoothed, so
  dQ adds ``dlse ⊗ mean_k`` (dS·K = dS·(K - mean_k) + rowsum(dS) ⊗ mean_k and rowsum(dS) = dlse). With DS_INT8 and QK_INT8, Q and
  K are only ever read as INT8 codes (half the bytes of bf16 for the backward's saved Q and K).

Codes buffers (written by the launcher's quantiser and the preprocess kernel) are contiguous:
codes (B, H, S, D) int8, scales (B, H, S) fp32. Every other tensor is read by strides with a
contiguous channel dim.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common import CMASK_ADD, CMASK_BOOL, CMASK_NONE
from .quantize import quant_codes, scaled_additive_mask


@triton.jit
def _load_rows(base, offs_r, stride_r, R, offs_d, D: tl.constexpr, DPAD: tl.constexpr, CHECK_R: tl.constexpr):
    """Tile [len(offs_r), DPAD] of a row-major (rows stride_r apart, channels contiguous) tensor;
    rows >= R (when CHECK_R) and channels >= D read as 0."""
    ptrs = base + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :]
    if CHECK_R:
        x = tl.load(ptrs, mask=(offs_r < R)[:, None] & (offs_d < D)[None, :], other=0)
    elif D != DPAD:
        x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _lse2_split(lse2, offs_m, Sk, causal_off, IS_CAUSAL: tl.constexpr):
    """(hi, lo) with ``P = exp2((s - hi) - lo)`` (additive masks only).

    A row masked entirely with finfo.min has s = -FLT_MAX on every visible key (the forward clamps
    the scaled mask there, ``scaled_additive_mask``) and lse2 = -inf or ~-FLT_MAX: lse swamps
    log2(n) in fp32, so exp2(s - lse2) would be 1 (or inf) per key. Its softmax is uniform over its
    n visible keys: hi = -FLT_MAX, lo = log2(n) gives P = 1/n, SDPA's gradient of that row.
    """
    floor = lse2 < -3.0e38
    if IS_CAUSAL:
        n = tl.minimum(tl.maximum(offs_m + causal_off + 1, 1), Sk)
    else:
        n = tl.full(offs_m.shape, 1, tl.int32) * Sk
    hi = tl.where(floor, -3.4028234663852886e38, lse2)
    lo = tl.where(floor, tl.math.log2(n.to(tl.float32)), 0.0)
    return hi, lo


@triton.jit
def _load_vec(base, offs, R, other, CHECK: tl.constexpr):
    if CHECK:
        x = tl.load(base + offs, mask=offs < R, other=other)
    else:
        x = tl.load(base + offs)
    return x


# ------------------------------------------------------------------------------------------------
# 1. preprocess: delta, lse2, dO codes
# ------------------------------------------------------------------------------------------------


@triton.jit
def bwd_preprocess_kernel(
    O, DO, DLse, Lse, Delta, Lse2, DOC, DOS,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    Hq, Sq,
    HAS_DLSE: tl.constexpr, QUANT_DO: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq).

    O, DO: (B, Hq, Sq, Dv) by strides. DLse, Lse: fp32 (B, Hq, Sq) contiguous.
    Writes Delta, Lse2: fp32 (B, Hq, Sq) contiguous; with QUANT_DO, DOC int8 (B, Hq, Sq, Dv) and
    DOS fp32 (B, Hq, Sq), both contiguous (dO ≈ DOC * DOS per row).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_V_PAD)
    mrow = offs_m < Sq
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_om, Sq, offs_d,
                   HEAD_DIM_V, HEAD_DIM_V_PAD, True).to(tl.float32)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, Sq, offs_d,
                    HEAD_DIM_V, HEAD_DIM_V_PAD, True).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    row = bh * Sq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=mrow, other=0.0)
    tl.store(Delta + row, delta, mask=mrow)
    lse = tl.load(Lse + row, mask=mrow, other=0.0)
    # a row that sees no key has lse = -inf: +inf makes every P of that row exactly 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(Lse2 + row, lse2, mask=mrow)
    if QUANT_DO:
        codes, scale = quant_codes(do, 1, True)
        c_ptrs = DOC + row[:, None] * HEAD_DIM_V + offs_d[None, :]
        tl.store(c_ptrs, codes, mask=mrow[:, None] & (offs_d < HEAD_DIM_V)[None, :])
        tl.store(DOS + row, scale, mask=mrow)


@triton.jit
def rowquant_int8_kernel(
    X, C, S, Mean, RB, stride_xb, stride_xh, stride_xs, H, L, GROUP, rb_mult,
    SUB_MEAN: tl.constexpr, ROW_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK), B * H). X (B, H, L, D) by strides -> C int8 (B, H, L, D) and
    S fp32 (B, H, L), contiguous, ``X[row] (- mean) ≈ C[row] * S[row]`` (symmetric, per token).

    Mean: fp32 (B, H // GROUP, D) contiguous, read for head ``h // GROUP``. SUB_MEAN quantises
    ``X - mean`` (K smoothing); ROW_BIAS writes RB fp32 (B, H, L) = ``rb_mult * X[row]·mean``
    (the per-query score term that smoothing K removed, restored in the kernels).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    x = _load_rows(X + (bh // H) * stride_xb + (bh % H) * stride_xh, offs, stride_xs, L, offs_d,
                   HEAD_DIM, HEAD_DIM_PAD, True).to(tl.float32)
    row = bh * L + offs
    if SUB_MEAN or ROW_BIAS:
        mean = tl.load(Mean + (bh // GROUP) * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    if ROW_BIAS:
        tl.store(RB + row, tl.sum(x * mean[None, :], axis=1) * rb_mult, mask=offs < L)
    if SUB_MEAN:
        x = tl.where((offs < L)[:, None], x - mean[None, :], 0.0)
    codes, scale = quant_codes(x, 1, True)
    tl.store(C + row[:, None] * HEAD_DIM + offs_d[None, :], codes,
             mask=(offs < L)[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(S + row, scale, mask=offs < L)


# ------------------------------------------------------------------------------------------------
# 2. dK, dV: one key block per program, loop over the group's query heads and query blocks
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_tiles(
    dk, dv, k, kc, ks_mult, v,
    q_base, stride_qm, qc_base, qs_base, rb_base,
    do_base, stride_dom, doc_base, dos_base,
    lse2_base, delta_base,
    mask_base, stride_mm, stride_mn,
    offs_n, offs_d, offs_dv, lo, hi, Sq, Sk, causal_off, qk_mult,
    QK_INT8: tl.constexpr, PDO_INT8: tl.constexpr, DS_INT8: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, CAUSAL_MASKED: tl.constexpr, CHECK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV [BLOCK_N, D(v)_PAD] over query blocks [lo, hi) of one query head.

    k [BLOCK_N, HEAD_DIM_PAD] (input dtype; unused when QK_INT8 and DS_INT8), kc its INT8 codes,
    ks_mult [BLOCK_N] = k scale * c (QK_INT8), v [BLOCK_N, HEAD_DIM_V_PAD].
    Transposed tiles throughout: rows are keys, columns are queries.
    """
    NEED_Q_FLOAT: tl.constexpr = not (QK_INT8 and DS_INT8)
    NEED_Q_CODES: tl.constexpr = QK_INT8 or DS_INT8
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if NEED_Q_FLOAT:
            q = _load_rows(q_base, offs_m, stride_qm, Sq, offs_d, HEAD_DIM, HEAD_DIM_PAD, CHECK_M)
        if NEED_Q_CODES:
            qc = _load_rows(qc_base, offs_m, HEAD_DIM, Sq, offs_d, HEAD_DIM, HEAD_DIM_PAD, CHECK_M)
            qs = _load_vec(qs_base, offs_m, Sq, 0.0, CHECK_M)
        if QK_INT8:
            rb = _load_vec(rb_base, offs_m, Sq, 0.0, CHECK_M)
        lse2 = _load_vec(lse2_base, offs_m, Sq, float("inf"), CHECK_M)  # out-of-range rows: P = 0
        delta = _load_vec(delta_base, offs_m, Sq, 0.0, CHECK_M)
        # sT [BLOCK_N, BLOCK_M]: scores in log2 units
        if QK_INT8:
            sT = tl.dot(kc, tl.trans(qc)).to(tl.float32) * ks_mult[:, None] * qs[None, :] + rb[None, :]
        else:
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_mult
        if MASK_KIND != CMASK_NONE:
            mptr = mask_base + offs_m[None, :].to(tl.int64) * stride_mm + offs_n[:, None].to(tl.int64) * stride_mn
            mmask = (offs_m < Sq)[None, :] & (offs_n < Sk)[:, None]
            if MASK_KIND == CMASK_BOOL:
                sT = tl.where(tl.load(mptr, mask=mmask, other=0) != 0, sT, float("-inf"))
            else:
                sT += scaled_additive_mask(tl.load(mptr, mask=mmask, other=0.0).to(tl.float32))
        if CAUSAL_MASKED:
            sT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, sT, float("-inf"))
        if MASK_KIND == CMASK_ADD:
            lse2_hi, lse2_lo = _lse2_split(lse2, offs_m, Sk, causal_off, IS_CAUSAL)
            pT = tl.math.exp2((sT - lse2_hi[None, :]) - lse2_lo[None, :])
        else:
            pT = tl.math.exp2(sT - lse2[None, :])
        do = _load_rows(do_base, offs_m, stride_dom, Sq, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, CHECK_M)
        # dV += Pᵀ·dO
        if PDO_INT8:
            doc = _load_rows(doc_base, offs_m, HEAD_DIM_V, Sq, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, CHECK_M)
            dos = _load_vec(dos_base, offs_m, Sq, 0.0, CHECK_M)
            pc, ps = quant_codes(pT * dos[None, :], 1, True)
            dv += tl.dot(pc, doc).to(tl.float32) * ps[:, None]
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # dPᵀ = V·dOᵀ (always in the input dtype), dSᵀ = Pᵀ ⊙ (dPᵀ - delta)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        # dK += dSᵀ·Q (times scale at the end)
        if DS_INT8:
            dc, dss = quant_codes(dsT * qs[None, :], 1, True)
            dk += tl.dot(dc, qc).to(tl.float32) * dss[:, None]
        else:
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, DO, QC, QS, KC, KS, RB, DOC, DOS, Lse2, Delta, Mask, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    Hq, Hkv, GQA_GROUP, Sq, Sk, causal_off, qk_mult, sm_scale,
    QK_INT8: tl.constexpr, PDO_INT8: tl.constexpr, DS_INT8: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(Sk, BLOCK_N), B * Hkv). Writes DK (B, Hkv, Sk, D), DV (B, Hkv, Sk, Dv) by strides.

    Q, DO (B, Hq, Sq, ·), K, V (B, Hkv, Sk, ·) by strides (channel dim contiguous); Lse2, Delta
    fp32 (B, Hq, Sq) contiguous; Mask broadcast to (B, Hq, Sq, Sk) by strides (dummy when
    MASK_KIND == 0); codes/scales as in the module docstring (dummies when unused).
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    NEED_K_FLOAT: tl.constexpr = not (QK_INT8 and DS_INT8)

    if NEED_K_FLOAT:
        k = _load_rows(K + b * stride_kb + hk * stride_kh, offs_n, stride_kn, Sk, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    else:
        k = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.int8)  # unused
    if QK_INT8:
        kc = _load_rows(KC + bhk * Sk * HEAD_DIM, offs_n, HEAD_DIM, Sk, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
        ks_mult = tl.load(KS + bhk * Sk + offs_n, mask=offs_n < Sk, other=0.0) * qk_mult
    else:
        kc = k
        ks_mult = tl.zeros([BLOCK_N], tl.float32)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, offs_n, stride_vn, Sk, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V_PAD], tl.float32)

    # query range: [m_lo, m_full) needs the causal mask, [m_full, m_even) none, [m_even, Sq) row bounds
    m_even = (Sq // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        m_lo = (tl.maximum(start_n - causal_off, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.maximum(m_full, m_lo), tl.cdiv(Sq, BLOCK_M) * BLOCK_M)
    else:
        m_lo = 0
        m_full = 0
    m_tail = tl.maximum(m_full, m_even)

    for g in range(GQA_GROUP):
        h = hk * GQA_GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        qc_base = QC + bh * Sq * HEAD_DIM
        doc_base = DOC + bh * Sq * HEAD_DIM_V
        qs_base = QS + bh * Sq
        rb_base = RB + bh * Sq
        dos_base = DOS + bh * Sq
        lse2_base = Lse2 + bh * Sq
        delta_base = Delta + bh * Sq
        mask_base = Mask + b * stride_mb + h * stride_mh
        if IS_CAUSAL:
            dk, dv = _dkdv_tiles(
                dk, dv, k, kc, ks_mult, v, q_base, stride_qm, qc_base, qs_base, rb_base, do_base, stride_dom, doc_base,
                dos_base, lse2_base, delta_base, mask_base, stride_mm, stride_mn,
                offs_n, offs_d, offs_dv, m_lo, m_full, Sq, Sk, causal_off, qk_mult,
                QK_INT8, PDO_INT8, DS_INT8, MASK_KIND, IS_CAUSAL, True, True,
                HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION,
            )
        dk, dv = _dkdv_tiles(
            dk, dv, k, kc, ks_mult, v, q_base, stride_qm, qc_base, qs_base, rb_base, do_base, stride_dom, doc_base,
            dos_base, lse2_base, delta_base, mask_base, stride_mm, stride_mn,
            offs_n, offs_d, offs_dv, m_full, m_even, Sq, Sk, causal_off, qk_mult,
            QK_INT8, PDO_INT8, DS_INT8, MASK_KIND, IS_CAUSAL, False, False,
            HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, kc, ks_mult, v, q_base, stride_qm, qc_base, qs_base, rb_base, do_base, stride_dom, doc_base,
            dos_base, lse2_base, delta_base, mask_base, stride_mm, stride_mn,
            offs_n, offs_d, offs_dv, m_tail, Sq, Sq, Sk, causal_off, qk_mult,
            QK_INT8, PDO_INT8, DS_INT8, MASK_KIND, IS_CAUSAL, False, True,
            HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )

    nmask = (offs_n < Sk)[:, None]
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=nmask & (offs_d < HEAD_DIM)[None, :])
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=nmask & (offs_dv < HEAD_DIM_V)[None, :])


# ------------------------------------------------------------------------------------------------
# 3. dQ: one query block per program, loop over key blocks
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dq_tiles(
    dq, q, qc, qs_mult, rb, do, lse2, delta,
    k_base, stride_kn, kc_base, ks_base, v_base, stride_vn,
    mask_base, stride_mm, stride_mn, ds_base,
    offs_m, offs_d, offs_dv, lo, hi, Sq, Sk, causal_off, qk_mult,
    QK_INT8: tl.constexpr, DS_INT8: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, WRITE_DS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ [BLOCK_M, HEAD_DIM_PAD] over key blocks [lo, hi); MASKED: key bounds + causal."""
    NEED_K_FLOAT: tl.constexpr = not (QK_INT8 and DS_INT8)
    NEED_K_CODES: tl.constexpr = QK_INT8 or DS_INT8
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if NEED_K_FLOAT:
            k = _load_rows(k_base, offs_n, stride_kn, Sk, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
        if NEED_K_CODES:
            kc = _load_rows(kc_base, offs_n, HEAD_DIM, Sk, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
            ks = _load_vec(ks_base, offs_n, Sk, 0.0, MASKED)
        v = _load_rows(v_base, offs_n, stride_vn, Sk, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, MASKED)
        if QK_INT8:
            s = tl.dot(qc, tl.trans(kc)).to(tl.float32) * qs_mult[:, None] * ks[None, :] + rb[:, None]
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_mult
        if MASK_KIND != CMASK_NONE:
            mptr = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
            mmask = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
            if MASK_KIND == CMASK_BOOL:
                s = tl.where(tl.load(mptr, mask=mmask, other=0) != 0, s, float("-inf"))
            else:
                s += scaled_additive_mask(tl.load(mptr, mask=mmask, other=0.0).to(tl.float32))
        if MASKED:
            valid = (offs_n < Sk)[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(valid, s, float("-inf"))
        if MASK_KIND == CMASK_ADD:
            lse2_hi, lse2_lo = _lse2_split(lse2, offs_m, Sk, causal_off, IS_CAUSAL)
            p = tl.math.exp2((s - lse2_hi[:, None]) - lse2_lo[:, None])
        else:
            p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if WRITE_DS:
            ds_ptrs = ds_base + offs_m[:, None].to(tl.int64) * Sk + offs_n[None, :]
            tl.store(ds_ptrs, ds, mask=(offs_m < Sq)[:, None] & (offs_n < Sk)[None, :])
        if DS_INT8:
            dc, dss = quant_codes(ds * ks[None, :], 1, True)
            dq += tl.dot(dc, kc).to(tl.float32) * dss[:, None]
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def bwd_dq_kernel(
    Q, K, V, DO, QC, QS, KC, KS, KM, RB, DLse, Lse2, Delta, Mask, DQ, DS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dqb, stride_dqh, stride_dqm,
    Hq, GQA_GROUP, Sq, Sk, causal_off, qk_mult, sm_scale,
    QK_INT8: tl.constexpr, DS_INT8: tl.constexpr, HAS_DLSE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, WRITE_DS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq). Writes DQ (B, Hq, Sq, D) by strides; with WRITE_DS also
    DS fp32 (B, Hq, Sq, Sk) contiguous (dS = gradient of the natural-unit scores)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // GQA_GROUP
    bhk = b * (Hq // GQA_GROUP) + hk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    NEED_Q_FLOAT: tl.constexpr = not (QK_INT8 and DS_INT8)

    if NEED_Q_FLOAT:
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, Sq, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    else:
        q = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.int8)  # unused
    if QK_INT8:
        qc = _load_rows(QC + bh * Sq * HEAD_DIM, offs_m, HEAD_DIM, Sq, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
        qs_mult = tl.load(QS + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0) * qk_mult
        rb = tl.load(RB + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    else:
        qc = q
        qs_mult = tl.zeros([BLOCK_M], tl.float32)
        rb = qs_mult
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, Sq, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True)
    lse2 = tl.load(Lse2 + bh * Sq + offs_m, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(Delta + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # key range: [0, hi), of which [0, full_end) needs no bounds or causal masking
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(Sk, start_m + BLOCK_M + causal_off), 0)
        full_end = tl.minimum((tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N) * BLOCK_N, (Sk // BLOCK_N) * BLOCK_N)
    else:
        hi = Sk
        full_end = (Sk // BLOCK_N) * BLOCK_N
    full_end = tl.minimum(full_end, hi)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kc_base = KC + bhk * Sk * HEAD_DIM
    ks_base = KS + bhk * Sk
    mask_base = Mask + b * stride_mb + h * stride_mh
    ds_base = DS + bh * Sq * Sk
    dq = _dq_tiles(
        dq, q, qc, qs_mult, rb, do, lse2, delta, k_base, stride_kn, kc_base, ks_base, v_base, stride_vn,
        mask_base, stride_mm, stride_mn, ds_base, offs_m, offs_d, offs_dv, 0, full_end, Sq, Sk, causal_off, qk_mult,
        QK_INT8, DS_INT8, MASK_KIND, IS_CAUSAL, False, WRITE_DS,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    dq = _dq_tiles(
        dq, q, qc, qs_mult, rb, do, lse2, delta, k_base, stride_kn, kc_base, ks_base, v_base, stride_vn,
        mask_base, stride_mm, stride_mn, ds_base, offs_m, offs_d, offs_dv, full_end, hi, Sq, Sk, causal_off, qk_mult,
        QK_INT8, DS_INT8, MASK_KIND, IS_CAUSAL, True, WRITE_DS,
        HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    if DS_INT8 and HAS_DLSE:
        # K codes are of the smoothed K - mean_k: dS·K = dS·(K - mean_k) + rowsum(dS) ⊗ mean_k, and
        # rowsum(dS) = dlse exactly (rows of P sum to 1, delta = rowsum(P ⊙ dP)); using dlse rather
        # than the computed rowsum keeps P's quantisation error from being amplified by mean_k
        dlse = tl.load(DLse + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
        km = tl.load(KM + bhk * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        dq += dlse[:, None] * km[None, :]
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :])
