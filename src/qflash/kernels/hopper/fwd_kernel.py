"""Hopper (sm_90a) attention forward in Gluon: FlashAttention-3's schedule for 8-bit operands.

One CTA owns ``2 * QM`` query rows of one (batch, head) and runs three partitions:

* a 1-warp **producer** (24 registers after ``setmaxnreg``): TMA loads of the two Q halves, then
  K and Vᵀ tiles into a ``STAGES``-deep shared-memory ring guarded by mbarriers;
* two 4-warp **consumers** (one warpgroup each, QM = 64 rows each): async ``wgmma`` for
  Q·Kᵀ (A from shared memory) and P·V (P from registers), online softmax with ``exp2``.

Two overlaps hide the softmax under the tensor cores:

* **ping-pong** between the consumers: a pair of mbarriers hands the "issue your GEMMs" turn
  back and forth, so one warpgroup's softmax runs while the other's MMAs run;
* **intra-warpgroup**: Q·Kᵀ of tile j and P·V of tile j-1 are issued together;
  ``warpgroup_mma_wait(1)`` returns with S_j while P_{j-1}·V still runs.

Numbers (the ``int8-fp8`` / ``fp8`` presets; ``qflash.reference.fake_quant_attention`` computes
the same function):

* Q is quantised per token inside the kernel (``_quantize_q_tile``: bf16/fp16 tile by TMA,
  codes written to shared memory for the wgmma), with ``qflash.quant.core``'s arithmetic;
* ``S = (q_codes · k_codesᵀ)`` exactly (INT8 → int32, FP8 → fp32), in log2 units
  ``s = S · c_row · k_scale[j]`` with ``c_row = q_scale[row] · softmax_scale · log2(e)``;
* ``P = exp2(s - m + log2(448))``: one FMA and one ``ex2`` per score, P lands in the e4m3
  range [0, 448] and is rounded to FP8 per tile (the running max m of that tile);
* V has one FP8 scale per channel over all keys, so P·V (FP8 × FP8 → fp32) accumulates in
  place across tiles (rescaled by exp2(m_old - m_new) each tile) and the scale is applied once;
* ``O = acc · v_scale / l`` (l sums the scaled P, so the 448 cancels),
  ``lse = (m + log2 l - log2 448) · ln 2``; causal rows with no visible key give O = 0, lse = -inf.

Operands (2-D views the TMA descriptors read; ``kernels/kv_quant.py`` writes K and Vᵀ):

==========  ==============================  =========  =====================================
operand     view                            dtype      block
==========  ==============================  =========  =====================================
q           HND (B·Hq·Sq, D) or NHD (B·Sq,  bf16/fp16  (QM, D)
            Hq·D): read in place
k codes     (B·Hkv·Sk, D)                   int8/f8    (BLOCK_N, D)
v codesᵀ    (B·Hkv·D, Sk_pad)               fp8 e4m3   (D, BLOCK_N); zero past Sk; keys of each
                                                       32-key chunk in the P-operand order when
                                                       V_PERMUTED (``_p_operand``)
k scale     (B·Hkv, Sk_pad / BLOCK_N) fp32             one per key tile
v scale     (B·Hkv, D) fp32                            one per channel
out         strided (b, h, s, d)            bf16/fp16  written with masked stores
lse         (B·Hq, Sq) fp32                            natural log, optional
==========  ==============================  =========  =====================================
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
import triton.language as tl  # PropagateNan (gluon re-uses triton.language's enum)
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2_FP8_MAX = gl.constexpr(8.807354922057604)  # log2(448): P is scaled into the e4m3 range
LN2 = gl.constexpr(0.6931471805599453)


@gluon.constexpr_function
def _mma_layout(n, bitwidth):
    """wgmma accumulator layout of one warpgroup for an (M, n) tile with `bitwidth`-bit operands."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 256 // bitwidth])


@gluon.jit
def _alloc_bars(n: gl.constexpr, count: gl.constexpr):
    bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(n):
        mbarrier.init(bars.index(i), count=count)
    return bars


# ------------------------------------------------------------------------------------------------
# producer: 1 warp, TMA only
# ------------------------------------------------------------------------------------------------
@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
              q_row, q_col, k_row, vt_row, n_iters):
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    QM: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_bufs.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + QM, q_col], q_bar, q_bufs.index(1))
    for i in range(n_iters):
        s = i % STAGES
        ph = (i // STAGES) & 1
        # an "empty" barrier starts with its previous phase complete: the first lap does not wait
        mbarrier.wait(k_empty.index(s), ph ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + i * BLOCK_N, 0], k_ready.index(s), k_bufs.index(s))
        mbarrier.wait(v_empty.index(s), ph ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [vt_row, i * BLOCK_N], v_ready.index(s), v_bufs.index(s))


# ------------------------------------------------------------------------------------------------
# consumer helpers
# ------------------------------------------------------------------------------------------------
@gluon.jit
def _wait_turn(turn_mine, j, FIRST: gl.constexpr):
    # consumer 0 issues first: its wait on a fresh barrier (parity 1) passes at once
    if FIRST:
        mbarrier.wait(turn_mine, (j & 1) ^ 1)
    else:
        mbarrier.wait(turn_mine, j & 1)


@gluon.jit
def _issue_qk(q_smem, k_bufs, s, s_layout: gl.constexpr, ACC_DTYPE: gl.constexpr):
    BM: gl.constexpr = q_smem.type.shape[0]
    BN: gl.constexpr = k_bufs.type.shape[1]
    return warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), gl.zeros([BM, BN], ACC_DTYPE, s_layout),
                         use_acc=False, is_async=True)


@gluon.jit
def _softmax_tile(qk, m_i, l_i, c_row, k_scale, n_left, diag, MASK_TAIL: gl.constexpr, CAUSAL: gl.constexpr,
                  INT_CVT: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax step for one score tile: (P scaled into the fp8 range, new m, new l, alpha).

    qk: [BM, BN] raw scores (int32 or fp32); c_row [BM] row multiplier; k_scale: this tile's K
    scale; n_left: keys left from this tile's first column (read when MASK_TAIL); diag: the
    causal bound of this tile's first row (key column c is visible to row r iff c <= r + diag;
    read when CAUSAL, which also makes rows with no visible key yet safe: m = -inf, p = 0).
    INT_CVT (int32 scores only): how they become fp32. 0: ``I2F``; 1: the magic-number add
    ``bits(qk + 0x4B400000) - 1.5·2^23`` (integer add + float add, exact for |qk| < 2^22);
    2: the same add with the ``- 1.5·2^23`` folded into the exp2 FMA's constant (one rounding of
    ``1.5·2^23·c`` per row and tile: at most one raw integer score unit, far below INT8 noise).
    """
    BM: gl.constexpr = qk.type.shape[0]
    BN: gl.constexpr = qk.type.shape[1]
    MAGIC: gl.constexpr = 12582912.0  # 1.5·2^23
    if qk.dtype == gl.int32 and INT_CVT > 0:
        x = (qk + 0x4B400000).to(gl.float32, bitcast=True)  # = MAGIC + qk, exactly
        if INT_CVT == 1:
            x = x - MAGIC
    else:
        x = qk.to(gl.float32)
    if MASK_TAIL:
        # keys past the end get -inf: a per-column bias (0 on every tile but the last), branch-free
        # because a runtime `if` yielding the whole tile made ptxas spill
        cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        x = x + gl.expand_dims(gl.where(cols < n_left, 0.0, float("-inf")), 0)
    if CAUSAL:
        cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        rows = gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
        visible = gl.expand_dims(cols, 0) <= gl.expand_dims(rows + diag, 1)
        x = gl.where(visible, x, float("-inf"))
    c = c_row * k_scale  # > 0, so max(x·c) = max(x)·c
    if qk.dtype == gl.int32 and INT_CVT == 2:
        m_new = gl.maximum(m_i, (gl.max(x, axis=1) - MAGIC) * c)  # the subtraction is exact
        bias = m_new - LOG2_FP8_MAX + MAGIC * c
    else:
        m_new = gl.maximum(m_i, gl.max(x, axis=1) * c)
        bias = m_new - LOG2_FP8_MAX
    if CAUSAL:  # a row that has seen no key yet: keep p = 0 and alpha finite
        bias = gl.where(m_new == float("-inf"), 0.0, bias)
        alpha = gl.where(m_new == float("-inf"), 1.0, gl.exp2(m_i - m_new))
    else:
        alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(gl.fma(x, gl.expand_dims(c, 1), -gl.expand_dims(bias, 1)))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_new, alpha


@gluon.jit
def _p_operand(p, p_layout: gl.constexpr, PERMUTED: gl.constexpr):
    """P (fp32, accumulator layout) as the FP8 A operand of the P·V wgmma.

    PERMUTED: the quantiser stored each 32-key chunk of Vᵀ in the order that makes the
    accumulator's registers *be* the operand's (key ``32a + 16h + 8i + 2q + e`` of S at operand
    position ``32a + 16h + 4q + 2i + e``), so the conversion is a relabelling, not a shuffle.
    """
    BM: gl.constexpr = p.type.shape[0]
    BN: gl.constexpr = p.type.shape[1]
    if PERMUTED:
        x = gl.reshape(p, [BM, BN // 32, 2, 2, 4, 2])
        x = gl.permute(x, [0, 1, 2, 4, 3, 5])
        x = gl.convert_layout(gl.reshape(x, [BM, BN]), p_layout)
        # four fp32 -> one register of four e4m3 bytes (element order = byte order): Triton's own
        # conversion unpacks every byte and packs them again (~200 extra ALU ops per tile)
        p8 = gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
            "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=gl.float8e4nv, is_pure=True, pack=4)
    else:
        p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
    return p8


@gluon.jit
def _release(bar):
    mbarrier.arrive(bar, count=1)


@gluon.jit
def _load_v_scale(vs_ptr, D: gl.constexpr, o_layout: gl.constexpr):
    return gl.load(vs_ptr + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout)))


@gluon.jit
def _rescale(acc, alpha, o_layout: gl.constexpr):
    return acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)


@gluon.jit
def _max_nan(a, b):
    return gl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@gluon.jit
def _quantize_q_tile(q_in, q_codes, row_layout: gl.constexpr):
    """Per-token symmetric codes of the staged Q tile (bf16/fp16 [QM, D] in shared memory) into
    ``q_codes`` (int8 or fp8 [QM, D] in shared memory); returns the scales [QM] in row_layout.

    The arithmetic is ``qflash.quant.core``'s: ``inv = qmax / amax`` (IEEE), round half to even
    (INT8) or round-to-nearest conversion (FP8), an all-zero row gets ``amax = 1``.
    """
    QM: gl.constexpr = q_in.type.shape[0]
    IS_INT: gl.constexpr = q_codes.dtype == gl.int8
    QMAX: gl.constexpr = 127.0 if IS_INT else 448.0
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    x = q_in.load(blocked).to(gl.float32)
    # NaN-propagating max (gl.max drops NaN): a NaN in a q row gives that row a NaN scale, so its
    # output is NaN as SDPA's would be; ``amax <= tiny`` (not ``amax > tiny``) keeps NaN as NaN
    amax = gl.reduce(gl.abs(x), 1, _max_nan)
    amax = gl.where(amax <= 1e-30, 1.0, amax)
    inv = gl.div_rn(gl.full([QM], QMAX, gl.float32, gl.SliceLayout(1, blocked)), amax)
    scale = gl.div_rn(amax, gl.full([QM], QMAX, gl.float32, gl.SliceLayout(1, blocked)))
    y = x * gl.expand_dims(inv, 1)
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0  # 1.5·2^23: round half to even for |y| < 2^22
        codes = gl.minimum(gl.maximum(y, -QMAX), QMAX).to(gl.int8)
    else:
        codes = gl.minimum(gl.maximum(y, -QMAX), QMAX).to(gl.float8e4nv)
    q_codes.store(codes)
    fence_async_shared()  # generic-proxy stores, read next by wgmma (async proxy)
    gl.thread_barrier()  # every warp of the warpgroup has written its rows
    return gl.convert_layout(scale, row_layout)


@gluon.jit
def _step(j, p, alpha, acc, m_i, l_i, c_row, q_codes, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty,
          turn_mine, turn_other, ks_ptr, Sk, diag0,
          FIRST: gl.constexpr, MASK_TAIL: gl.constexpr, MASKED: gl.constexpr, INT_CVT: gl.constexpr,
          V_PERMUTED: gl.constexpr):
    """Key tile j ≥ 1: issue Q·K_jᵀ and P_{j-1}·V_{j-1} together, softmax(S_j) while P·V runs.

    ``p`` is P_{j-1} in fp32 (accumulator layout) and ``acc`` is already rescaled to m_{j-1}.
    P becomes the FP8 operand here, next to the wgmma that reads it: carried across the loop as
    FP8 it cost a byte repack per step (~200 ALU ops); issued in the step after the one that
    made it, ptxas serialised every wgmma (C7512, the operand's registers crossed the back edge).
    """
    BN: gl.constexpr = k_bufs.type.shape[1]
    D: gl.constexpr = v_bufs.type.shape[1]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    ACC_DTYPE: gl.constexpr = gl.int32 if k_bufs.dtype == gl.int8 else gl.float32
    s_layout: gl.constexpr = _mma_layout(BN, 8)
    o_layout: gl.constexpr = _mma_layout(D, 8)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    s = j % STAGES
    sp = (j - 1) % STAGES
    p_op = _p_operand(p, p_layout, V_PERMUTED)
    mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
    mbarrier.wait(v_ready.index(sp), ((j - 1) // STAGES) & 1)
    _wait_turn(turn_mine, j, FIRST)
    # wgmma groups retire in order: Q·K_jᵀ first, so "1 outstanding" returns S_j with P·V running
    qk = _issue_qk(q_codes, k_bufs, s, s_layout, ACC_DTYPE)
    acc = warpgroup_mma(p_op, v_bufs.index(sp).permute((1, 0)), acc, is_async=True)
    _release(turn_other)
    k_scale = gl.load(ks_ptr + j)
    qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk, ))
    _release(k_empty.index(s))
    p, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, c_row, k_scale, Sk - j * BN, diag0 - j * BN, MASK_TAIL, MASKED,
                                       INT_CVT, s_layout)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    _release(v_empty.index(sp))
    acc = _rescale(acc, alpha, o_layout)
    return p, alpha, acc, m_i, l_i


@gluon.jit
def _consumer(q_in, q_codes, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty, turn_mine, turn_other,
              ks_ptr, vs_ptr, o_ptr, stride_om, lse_ptr, q_mult, rows_left, Sk, n_iters, n_unmasked, diag0,
              FIRST: gl.constexpr, HAS_LSE: gl.constexpr, MASK_TAIL: gl.constexpr, CAUSAL: gl.constexpr,
              INT_CVT: gl.constexpr, V_PERMUTED: gl.constexpr):
    """One warpgroup's rows. Tiles [1, n_unmasked) need no causal mask, [n_unmasked, n_iters)
    do (diag0: the causal bound of this warpgroup's first row at key 0)."""
    BM: gl.constexpr = q_in.type.shape[0]
    D: gl.constexpr = q_in.type.shape[1]
    BN: gl.constexpr = k_bufs.type.shape[1]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    ACC_DTYPE: gl.constexpr = gl.int32 if k_bufs.dtype == gl.int8 else gl.float32
    s_layout: gl.constexpr = _mma_layout(BN, 8)
    o_layout: gl.constexpr = _mma_layout(D, 8)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    mbarrier.wait(q_bar, 0)
    c_row = _quantize_q_tile(q_in, q_codes, row_layout) * q_mult
    m_i = gl.full([BM], float("-inf"), gl.float32, row_layout)
    l_i = gl.full([BM], 0.0, gl.float32, row_layout)
    acc = gl.zeros([BM, D], gl.float32, o_layout)

    # S_0 and its softmax
    mbarrier.wait(k_ready.index(0), 0)
    _wait_turn(turn_mine, 0, FIRST)
    qk = _issue_qk(q_codes, k_bufs, 0, s_layout, ACC_DTYPE)
    _release(turn_other)
    k_scale = gl.load(ks_ptr)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
    _release(k_empty.index(0))
    p, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, c_row, k_scale, Sk, diag0, MASK_TAIL, CAUSAL, INT_CVT, s_layout)
    for j in range(1, n_unmasked):
        p, alpha, acc, m_i, l_i = _step(j, p, alpha, acc, m_i, l_i, c_row, q_codes, k_bufs, v_bufs, k_ready, k_empty,
                                        v_ready, v_empty, turn_mine, turn_other, ks_ptr, Sk, diag0, FIRST, MASK_TAIL,
                                        False, INT_CVT, V_PERMUTED)
    if CAUSAL:  # the diagonal tiles
        for j in range(gl.maximum(n_unmasked, 1), n_iters):
            p, alpha, acc, m_i, l_i = _step(j, p, alpha, acc, m_i, l_i, c_row, q_codes, k_bufs, v_bufs, k_ready,
                                            k_empty, v_ready, v_empty, turn_mine, turn_other, ks_ptr, Sk, diag0, FIRST,
                                            MASK_TAIL, True, INT_CVT, V_PERMUTED)
    # P_{n-1}·V_{n-1}
    sl = (n_iters - 1) % STAGES
    p_op = _p_operand(p, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4), V_PERMUTED)
    mbarrier.wait(v_ready.index(sl), ((n_iters - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_bufs.index(sl).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    _release(v_empty.index(sl))

    # epilogue: O = acc · v_scale / l (masked stores: the tile may pass the end of the sequence);
    # a row with no visible key (causal, Sq > Sk) gets O = 0 and lse = -inf, as the reference
    v_scale = _load_v_scale(vs_ptr, D, o_layout)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    if CAUSAL:
        l_o = gl.where(l_o > 0.0, l_o, float("inf"))
    out = acc * gl.expand_dims(v_scale, 0) / gl.expand_dims(l_o, 1)
    orows = gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
    ocols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = o_ptr + gl.expand_dims(orows.to(gl.int64) * stride_om, 1) + gl.expand_dims(ocols, 0)
    gl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(orows < rows_left, 1))
    if HAS_LSE:
        rows = gl.arange(0, BM, layout=row_layout)
        lse = (m_i + gl.log2(l_i) - LOG2_FP8_MAX) * LN2
        if CAUSAL:
            lse = gl.where(l_i > 0.0, lse, float("-inf"))
        gl.store(lse_ptr + rows, lse, mask=rows < rows_left)


# ------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------
@gluon.jit
def attn_fwd_fa3_kernel(
    q_desc, k_desc, v_desc,
    KScale, VScale, Out, Lse,
    stride_ob, stride_oh, stride_om,
    q_rows_b, q_rows_h, q_col_h,  # Q tile origin in q_desc's 2-D view: row b·q_rows_b + h·q_rows_h + m, col h·q_col_h
    q_mult,  # softmax_scale · log2(e)
    Hq, Hkv, Sq, Sk, n_kblocks, causal_off,
    STAGES: gl.constexpr, HAS_LSE: gl.constexpr, MASK_TAIL: gl.constexpr, CAUSAL: gl.constexpr,
    INT_CVT: gl.constexpr, V_PERMUTED: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    """Grid (cdiv(Sq, 2·QM), B·Hq). See the module docstring for operands and numbers.

    CAUSAL: key c is visible to query row r iff c <= r + causal_off (0: top-left as SDPA's
    is_causal; Sk - Sq: bottom-right as FlashAttention's); query blocks run last-first (they
    have the most keys), and only the diagonal tiles pay for the mask.
    """
    QM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    bhk = b * Hkv + h // (Hq // Hkv)
    m0 = pid_m * (2 * QM)
    q_row = b * q_rows_b + h * q_rows_h + m0
    q_col = h * q_col_h
    k_row = bhk * Sk
    vt_row = bhk * D
    n_iters = gl.cdiv(Sk, BN)
    n_unmasked = n_iters
    if CAUSAL:
        # tiles wholly visible to the first row of the block need no mask; past the last row's
        # bound none is needed at all (at least one tile runs: its mask then empties the rows)
        n_unmasked = gl.minimum(gl.maximum((m0 + causal_off + 1) // BN, 0), n_iters)
        n_iters = gl.maximum(gl.minimum(gl.cdiv(m0 + 2 * QM + causal_off, BN), n_iters), 1)

    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, QM, D], q_desc.layout)  # bf16/fp16 input tiles
    code_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([QM, D], k_desc.dtype)
    q_codes = gl.allocate_shared_memory(k_desc.dtype, [2, QM, D], code_layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, D, BN], v_desc.layout)
    q_bar = _alloc_bars(1, 1)
    k_ready = _alloc_bars(STAGES, 1)
    k_empty = _alloc_bars(STAGES, 2)  # both consumers release each stage
    v_ready = _alloc_bars(STAGES, 1)
    v_empty = _alloc_bars(STAGES, 2)
    turn = _alloc_bars(2, 1)
    fence_async_shared()

    ks_ptr = KScale + bhk.to(gl.int64) * n_kblocks
    vs_ptr = VScale + bhk.to(gl.int64) * D
    o_ptr = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + m0.to(gl.int64) * stride_om
    lse_ptr = Lse + bh.to(gl.int64) * Sq + m0
    rows_left = Sq - m0
    # NB (Triton 3.6): partition argument tuples must be written inline (a tuple bound to a name
    # turns its constexprs into runtime values), and a partition function cannot be chosen
    # through a constexpr variable.
    gl.warp_specialize([
        (_consumer, (q_bufs.index(0), q_codes.index(0), k_bufs, v_bufs, q_bar.index(0), k_ready, k_empty, v_ready,
                     v_empty, turn.index(0), turn.index(1), ks_ptr, vs_ptr, o_ptr, stride_om, lse_ptr, q_mult,
                     rows_left, Sk, n_iters, n_unmasked, m0 + causal_off, True, HAS_LSE, MASK_TAIL, CAUSAL,
                     INT_CVT, V_PERMUTED)),
        (_consumer, (q_bufs.index(1), q_codes.index(1), k_bufs, v_bufs, q_bar.index(0), k_ready, k_empty, v_ready,
                     v_empty, turn.index(1), turn.index(0), ks_ptr, vs_ptr, o_ptr + QM * stride_om, stride_om,
                     lse_ptr + QM, q_mult, rows_left - QM, Sk, n_iters, n_unmasked, m0 + QM + causal_off, False,
                     HAS_LSE, MASK_TAIL, CAUSAL, INT_CVT, V_PERMUTED)),
        (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar.index(0), k_ready, k_empty, v_ready,
                     v_empty, q_row, q_col, k_row, vt_row, n_iters)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
