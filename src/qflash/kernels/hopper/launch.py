"""Launcher of the Hopper family: quantise K/V (and Q), build TMA descriptors, launch the Gluon kernel.

``build_launch`` turns tensors into a :class:`Launch` record (kernel, grid, keyword arguments,
compile options) without touching a GPU, so the same record is launched on an H100/H200 and
compiled for sm_90a on a CPU (``qflash.kernels.hopper.compile``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...config import QuantConfig
from .tuning import HopperTiles, tiles_for

LOG2E = 1.4426950408889634

__all__ = ["Launch", "build_launch", "attention_fwd_hopper", "gl_dtype"]


def gl_dtype(dtype: torch.dtype):
    from triton.experimental.gluon import language as gl

    return {
        torch.int8: gl.int8,
        torch.float8_e4m3fn: gl.float8e4nv,
        torch.bfloat16: gl.bfloat16,
        torch.float16: gl.float16,
    }[dtype]


def _desc(t2d: torch.Tensor, block: list[int]):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype(t2d.dtype))
    return TensorDescriptor.from_tensor(t2d, block, layout)


@dataclass
class Launch:
    """One kernel launch, fully described: ``kernel[grid](**kwargs, **options)``."""

    kernel: object
    grid: tuple
    kwargs: dict
    options: dict = field(default_factory=dict)

    def __call__(self):
        return self.kernel[self.grid](**self.kwargs, **self.options)


def build_launch(qc, qs, kc, ks, vt, vs, out, lse, scale: float, tiles: HopperTiles) -> Launch:
    """Launch record for quantised operands (shapes in ``fwd_kernel``'s docstring).

    qc (B, Hq, Sq, D) codes; qs (B, Hq, Sq) fp32; kc (B, Hkv, Sk, D) codes; ks (B, Hkv, nb) fp32;
    vt (B, Hkv, D, nb·BLOCK_N) fp8 codes; vs (B, Hkv, nb, D) fp32; out a (B, Hq, Sq, D) view
    with unit channel stride; lse (B, Hq, Sq) fp32 or None.
    """
    from .fwd_kernel import attn_fwd_fa3_kernel

    B, Hq, Sq, D = qc.shape
    Hkv, Sk = kc.shape[1], kc.shape[2]
    BN, QM = tiles.block_n, tiles.qm
    nb = ks.shape[-1]
    q_desc = _desc(qc.reshape(B * Hq * Sq, D), [QM, D])
    k_desc = _desc(kc.reshape(B * Hkv * Sk, D), [BN, D])
    v_desc = _desc(vt.reshape(B * Hkv * D, vt.shape[-1]), [D, BN])
    kwargs = dict(
        q_desc=q_desc, k_desc=k_desc, v_desc=v_desc,
        QScale=qs, KScale=ks, VScale=vs, Out=out, Lse=lse if lse is not None else qs,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
        q_mult=scale * LOG2E,
        Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, n_kblocks=nb,
        STAGES=tiles.stages, HAS_LSE=lse is not None, MASK_TAIL=Sk % BN != 0,
        CONSUMER_REGS=tiles.consumer_regs, PRODUCER_REGS=tiles.producer_regs,
    )
    grid = (math.ceil(Sq / (2 * QM)), B * Hq)
    return Launch(attn_fwd_fa3_kernel, grid, kwargs, dict(num_warps=4, maxnreg=tiles.maxnreg))


def attention_fwd_hopper(q, k, v, cfg: QuantConfig, *, scale: float | None = None, return_lse: bool = False,
                         out: torch.Tensor | None = None, tiles: HopperTiles | None = None):
    """Quantised forward of HND views q (B,Hq,Sq,D), k/v (B,Hkv,Sk,D) on sm_90.

    Returns (out (B,Hq,Sq,D) in q's dtype, lse (B,Hq,Sq) fp32 natural log | None).
    """
    try:
        from ..portable.launch import quantize_qkv
    except ImportError:  # before the portable family moved into its package
        from ..launch import quantize_qkv

    B, Hq, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tiles = tiles or tiles_for(cfg, D)
    codes = quantize_qkv(q, k, v, cfg)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if return_lse else None
    build_launch(codes.q, codes.q_scale, codes.k, codes.k_scale, codes.v_t, codes.v_scale, out, lse, scale, tiles)()
    if lse is not None and codes.k_mean is not None:
        # K was smoothed (mean subtracted): softmax is invariant, the log-sum-exp is not
        km = codes.k_mean.repeat_interleave(Hq // k.shape[1], dim=1)  # (B, Hq, D)
        lse += scale * torch.einsum("bhsd,bhd->bhs", q.float(), km)
    return out, lse
