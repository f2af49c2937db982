"""Merge of split-key partial results (flash-decoding): one output row from S partial rows.

When a problem has few query tiles (a short query over many keys, one head of a short sequence),
``attn_fwd_kernel`` runs with ``SPLIT``: program (m, bh, s) attends over keys
``[s·split_keys, (s+1)·split_keys)`` only and writes its normalised partial output O_s (fp32) and
log-sum-exp L_s (natural log; -inf where the split saw no key). The full result is the softmax-
weighted mean of the partials:

    L = log Σ_s exp(L_s),    O = Σ_s exp(L_s - L) · O_s

computed here with the largest L_s subtracted first (no overflow); a row whose every split is
empty gets O = 0 and L = -inf, the kernels' convention for a fully masked row. NaN in a partial
(a NaN input) propagates to the row. A row that saw only ``finfo.min``-masked scores (a Hugging
Face padding row) has L_s = -FLT_MAX in every split, where fp32 keeps no log(l_s): with additive
masks the splits also write log(l_s) to a second plane, and such rows are weighed by it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..pdl import grid_dependency


@triton.jit
def split_merge_kernel(
    OPart, LsePart, Out, Lse,
    stride_pb, stride_ph, stride_ps, stride_pm,
    stride_ob, stride_oh, stride_om,
    Hq, Sq, n_splits,
    RETURN_LSE: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    ROWS: tl.constexpr, CLAMPED_PLANE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Grid (cdiv(Sq, ROWS), B·Hq): ROWS output rows per program (independent, unrolled, so their
    loads overlap; one row per program left most warps idle at 1024 rows × 8 splits).

    OPart (B, Hq, n_splits, Sq, D) fp32 with the given strides (channel stride 1); LsePart
    (B·Hq, n_splits, Sq) fp32 contiguous; Out a (B, Hq, Sq, D) view (channel stride 1) in the
    output dtype; Lse (B·Hq, Sq) fp32 contiguous when RETURN_LSE. ``CLAMPED_PLANE`` (additive
    masks): LsePart has a second plane (B·Hq, n_splits, Sq) of log(l) per split; a row whose every
    split has the lse -FLT_MAX (all its keys under a finfo.min mask) weighs the splits by it.
    ``USE_PDL``: programmatic dependent launch (``kernels.pdl``).
    """
    grid_dependency(USE_PDL)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    smask = offs_s < n_splits
    dmask = offs_d < HEAD_DIM
    for r in tl.static_range(ROWS):
        m = tl.program_id(0) * ROWS + r
        if m < Sq:
            lse = tl.load(LsePart + (bh.to(tl.int64) * n_splits + offs_s) * Sq + m, mask=smask, other=float("-inf"))
            top = tl.max(lse, axis=0)
            top_use = tl.where(top == float("-inf"), 0.0, top)  # every split empty: keep exp finite
            w = tl.exp(lse - top_use)  # 0 for empty splits
            if CLAMPED_PLANE:  # every split saw only finfo.min scores: weigh them by their key counts
                plane = tl.num_programs(1).to(tl.int64) * n_splits * Sq
                log_l = tl.load(LsePart + plane + (bh.to(tl.int64) * n_splits + offs_s) * Sq + m, mask=smask,
                                other=float("-inf"))
                log_l = tl.where(lse == float("-inf"), float("-inf"), log_l)
                top_l = tl.max(log_l, axis=0)
                w_counts = tl.exp(log_l - tl.where(top_l == float("-inf"), 0.0, top_l))
                w = tl.where(top < -3.0e38, w_counts, w)
            # empty splits wrote O = 0; a NaN lse (NaN input) gives a NaN weight and a NaN row, as SDPA's
            w = tl.where(lse != lse, float("nan"), w)
            total = tl.sum(w, axis=0)
            parts = tl.load(OPart + b * stride_pb + h * stride_ph + offs_s[:, None].to(tl.int64) * stride_ps
                            + m.to(tl.int64) * stride_pm + offs_d[None, :], mask=smask[:, None] & dmask[None, :],
                            other=0.0)
            has_keys = total != 0.0
            out = tl.sum(parts * w[:, None], axis=0) / tl.where(has_keys, total, 1.0)
            out = tl.where(has_keys, out, 0.0)
            tl.store(Out + b * stride_ob + h * stride_oh + m.to(tl.int64) * stride_om + offs_d,
                     out.to(Out.dtype.element_ty), mask=dmask)
            if RETURN_LSE:
                tl.store(Lse + bh.to(tl.int64) * Sq + m, tl.where(has_keys, top_use + tl.log(total), float("-inf")))
