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
from ..kv_quant import quantize_kv
from .tuning import HopperTiles, tiles_for

LOG2E = 1.4426950408889634

__all__ = ["Launch", "build_launch", "attention_fwd_hopper", "attention_fwd_hopper_kv", "gl_dtype", "quantize_kv"]


def gl_dtype(dtype: torch.dtype):
    from triton.experimental.gluon import language as gl

    return {
        torch.int8: gl.int8,
        torch.float8_e4m3fn: gl.float8e4nv,
        torch.bfloat16: gl.bfloat16,
        torch.float16: gl.float16,
    }[dtype]


_LAYOUTS: dict[tuple, object] = {}


def _desc(t2d: torch.Tensor, block: list[int]):
    """TMA descriptor of a 2-D tensor. The shared-memory layout depends only on (block, dtype) and
    costs ~12 µs of Python to build, 3x a descriptor: kept per (block, dtype)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    key = (tuple(block), t2d.dtype)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for(block, gl_dtype(t2d.dtype))
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


def q_view(q: torch.Tensor):
    """A 2-D TMA view of HND-indexed q (B, Hq, Sq, D) and where head (b, h)'s rows start in it:
    (view, rows per batch, rows per head, columns per head). HND- and NHD-contiguous inputs are
    read in place; anything else is copied once."""
    B, Hq, Sq, D = q.shape
    if q.data_ptr() % 16:  # TMA needs a 16-byte aligned base
        return q_view(q.clone(memory_format=torch.contiguous_format))
    if q.is_contiguous():
        return q.reshape(B * Hq * Sq, D), Hq * Sq, Sq, 0
    if q.transpose(1, 2).is_contiguous():  # an NHD buffer (B, Sq, Hq, D)
        return q.transpose(1, 2).reshape(B * Sq, Hq * D), Sq, 0, D
    return q_view(q.contiguous())


def build_launch(q, kc, ks, vt, vs, out, lse, scale: float, tiles: HopperTiles, causal_offset: int | None = None) -> Launch:
    """Launch record (operands in ``fwd_kernel``'s docstring).

    q: the bf16/fp16 input (B, Hq, Sq, D), quantised per token in the kernel; kc (B, Hkv, Sk, D)
    codes; ks (B, Hkv, nb) fp32; vt (B, Hkv, D, nb·BLOCK_N) fp8 codes (keys in the P-operand
    order when ``tiles.v_permuted``); vs (B, Hkv, D) fp32 per channel; out a (B, Hq, Sq, D) view
    with unit channel stride; lse (B, Hq, Sq) fp32 or None. causal_offset: None (not causal) or
    the diagonal's offset (key c visible to row r iff c <= r + offset: 0 top-left, Sk - Sq
    bottom-right).
    """
    from .fwd_kernel import attn_fwd_fa3_kernel

    B, Hq, Sq, D = q.shape
    Hkv, Sk = kc.shape[1], kc.shape[2]
    BN, QM = tiles.block_n, tiles.qm
    nb = ks.shape[-1]
    q2d, q_rows_b, q_rows_h, q_col_h = q_view(q)
    kwargs = dict(
        q_desc=_desc(q2d, [QM, D]),
        k_desc=_desc(kc.reshape(B * Hkv * Sk, D), [BN, D]),
        v_desc=_desc(vt.reshape(B * Hkv * D, vt.shape[-1]), [D, BN]),
        KScale=ks, VScale=vs, Out=out, Lse=lse if lse is not None else ks,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
        q_rows_b=q_rows_b, q_rows_h=q_rows_h, q_col_h=q_col_h,
        q_mult=scale * LOG2E,
        Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, n_kblocks=nb, causal_off=causal_offset or 0,
        STAGES=tiles.stages, HAS_LSE=lse is not None, MASK_TAIL=Sk % BN != 0, CAUSAL=causal_offset is not None,
        INT_CVT=tiles.int_cvt,
        V_PERMUTED=tiles.v_permuted,
        CONSUMER_REGS=tiles.consumer_regs, PRODUCER_REGS=tiles.producer_regs,
    )
    grid = (math.ceil(Sq / (2 * QM)), B * Hq)
    return Launch(attn_fwd_fa3_kernel, grid, kwargs, dict(num_warps=4, maxnreg=tiles.maxnreg))


def attention_fwd_hopper(q, k, v, cfg: QuantConfig, *, scale: float | None = None, return_lse: bool = False,
                         causal_offset: int | None = None, out: torch.Tensor | None = None,
                         tiles: HopperTiles | None = None):
    """Quantised forward of HND views q (B,Hq,Sq,D), k/v (B,Hkv,Sk,D) on sm_90: one quantiser
    launch for K/V (plus the token statistics it needs), one attention launch that quantises Q.

    Returns (out (B,Hq,Sq,D) in q's dtype, lse (B,Hq,Sq) fp32 natural log | None).
    """
    B, Hq, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tiles = tiles or tiles_for(cfg, D)
    kc, ks, vt, vs, ksum = quantize_kv(k, v, cfg, tiles.block_n, tiles.v_permuted)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if return_lse else None
    build_launch(q, kc, ks, vt, vs, out, lse, scale, tiles, causal_offset)()
    if lse is not None and ksum is not None:
        # K was smoothed (mean subtracted): softmax is invariant, the log-sum-exp is not
        km = (ksum.sum(dim=2) / k.shape[2]).repeat_interleave(Hq // k.shape[1], dim=1)  # (B, Hq, D)
        lse += scale * torch.einsum("bhsd,bhd->bhs", q.float(), km)
    return out, lse


def attention_fwd_hopper_kv(q, qkv, *, scale: float | None = None, return_lse: bool = False,
                            causal_offset: int | None = None, out: torch.Tensor | None = None,
                            tiles: HopperTiles | None = None):
    """``attention_fwd_hopper`` on a pre-quantised ``qflash.quant.kv.QuantizedKV`` (K block(128)
    codes, Vᵀ FP8 per channel): one launch, the attention kernel; Vᵀ is gathered into the kernel's
    order first only if it was written in the other one."""
    B, Hq, Sq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tiles = tiles or tiles_for(qkv.quant, D)
    vt = qkv.v if (qkv.v_order == "hopper") == tiles.v_permuted else None
    if vt is None:
        vt = qkv.vt_in_key_order()
        if tiles.v_permuted:
            from ...quant.kv import hopper_key_order

            perm = torch.empty_like(vt)
            perm.view(torch.uint8)[..., hopper_key_order(vt.shape[-1], vt.device)] = vt.view(torch.uint8)
            vt = perm
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if return_lse else None
    build_launch(q, qkv.k, qkv.k_scale, vt, qkv.v_scale, out, lse, scale, tiles, causal_offset)()
    if lse is not None and qkv.k_mean is not None:
        # K was smoothed (mean subtracted): softmax is invariant, the log-sum-exp is not
        km = qkv.k_mean.repeat_interleave(Hq // qkv.shape[1], dim=1)  # (B, Hq, D)
        lse += scale * torch.einsum("bhsd,bhd->bhs", q.float(), km)
    return out, lse
