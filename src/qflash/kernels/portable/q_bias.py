"""Q smoothing's bias restoration, one Triton launch.

Presets with ``smooth_q`` (``int4``) quantise ``q - mean_q(block)`` and add back, per query block
and key, the score the mean contributes:

    bias[b, h, i, j] = qk_mult · q_mean[b, h, i, :] · (k[b, h // group, j, :] - k_mean[b, h // group, :])

==========  ===================================  =========  =====================================
tensor      shape                                dtype      notes
==========  ===================================  =========  =====================================
k           (B, Hkv, Sk, D)                      fp16/bf16/fp32  any strides, channel stride 1
k mean      (B, Hkv, n_chunks, D)                fp32       K sums per chunk (divided by ``div``)
                                                            or the mean itself (n_chunks 1, div 1)
q mean      (B, Hq, n_q_blocks, D)               fp32       channel stride 1
bias (out)  (B, Hq, n_q_blocks, Sk)              fp32       key stride 1
==========  ===================================  =========  =====================================

It replaces three torch ops (``k.float() - k_mean``, a GQA repeat and a GEMM) so that the call can
be recorded and replayed as a plan. The K mean is reduced from the statistics launch's partials
exactly as the quantiser reduces it (``kv_quant._reduce_partials``), so the bias and the K codes
see the same mean. fp32 throughout; the dot over channels is a ``tl.sum`` (its order differs from
a GEMM's in the last bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import next_pow2
from ..fastlaunch import FastLauncher
from ..kv_quant import MAX_CHUNKS, _reduce_partials


@triton.jit
def q_bias_kernel(
    K, KM, QM, OUT,
    stride_kb, stride_kh, stride_ks,
    stride_kmb, stride_kmh,
    stride_qmb, stride_qmh, stride_qms,
    stride_ob, stride_oh, stride_os,
    Hq, group, Sk, n_chunks, div, qk_mult,
    HAS_MEAN: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """Grid (cdiv(Sk, BLOCK_N), n_q_blocks, B·Hq): BLOCK_N keys' bias for one query block of one head."""
    pid_n = tl.program_id(0)
    qb = tl.program_id(1)
    bh = tl.program_id(2)
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
    qm = tl.load(QM + b.to(tl.int64) * stride_qmb + h.to(tl.int64) * stride_qmh + qb.to(tl.int64) * stride_qms
                 + offs_d, mask=dmask, other=0.0)
    # padded channels: q_mean is 0 there, so (k - k_mean) · 0 adds nothing
    bias = tl.sum(k * qm[None, :], axis=1) * qk_mult
    tl.store(OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + qb.to(tl.int64) * stride_os + offs_n,
             bias, mask=nmask)


_Q_BIAS = FastLauncher(q_bias_kernel, n_pointers=4)


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
    if k_partials is not None:
        if k_partials.shape[2] > MAX_CHUNKS or not k_partials.is_contiguous():
            raise ValueError(f"k_partials: expected contiguous (B, Hkv, n <= {MAX_CHUNKS}, D) sums, "
                             f"got shape {tuple(k_partials.shape)}")
        km, n_chunks, div = k_partials, k_partials.shape[2], float(Sk)
        km_strides = (km.stride(0), km.stride(1))
    elif k_mean is not None:
        km, n_chunks, div = k_mean, 1, 1.0
        km_strides = (km.stride(0), km.stride(1))
    else:
        km, n_chunks, div, km_strides = q_mean, 0, 1.0, (0, 0)  # unused pointer
    pad = max(next_pow2(D), 16)
    block_n = max(16, min(64, 8192 // pad))
    # constexprs: HAS_MEAN, CHUNKS, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD
    _Q_BIAS(grid=(triton.cdiv(Sk, block_n), n_qb, B * Hq), pointers=(k, km, q_mean, out),
            scalars=(k.stride(0), k.stride(1), k.stride(2), *km_strides,
                     q_mean.stride(0), q_mean.stride(1), q_mean.stride(2),
                     out.stride(0), out.stride(1), out.stride(2),
                     Hq, Hq // Hkv, Sk, n_chunks, div, float(qk_mult),
                     n_chunks > 0, MAX_CHUNKS, block_n, D, pad),
            num_warps=4, num_stages=2)
    return out
