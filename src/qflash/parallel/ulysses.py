"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: an all-to-all turns "my tokens, all heads"
into "all tokens, my heads", each rank runs ``qflash.attention`` on whole sequences for H/P
heads, and a second all-to-all turns the output back. Attention is independent per head, so the
result is the single-GPU one (bit for bit on the same kernel: the quantisation scales are per
token/block of the same sequence).

The all-to-alls are autograd functions whose gradient is the opposite all-to-all, so the
backward is ``qflash.attention``'s own straight-through backward in between.
"""

from __future__ import annotations

import math

from .comm import HeadsToSeq, SeqToHeads, rank_and_size

__all__ = ["kv_repeat", "split_heads_error", "ulysses_attention"]


def kv_repeat(hq: int, hkv: int, size: int) -> int:
    """How many times each K/V head is repeated so that ``size`` ranks can split the K/V heads
    (GQA with fewer K/V heads than ranks): the smallest g with (hkv·g) % size == 0. hq is a
    multiple of both hkv and size, hence of lcm(hkv, size) = hkv·g, so the GQA grouping survives."""
    g = size // math.gcd(hkv, size)
    assert hq % (hkv * g) == 0, (hq, hkv, size)
    return g


def ulysses_attention(q, k, v, *, group, qlens, klens, nhd: bool, inner):
    """q (B, Hq, sq, D), k/v (B, Hkv, sk, D) (HND views, this rank's shard) -> (out, lse).

    ``inner(q, k, v) -> (out, lse | None)`` runs the attention on (B, H/P, S, D) tensors (the
    local ``qflash.attention``, or the ring across Ulysses groups for ``hybrid``). Returns out
    (B, Hq, sq, Dv) (memory order NHD if ``nhd``) and lse fp32 (B, Hq, sq) or None.
    """
    _, P = rank_and_size(group)
    Hq, Hkv = q.shape[1], k.shape[1]
    g = kv_repeat(Hq, Hkv, P)
    if g > 1:  # differentiable: the backward sums the copies' gradients
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    qh = SeqToHeads.apply(q, group, qlens)
    kh = SeqToHeads.apply(k, group, klens)
    vh = SeqToHeads.apply(v, group, klens)
    out, lse = inner(qh, kh, vh)
    out = HeadsToSeq.apply(out, group, qlens, nhd)
    if lse is not None:
        lse = HeadsToSeq.apply(lse.unsqueeze(-1), group, qlens).squeeze(-1)
    return out, lse


def split_heads_error(hq: int, size: int, what: str) -> str | None:
    """The error for query heads that ``size`` ranks cannot split, or None."""
    if hq % size:
        return (f"{what}: the query heads ({hq}) must be divisible by the Ulysses group size ({size}); "
                "use mode='ring', or mode='hybrid' with a ulysses_size that divides the heads")
    return None
