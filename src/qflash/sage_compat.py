"""SageAttention-compatible entry point: ``from qflash import sageattn`` replaces
``from sageattention import sageattn`` with no other change to the calling code.
"""

from __future__ import annotations

import torch

from .api import attention
from .config import QuantConfig

__all__ = ["SAGE_TUNING_KWARGS", "sageattn"]

#: SageAttention keyword arguments that choose its own kernel variants and quantisation details.
#: They have no qflash meaning and are accepted and ignored (choose ``quant=`` instead).
SAGE_TUNING_KWARGS = frozenset(
    {"qk_quant_gran", "qk_quant_dtype", "pv_accum_dtype", "smooth_k", "smooth_v", "quantization_backend"}
)


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    **kwargs,
):
    """``sageattention.sageattn`` with SageAttention's signature, computed by qflash.

    Args:
        q: (B, Hq, Sq, D) for ``tensor_layout="HND"`` or (B, Sq, Hq, D) for ``"NHD"``;
            float16, bfloat16 or float32.
        k, v: (B, Hkv, Sk, D) / (B, Sk, Hkv, D); Hq a multiple of Hkv (GQA/MQA).
        tensor_layout: "HND" or "NHD"; the output has the same layout.
        is_causal: causal mask. SageAttention defines it only for Sq == Sk; for Sq != Sk qflash
            aligns it to the bottom-right corner (query i sees key j iff j <= i + Sk - Sq), as
            FlashAttention does.
        sm_scale: softmax scale, default 1 / sqrt(D).
        return_lse: also return the natural-log log-sum-exp of each row, fp32 (B, Hq, Sq) — the
            same quantity SageAttention returns.
        quant (keyword, qflash extension): preset or ``QuantConfig``; default ``"int8"`` (INT8
            Q·Kᵀ with smoothed K, P·V in the input dtype — SageAttention2's accurate variant).
            ``"int8-fp8"`` matches SageAttention's sm89/sm90 INT8/FP8 kernels.
        attn_mask (keyword, qflash extension): bool (keep) / float (additive) mask
            broadcastable to (B, Hq, Sq, Sk).
        Sage's tuning keywords (``qk_quant_gran``, ``pv_accum_dtype``, ``smooth_k``, ...; see
        ``SAGE_TUNING_KWARGS``) are accepted and ignored. Any other keyword raises TypeError:
        qflash never drops an argument (such as a mask) silently.

    Returns:
        ``out`` in q's dtype and ``tensor_layout``, or ``(out, lse)`` when ``return_lse``.
    """
    quant: str | QuantConfig = kwargs.pop("quant", "int8")
    attn_mask = kwargs.pop("attn_mask", None)
    unknown = sorted(set(kwargs) - SAGE_TUNING_KWARGS)
    if unknown:
        raise TypeError(
            f"sageattn got unexpected keyword argument(s) {unknown}; qflash accepts SageAttention's tuning "
            f"keywords {sorted(SAGE_TUNING_KWARGS)} (ignored) plus quant= and attn_mask="
        )
    if tensor_layout not in ("HND", "NHD"):
        raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
    return attention(
        q, k, v, quant=quant, causal=bool(is_causal), attn_mask=attn_mask, scale=sm_scale, layout=tensor_layout,
        return_lse=return_lse,
    )
