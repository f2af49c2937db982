"""Pre-quantised keys and values: ``qflash.quantize_kv`` makes a ``QuantizedKV``, and
``qflash.attention(q, qkv)`` runs attention on it (``api.attention`` calls ``check_kv`` here).

Why: K and V are then quantised once, by whoever produces them — a fused pre-attention kernel
(``qflash.fused.qkv_prologue.rmsnorm_rope_quantize``: Flux's RMSNorm + RoPE writes the codes
directly), or one ``quantize_kv`` call reused by several query batches — instead of inside every
attention call. The result equals ``qflash.attention(q, k, v, quant=...)`` on the same K and V up
to the summation order of the K mean (``qflash.quant.kv``).

Which family reads it: ``qflash.kernels.dispatch.forward_kv`` (Hopper: K block(128) codes and Vᵀ
in its P-operand order; portable: any supported layout, Q quantised by its quantiser; reference:
anything, on the dequantised values). Forward only: no gradients, no ``torch.compile`` op.
"""

from __future__ import annotations

import torch

from .config import QuantConfig, resolve_quant
from .quant.kv import V_ORDERS, QuantizedKV, quantize_kv_reference, unsupported_reason

__all__ = ["QuantizedKV", "quantize_kv", "check_kv", "preferred_v_order"]

_BACKENDS = ("auto", "triton", "torch")


def preferred_v_order(cfg: QuantConfig, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The Vᵀ order the family ``backend="auto"`` would pick reads without a gather: "hopper" on
    an sm_90 GPU for the Hopper recipe (``int8-fp8``, ``fp8``), else "keys"."""
    from .kernels.dispatch import preferred_kv_order

    return preferred_kv_order(cfg, torch.device(device), dtype, head_dim)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, quant: str | QuantConfig = "int8-fp8", *, layout: str = "HND",
                v_order: str = "auto", backend: str = "auto") -> QuantizedKV:
    """Quantise keys and values once, for ``qflash.attention(q, qkv, ...)``.

    Args:
        k, v: (B, Hkv, Sk, D) for layout "HND" or (B, Sk, Hkv, D) for "NHD"; fp16/bf16/fp32, one
            dtype and device, the same shape.
        quant: ``int8``, ``int8-fp8``, ``fp8`` or a ``QuantConfig`` with Q/K INT8 or FP8 symmetric,
            K per token or per block, no Q/V smoothing, V float or FP8 per channel
            (``qflash.quant.kv.unsupported_reason``). ``none`` and ``int4`` raise ValueError.
        v_order: Vᵀ key order, "keys", "hopper" (the Hopper kernel's P-operand order), or "auto"
            (``preferred_v_order``: what the family attention will pick reads directly).
        backend: "triton" (CUDA, or the CPU interpreter: the two launches of
            ``qflash.fused.qkv_prologue``), "torch" (``qflash.quant.kv.quantize_kv_reference``,
            any device), or "auto" (Triton on CUDA when it applies, else torch).

    Returns a ``QuantizedKV`` (codes HND; shapes in ``qflash.quant.kv``).
    """
    cfg = resolve_quant(quant)
    why = unsupported_reason(cfg)
    if why is not None:
        raise ValueError(f"quantize_kv: quant {cfg.name!r} cannot be pre-quantised: {why}")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'B, H, S, D' if layout == 'HND' else 'B, S, H, D'}), "
                             f"got shape {tuple(t.shape)}")
    if layout not in ("HND", "NHD"):
        raise ValueError(f"layout must be 'HND' (B, H, S, D) or 'NHD' (B, S, H, D), got {layout!r}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"k and v must share dtype and device, got k ({k.dtype}, {k.device}), v ({v.dtype}, {v.device})")
    if v_order not in ("auto", *V_ORDERS):
        raise ValueError(f"v_order must be 'auto', 'keys' or 'hopper', got {v_order!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if layout == "NHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    if v_order == "auto":
        v_order = preferred_v_order(cfg, k.device, k.dtype, k.shape[-1])
    from .fused.qkv_prologue import quantize_kv_triton, triton_unsupported_reason

    tri_why = triton_unsupported_reason(cfg, k.shape[-1], False)
    if backend == "triton":
        if tri_why is not None:
            raise NotImplementedError(f"quantize_kv(backend='triton'): {tri_why}")
        return quantize_kv_triton(k, v, cfg, v_order)
    if backend == "auto" and k.is_cuda and tri_why is None:
        return quantize_kv_triton(k, v, cfg, v_order)
    return quantize_kv_reference(k, v, cfg, v_order)


def _same_config(a: QuantConfig, b: QuantConfig) -> bool:
    return a is b or a.with_(name="-") == b.with_(name="-")


def check_kv(q: torch.Tensor, qkv: QuantizedKV, v, quant, layout: str) -> QuantConfig:
    """What ``qflash.attention`` checks for a ``QuantizedKV`` (beyond its generic checks on q,
    mask and options); returns the config. Raises ValueError/TypeError naming the argument."""
    if v is not None:
        raise ValueError("v must be None (or left out) when k is a QuantizedKV: it already holds the values")
    if quant is not None:
        cfg = resolve_quant(quant)
        if not _same_config(cfg, qkv.quant):
            raise ValueError(f"quant={cfg.name!r} does not match the QuantizedKV's preset {qkv.quant.name!r}; "
                             "leave quant out (the QuantizedKV's own preset is used) or quantise K/V with this one")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != qkv.dtype:
        raise TypeError(f"q must have the dtype K and V had before quantisation ({qkv.dtype}), got {q.dtype}")
    if q.device != qkv.device:
        raise ValueError(f"q is on {q.device}, the QuantizedKV on {qkv.device}: one device expected")
    if q.dim() == 4:
        h_ax = 1 if layout == "HND" else 2
        B, Hkv, _, D = qkv.shape
        if q.shape[0] != B or q.shape[3] != D:
            raise ValueError(f"q of shape {tuple(q.shape)} ({layout}) does not match the QuantizedKV's batch {B} "
                             f"and head dim {D}")
        if Hkv == 0 or q.shape[h_ax] % Hkv:
            raise ValueError(f"query heads ({q.shape[h_ax]}) must be a multiple of the QuantizedKV's heads ({Hkv})")
    return qkv.quant


def kv_stand_in(q: torch.Tensor, qkv: QuantizedKV, layout: str) -> torch.Tensor:
    """A zero-byte tensor with K's shape in ``layout`` and q's dtype/device (``expand`` of one
    element), so the generic checks of ``qflash.api.validate_inputs`` apply unchanged."""
    B, H, S, D = qkv.shape
    shape = (B, H, S, D) if layout == "HND" else (B, S, H, D)
    return torch.zeros((), dtype=q.dtype, device=q.device).expand(shape)
