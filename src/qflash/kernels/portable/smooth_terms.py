"""The score terms that smoothing takes out and the forward adds back, one Triton launch each.

Q smoothing (``int4``) quantises ``q - mean_q(block)``; the scores miss, per query block and key,

    bias[b, h, i, j] = qk_mult · q_mean[b, h, i, :] · (k[b, h // group, j, :] - k_mean[b, h // group, :])

(``q_bias``). K smoothing quantises ``k - k_mean``, which shifts every score of a query row by the
same q · k_mean: softmax does not see it, but the returned log-sum-exp does (``lse_correction``,
natural-log units):

    lse_corr[b, h, s] = scale · q[b, h, s, :] · k_mean[b, h // group, :]

==========  ===================================  =========  =====================================
tensor      shape                                dtype      notes
==========  ===================================  =========  =====================================
q, k        (B, Hq, Sq, D), (B, Hkv, Sk, D)      fp16/bf16/fp32  any strides, channel stride 1
k mean      (B, Hkv, n_chunks, D)                fp32       K sums per chunk (divided by ``div``)
                                                            or the mean itself (n_chunks 1, div 1)
q mean      (B, Hq, n_q_blocks, D)               fp32       channel stride 1
bias        (B, Hq, n_q_blocks, Sk)              fp32       key stride 1
lse_corr    (B, Hq, Sq)                          fp32       contiguous
==========  ===================================  =========  =====================================

They replace torch ops (``k.float() - k_mean``, a GQA repeat, a GEMM / a matmul) so that the call
can be recorded and replayed as a plan. The K mean is reduced from the statistics launch's partials
exactly as the quantiser reduces it (``kv_quant._reduce_partials``), so these terms and the K codes
see the same mean. fp32 throughout; the dots over channels are ``tl.sum``s (their order differs
from a GEMM's in the last bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import next_pow2
from ..fastlaunch import FastLauncher
from ..kv_quant import MAX_CHUNKS, _reduce_partials
from ..pdl import grid_dependency, pdl_enabled


@triton.jit
def q_bias_kernel(
    K, KM, QM, OUT,
    stride_kb, stride_kh, stride_ks,
    stride_kmb, stride_kmh,
    stride_qmb, stride_qmh, stride_qms,
    stride_ob, stride_oh, stride_os,
    Hq, group, Sk, n_chunks, div, qk_mult, n_qb,
    HAS_MEAN: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Grid (cdiv(Sk, BLOCK_N), B·Hq): BLOCK_N keys' bias for every query block of one head. The
    K tile (minus the K mean) is loaded and the mean reduced once, then reused for each of the
    ``n_qb`` query blocks (a program per (tile, query block) reloaded both: 300 µs at 1x24x4096x128
    on an H200, session 11)."""
    grid_dependency(USE_PDL)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    nmask = offs_n < Sk
    dmask = offs_d < HEAD_DIM
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if HAS_MEAN:
        k_mean = _reduce_partials(KM + b.to(tl.int64) * stride_kmb + hk.to(tl.int64) * stride_kmh, n_chunks,
                                  offs_d, False, CHUNKS, HEAD_DIM) / div
        k = k - k_mean[None, :]
    # pointers advance per query block (64-bit pointer arithmetic: n_qb · Sk may pass 2^31)
    qm_ptr = QM + b.to(tl.int64) * stride_qmb + h.to(tl.int64) * stride_qmh + offs_d
    out_ptr = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_n
    qm = tl.load(qm_ptr, mask=dmask, other=0.0)
    for qb in range(n_qb):
        # the next block's mean in flight while this one's dot reduces
        qm_ptr += stride_qms
        qm_next = tl.load(qm_ptr, mask=dmask & (qb + 1 < n_qb), other=0.0)
        # padded channels: q_mean is 0 there, so (k - k_mean) · 0 adds nothing
        bias = tl.sum(k * qm[None, :], axis=1) * qk_mult
        tl.store(out_ptr, bias, mask=nmask)
        out_ptr += stride_os
        qm = qm_next


@triton.jit
def lse_correction_kernel(
    Q, KM, OUT,
    stride_qb, stride_qh, stride_qs,
    stride_kmb, stride_kmh,
    Hq, group, Sq, n_chunks, div, scale,
    CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), B·Hq): BLOCK_M queries' q · k_mean · scale of one head."""
    grid_dependency(USE_PDL)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mmask = offs_m < Sq
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=mmask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    k_mean = _reduce_partials(KM + b.to(tl.int64) * stride_kmb + (h // group).to(tl.int64) * stride_kmh, n_chunks,
                              offs_d, False, CHUNKS, HEAD_DIM) / div
    tl.store(OUT + bh.to(tl.int64) * Sq + offs_m, tl.sum(q * k_mean[None, :], axis=1) * scale, mask=mmask)


_Q_BIAS = FastLauncher(q_bias_kernel, n_pointers=4)
_LSE_CORR = FastLauncher(lse_correction_kernel, n_pointers=3)


def _k_mean_operand(k_mean, k_partials, sk: int, unused: torch.Tensor):
    """(pointer, n_chunks, divisor, (batch, head) strides) of the K mean for the kernels above:
    the statistics' partial sums, the mean itself, or nothing (n_chunks 0, ``unused`` as pointer)."""
    if k_partials is not None:
        if k_partials.shape[2] > MAX_CHUNKS or not k_partials.is_contiguous():
            raise ValueError(f"k_partials: expected contiguous (B, Hkv, n <= {MAX_CHUNKS}, D) sums, "
                             f"got shape {tuple(k_partials.shape)}")
        return k_partials, k_partials.shape[2], float(sk), (k_partials.stride(0), k_partials.stride(1))
    if k_mean is not None:
        if k_mean.stride(-1) != 1:  # e.g. a hand-made QuantizedKV's mean (a copy: such calls are no plans)
            k_mean = k_mean.contiguous()
        return k_mean, 1, 1.0, (k_mean.stride(0), k_mean.stride(1))
    return unused, 0, 1.0, (0, 0)


def q_bias(k: torch.Tensor, q_mean: torch.Tensor, k_mean: torch.Tensor | None, qk_mult: float,
           k_partials: torch.Tensor | None = None) -> torch.Tensor:
    """The bias (B, Hq, n_q_blocks, Sk) fp32 of the table in this module's docstring.

    ``k``: (B, Hkv, Sk, D) keys (channel stride 1); ``q_mean``: (B, Hq, n_q_blocks, D) fp32;
    ``k_mean``: (B, Hkv, D) fp32 K mean, or None with ``k_partials`` (B, Hkv, n_chunks ≤ 16, D)
    fp32 K sums (contiguous), or neither (K not smoothed); ``qk_mult``: what the kernel multiplies
    scores by (softmax scale · log2 e).
    """
    B, Hkv, Sk, D = k.shape
    Hq, n_qb = q_mean.shape[1], q_mean.shape[2]
    if k.stride(-1) != 1:
        k = k.contiguous()
    out = torch.empty((B, Hq, n_qb, Sk), dtype=torch.float32, device=k.device)
    if out.numel() == 0:
        return out
    km, n_chunks, div, km_strides = _k_mean_operand(k_mean, k_partials, Sk, q_mean)
    pad = max(next_pow2(D), 16)
    block_n = max(16, min(64, 8192 // pad))
    # constexprs: HAS_MEAN, CHUNKS, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, USE_PDL
    _Q_BIAS(grid=(triton.cdiv(Sk, block_n), B * Hq), pointers=(k, km, q_mean, out),
            scalars=(k.stride(0), k.stride(1), k.stride(2), *km_strides,
                     q_mean.stride(0), q_mean.stride(1), q_mean.stride(2),
                     out.stride(0), out.stride(1), out.stride(2),
                     Hq, Hq // Hkv, Sk, n_chunks, div, float(qk_mult), n_qb,
                     n_chunks > 0, MAX_CHUNKS, block_n, D, pad, pdl_enabled(k.device)),
            num_warps=4, num_stages=2)
    return out


def lse_correction(q: torch.Tensor, k_mean: torch.Tensor | None, scale: float, sk: int,
                   k_partials: torch.Tensor | None = None) -> torch.Tensor:
    """K smoothing's log-sum-exp term (B, Hq, Sq) fp32 of the table in this module's docstring.

    ``q``: (B, Hq, Sq, D) queries (channel stride 1); ``k_mean``: (B, Hkv, D) fp32, or None with
    ``k_partials`` (B, Hkv, n_chunks ≤ 16, D) fp32 K sums over ``sk`` keys (contiguous);
    ``scale``: the softmax scale.
    """
    B, Hq, Sq, D = q.shape
    if k_mean is None and k_partials is None:
        raise ValueError("lse_correction: needs k_mean or k_partials")
    Hkv = (k_partials if k_partials is not None else k_mean).shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    km, n_chunks, div, km_strides = _k_mean_operand(k_mean, k_partials, sk, q)
    pad = max(next_pow2(D), 16)
    block_m = max(16, min(64, 8192 // pad))
    # constexprs: CHUNKS, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, USE_PDL
    _LSE_CORR(grid=(triton.cdiv(Sq, block_m), B * Hq), pointers=(q, km, out),
              scalars=(q.stride(0), q.stride(1), q.stride(2), *km_strides, Hq, Hq // Hkv, Sq, n_chunks, div,
                       float(scale), MAX_CHUNKS, block_m, D, pad, pdl_enabled(q.device)),
              num_warps=4, num_stages=2)
    return out
