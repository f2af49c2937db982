"""The Hopper family's entry for the dispatcher: what it runs (data), the checks a table cannot
express, and ``forward`` with the tensor contract of ``qflash.kernels.family``."""

from __future__ import annotations

import torch

from ...config import GranularityKind, Precision, QuantConfig, Strategy
from ..family import Family, FamilySupport

__all__ = ["HopperFamily", "SUPPORT", "recipe_mismatch"]

SUPPORT = FamilySupport(
    devices=frozenset({"cuda"}),
    min_cc=(9, 0),
    max_cc=(9, 0),
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    head_dims=(64, 128),
    head_dim_multiple=64,
    presets=None,  # any config with the recipe below (``recipe_mismatch``): the int8-fp8 and fp8 presets
    masks=frozenset({"none"}),  # masks run on the portable family
    causal=frozenset({"none", "bottom_right", "top_left"}),
    lse=True,
    layouts=frozenset({"HND", "NHD"}),
    gqa=True,
    backward=False,  # gradients come from the portable family (straight-through, exact attention's)
    notes="Gluon, FA3 schedule (TMA producer warp, two ping-pong consumer warpgroups); 8-bit Q·K, FP8 P·V",
)


def recipe_mismatch(cfg: QuantConfig) -> str | None:
    """None if the kernels compute ``cfg`` exactly as ``qflash.reference`` does, else why not.

    The recipe: Q per token and K per 128-key block, both INT8 or both FP8 e4m3, symmetric, K
    smoothed or not, Q not smoothed; P FP8 (one tensor scale: 448) and V FP8 with one scale per
    channel over all keys.
    """
    q, k = cfg.q, cfg.k
    if q.precision not in (Precision.INT8, Precision.FP8_E4M3) or k.precision is not q.precision:
        return f"Q·K precision {q.precision.value}/{k.precision.value} (kernels: int8/int8 or fp8/fp8)"
    if q.strategy is not Strategy.SYMMETRIC or k.strategy is not Strategy.SYMMETRIC:
        return "asymmetric Q or K"
    if q.granularity.kind is not GranularityKind.TOKEN or cfg.smooth_q:
        return f"q granularity {q.granularity} / smooth_q (kernels: per token, no Q smoothing)"
    if k.granularity.kind is not GranularityKind.BLOCK or k.granularity.size != 128:
        return f"k granularity {k.granularity} (kernels: block(128))"
    if not cfg.quantizes_pv or cfg.v.precision is not Precision.FP8_E4M3 or cfg.smooth_v:
        return "P·V not FP8 (kernels: FP8 P and V, V not smoothed)"
    if cfg.v.granularity.kind is not GranularityKind.CHANNEL or cfg.v.granularity.size != 0:
        return f"v granularity {cfg.v.granularity} (kernels: channel(0), one scale per channel)"
    if cfg.v.strategy is not Strategy.SYMMETRIC:
        return "asymmetric V"
    return None


class HopperFamily(Family):
    name = "hopper"
    support = SUPPORT

    def check_extra(self, spec, q, k, v, attn_mask) -> str | None:
        why = recipe_mismatch(spec.quant)
        if why is not None:
            return why
        if v.shape[-1] != q.shape[-1]:
            return "value head dim differs from the query's"
        if spec.scale is not None and not spec.scale > 0:
            return f"softmax scale {spec.scale} (kernels: > 0; max(s·c) = max(s)·c needs c > 0)"
        return None

    @staticmethod
    def hands_off(q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether ``forward`` hands this call to the portable family: at most
        ``tuning.SMALL_PROBLEM["max_work"]`` multiply-adds per matmul (B·Hq·Sq·Sk·D). Small calls are
        host-bound: the portable family's one or two launches beat our three. Decided per shape here,
        not in ``supports``: the dispatcher caches its choice per call description."""
        from .tuning import SMALL_PROBLEM

        B, Hq, Sq, D = q.shape
        return B * Hq * Sq * k.shape[2] * D <= SMALL_PROBLEM["max_work"]

    def forward(self, spec, q, k, v, attn_mask):
        from .launch import attention_fwd_hopper

        B, Hq, Sq, D = q.shape
        Sk = k.shape[2]
        if self.hands_off(q, k):
            from ..portable import FAMILY as PORTABLE

            return PORTABLE.forward(spec, q, k, v, attn_mask)
        if spec.layout == "NHD":
            out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
        else:
            out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
        if out.numel() == 0 or Sk == 0:  # nothing to launch; no key: O = 0, lse = -inf (as the reference)
            out.zero_()
            lse = torch.full((B, Hq, Sq), float("-inf"), device=q.device) if spec.return_lse else None
            return out, lse
        off = None
        if spec.causal == "top_left":
            off = 0
        elif spec.causal == "bottom_right":
            off = Sk - Sq
        return attention_fwd_hopper(q, k, v, spec.quant, scale=spec.scale, return_lse=spec.return_lse,
                                    causal_offset=off, out=out)

    # pre-quantised K/V (qflash.quant.kv.QuantizedKV; protocol in kernels/dispatch.py)
    def supports_kv(self, spec, q, qkv, attn_mask, *, explicit=False):
        ok, why = self.supports(spec, q, qkv.k, qkv.k, attn_mask, explicit=explicit)
        if not ok:
            return ok, why
        from .tuning import tiles_for

        if qkv.k_block != tiles_for(spec.quant, q.shape[-1]).block_n:
            return False, f"K scale block {qkv.k_block} (kernel: {tiles_for(spec.quant, q.shape[-1]).block_n})"
        if q.numel() == 0 or qkv.seq_len == 0:
            return False, "empty dimension (the reference family returns the empty result)"
        return True, ""

    def forward_kv(self, spec, q, qkv, attn_mask):
        from .launch import attention_fwd_hopper_kv

        B, Hq, Sq, D = q.shape
        if spec.layout == "NHD":
            out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
        else:
            out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
        Sk = qkv.seq_len
        off = 0 if spec.causal == "top_left" else (Sk - Sq) if spec.causal == "bottom_right" else None
        return attention_fwd_hopper_kv(q, qkv, scale=spec.scale, return_lse=spec.return_lse, causal_offset=off,
                                       out=out)

    def kv_order(self, cfg, device, dtype, head_dim):
        s = self.support
        if (device.type != "cuda" or s.device_ok(device, False) is not None or dtype not in s.dtypes
                or not s.head_dims[0] <= head_dim <= s.head_dims[1] or head_dim % s.head_dim_multiple
                or recipe_mismatch(cfg) is not None):
            return None
        from .tuning import tiles_for

        return "hopper" if tiles_for(cfg, head_dim).v_permuted else "keys"

    def tuning(self, device) -> str:
        from .tuning import _TILES

        return "hopper tiles (kernels/hopper/tuning.py): " + ", ".join(
            f"D{d}: {t.stages} stages" for d, t in sorted(_TILES.items()))
