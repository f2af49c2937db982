"""Shared test helpers: error metrics (float64 math) and random inputs (never zeros)."""

from __future__ import annotations

import math

import torch

__all__ = [
    "PRESET_NAMES",
    "cosine",
    "make_qkv",
    "max_abs",
    "naive_attention",
    "randn",
    "reference_args_of_call",
    "rel_l2",
    "to_hnd",
]

PRESET_NAMES = ("none", "int8", "int8-fp8", "int4", "fp8")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ``||a - b|| / ||b||`` in float64 (``b`` is the reference)."""
    a64, b64 = a.detach().to(torch.float64).flatten(), b.detach().to(torch.float64).flatten()
    assert a64.shape == b64.shape, (a.shape, b.shape)
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    return num / den if den > 0 else num


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors in float64 (1.0 when both are zero)."""
    a64, b64 = a.detach().to(torch.float64).flatten(), b.detach().to(torch.float64).flatten()
    assert a64.shape == b64.shape, (a.shape, b.shape)
    na, nb = torch.linalg.vector_norm(a64).item(), torch.linalg.vector_norm(b64).item()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return (a64 @ b64).item() / (na * nb)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    d = a.detach().to(torch.float64) - b.detach().to(torch.float64)
    return d.abs().max().item() if d.numel() else 0.0


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """N(0, scale²) samples drawn from ``gen`` (fp32, then cast), never all zeros."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    return x.to(dtype)


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a (B, S, H, D) "NHD" tensor as (B, H, S, D); HND tensors pass through."""
    return x.transpose(1, 2) if layout == "NHD" else x


def make_qkv(
    gen: torch.Generator,
    *,
    B: int = 1,
    Hq: int = 2,
    Hkv: int | None = None,
    Sq: int = 16,
    Sk: int | None = None,
    D: int = 64,
    dtype: torch.dtype = torch.float32,
    layout: str = "HND",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh N(0, 1) q, k, v in ``layout`` ("HND": (B, H, S, D); "NHD": (B, S, H, D))."""
    Hkv = Hq if Hkv is None else Hkv
    Sk = Sq if Sk is None else Sk

    def mk(h: int, s: int) -> torch.Tensor:
        shape = (B, h, s, D) if layout == "HND" else (B, s, h, D)
        return randn(gen, *shape, dtype=dtype)

    return mk(Hq, Sq), mk(Hkv, Sk), mk(Hkv, Sk)


def naive_attention(q, k, v, *, scale=None, mask=None, causal=False):
    """Hand-written softmax(q·kᵀ·scale + mask)·v in float64, one row at a time (small shapes).

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, Dv). ``mask``: bool (True = keep) or additive float,
    broadcastable to (B, Hq, Sq, Sk). Causal keeps key j for query i iff j <= i + Sk - Sq
    (bottom-right). Fully masked rows give 0 and lse -inf. Returns (out, lse), both float64.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64)
    full_mask = None if mask is None else mask.expand(B, Hq, Sq, Sk)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)  # GQA: consecutive query heads share a key/value head
            qq, kk, vv = q[b, h].double(), k[b, hk].double(), v[b, hk].double()
            for i in range(Sq):
                logits: dict[int, float] = {}
                for j in range(Sk):
                    if causal and j > i + Sk - Sq:
                        continue
                    s = float(qq[i] @ kk[j]) * scale
                    if full_mask is not None:
                        mv = full_mask[b, h, i, j]
                        if full_mask.dtype == torch.bool:
                            if not bool(mv):
                                continue
                        else:
                            s += float(mv)
                    if s != float("-inf"):
                        logits[j] = s
                if not logits:
                    continue
                mx = max(logits.values())
                weights = {j: math.exp(s - mx) for j, s in logits.items()}
                total = sum(weights.values())
                out[b, h, i] = sum(w / total * vv[j] for j, w in weights.items())
                lse[b, h, i] = mx + math.log(total)
    return out, lse


def reference_args_of_call(q: torch.Tensor, k: torch.Tensor, quant, *, kernel: bool = False) -> dict:
    """Keyword arguments of ``reference.fake_quant_attention`` (``quant``, ``stat_block``,
    ``block_n``) that model a small quantised ``qflash.attention(q, k, ...)`` on q's device:
    ``launch.reference_args`` of the portable kernel for the quantisation the family runs
    (``launch.call_quant``: small FP8 P·V calls keep P·V in the input dtype on CUDA; the one-launch
    mode's K granularity and per-split statistics) on CUDA, or with ``kernel=True`` (``backend="portable"`` on the CPU);
    else the preset itself (the CPU's default path is the reference). q, k: HND, on the device of
    the call. (Calls the Hopper family keeps — past 2^31 MACs — use one set of statistics; the
    small calls of the tests go to the portable family.)"""
    from qflash import resolve_quant
    from qflash.kernels.portable import launch

    if q.device.type != "cuda" and not kernel:
        return {"quant": quant}
    return launch.reference_args(q, k, launch.call_quant(q, k, resolve_quant(quant)))
