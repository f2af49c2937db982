"""``qflash.parallel.attention``: sequence-parallel quantised attention on torch.distributed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..api import attention as _local_attention
from ..api import validate_inputs
from ..spec import config_key
from .comm import Redistribute, check_ranks, contiguous_intervals, hybrid_groups, rank_and_size, zigzag_intervals
from .ring import RingAttention, RingPlan
from .ulysses import split_heads_error, ulysses_attention

__all__ = ["MODES", "RING_KV", "ParallelConfig", "attention"]

MODES = ("ulysses", "ring", "hybrid")


@dataclass(frozen=True)
class ParallelConfig:
    """How attention is spread over a process group (what ``integrations.diffusers.apply(parallel=...)``
    takes): the keywords of ``qflash.parallel.attention`` other than the tensors and the quant."""

    group: object = None
    mode: str = "ulysses"
    ulysses_size: int | None = None
    check_ranks: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


RING_KV = ("auto", "codes", "input")


def _kv_codes(ring_kv: str, quant, pieces) -> bool:
    """Whether the ring passes quantised K/V (``ring_kv``: "codes", "input" or "auto" = when it can);
    ``pieces``: the key counts quantised separately (each rank's block, or its zig-zag chunks)."""
    from ..quant.kv import unsupported_reason

    why = unsupported_reason(quant) or (None if all(pieces) else "a rank holds no keys (or an empty zig-zag chunk)")
    if ring_kv == "codes" and why is not None:
        raise ValueError(f"ring_kv='codes' cannot be used here: {why}; use ring_kv='input' or 'auto'")
    return ring_kv != "input" and why is None


def _ring(q, k, v, *, group, qlens, klens, quant, scale, causal, backend, bwd_recompute, want_lse, ring_kv):
    """Ring attention over ``group`` on HND shards (contiguous, rank order): (out HND, lse | None).
    Causal: permuted to zig-zag order and back around the ring (``comm.Redistribute``)."""
    r, P = rank_and_size(group)
    if not causal:
        plan = RingPlan(group, quant, scale, False, tuple(klens), (), 0, backend, bwd_recompute,
                        _kv_codes(ring_kv, quant, klens))
        out, lse = RingAttention.apply(q, k, v, plan)
        return out, (lse if want_lse else None)
    src, dst = contiguous_intervals(qlens), zigzag_intervals(sum(qlens), P)
    Hq, Hkv = q.shape[1], k.shape[1]
    # one exchange for q, k and v together (same tokens, causal needs equal q/k shards)
    x = Redistribute.apply(torch.cat([q, k, v], dim=1), group, src, dst)
    q, k, v = x.split([Hq, Hkv, Hkv], dim=1)
    zlens = tuple(sum(b - a for a, b in iv) for iv in dst)
    first = tuple(iv[0][1] - iv[0][0] for iv in dst)
    codes = _kv_codes(ring_kv, quant, [n for iv in dst for n in (iv[0][1] - iv[0][0], iv[1][1] - iv[1][0])])
    plan = RingPlan(group, quant, scale, True, zlens, first, first[r], backend, bwd_recompute, codes)
    out, lse = RingAttention.apply(q, k, v, plan)
    out = Redistribute.apply(out, group, dst, src)
    if want_lse:
        lse = Redistribute.apply(lse.unsqueeze(-1), group, dst, src).squeeze(-1)
    return out, (lse if want_lse else None)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    mode: str = "ulysses",
    quant="int8",
    causal: bool = False,
    scale: float | None = None,
    layout: str = "HND",
    return_lse: bool = False,
    ulysses_size: int | None = None,
    check_ranks: bool = True,
    backend: str = "auto",
    bwd_recompute: bool | None = None,
    ring_kv: str = "auto",
):
    """Sequence-parallel ``qflash.attention``: each rank passes its shard of the sequence.

    Collective over ``group``: every rank calls it with the same options, in the same order.

    Args:
        q: this rank's queries, (B, Hq, s_r, D) for layout "HND" or (B, s_r, Hq, D) for "NHD": the
            r-th contiguous piece of the global sequence (r = rank in ``group``). Shards may have
            different lengths (``check_ranks=True`` learns them), except where noted below.
        k, v: this rank's keys/values, (B, Hkv, t_r, D) / (B, t_r, Hkv, D); Hq a multiple of Hkv.
            t_r may differ from s_r (cross-attention) unless ``causal``.
        group: a ``torch.distributed`` process group (None: the default group).
        mode: "ulysses" (all-to-all heads <-> sequence, one local attention per rank over the
            whole sequence for Hq/P heads; Hq must divide by P; GQA with Hkv < P repeats K/V
            heads), "ring" (K/V blocks go around the ring, partials merged by their lse; any
            head count), or "hybrid" (Ulysses inside groups of ``ulysses_size`` consecutive
            ranks, ring across those groups; the sub-groups are created on the first call:
            ``comm.hybrid_groups`` says which processes must take part).
        quant: a preset or ``QuantConfig`` (as ``qflash.attention``). Each rank quantises what it
            computes with (see ``ring_kv`` for what the ring passes).
        causal: causal over the global sequence (needs s_r == t_r on every rank). The ring
            balances the work by moving the shards into zig-zag order (rank r holds chunks r and
            2P-1-r of 2P) and back, inside this call: one extra exchange of q, k, v and of the
            output (and lse), in and out.
        scale: softmax scale; default 1/sqrt(D).
        layout: "HND" or "NHD", for inputs and output.
        return_lse: also return this rank's rows of the global log-sum-exp, fp32 (B, Hq, s_r).
        ulysses_size: "hybrid" only: ranks per Ulysses group (must divide the group size and Hq).
        check_ranks: one ``all_gather`` of a 16-int row per call (one device-to-host sync):
            a rank whose own inputs are bad raises its error and the others a ValueError naming
            that rank (no rank is left waiting in a collective); every rank raises the same
            ``ValueError`` if the ranks disagree on batch, heads, head
            dim, dtype, layout, causal, mode, quant, scale, ulysses_size, return_lse or ring_kv, and the
            shard lengths are learnt. False skips it: every rank is assumed to hold the same
            shapes as this one (equal shards); a mismatch is then undefined (a hang or an error
            from the backend). Never checked: devices, strides, and the values.
        backend: the local kernel family, as ``qflash.attention``'s ``backend``.
        bwd_recompute: as ``qflash.attention``'s (ring: whether the backward reruns an exact
            ring forward for the exact global O and lse).
        ring_kv: what the ring's forward passes around. "codes": each rank quantises its K/V
            shard once (``qflash.quantize_kv``) and the codes, scales and K mean travel (int8 K +
            fp8 V: about half the bytes of bf16; causal: each zig-zag chunk separately); presets
            ``int8``, ``int8-fp8``, ``fp8``, non-empty shards (ValueError otherwise). "input": K/V in the input dtype, each
            rank quantising every block it receives. "auto" (default): "codes" where it applies.
            The backward always passes K/V in the input dtype (its gradients are exact
            attention's at the unquantised K/V).

    Returns:
        This rank's rows of the output, in q's layout and dtype (B, Hq, s_r, D), or ``(out, lse)``.
        Equal to ``qflash.attention`` on the concatenated sequence: Ulysses computes the same
        numbers; the ring merges per-block results in fp32 (exact for ``quant="none"`` up to
        float rounding; quantised presets smooth and scale K per block, within the preset's
        error budget). Gradients flow to q, k, v (straight-through, as ``qflash.attention``).
    """
    r, P = rank_and_size(group)
    if not isinstance(check_ranks, bool):
        raise TypeError(f"check_ranks must be a bool, got {type(check_ranks).__name__}")
    try:  # a bad input on one rank must not leave the others waiting in a collective: see check_ranks
        cfg = _validate(q, k, v, mode=mode, quant=quant, causal=causal, scale=scale, layout=layout,
                        ulysses_size=ulysses_size, ring_kv=ring_kv, P=P)
        error = None
    except (ValueError, TypeError) as exc:
        if not check_ranks:
            raise
        cfg, error = None, exc
    nhd = layout == "NHD"
    if error is None:
        if nhd:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        B, Hq, sq, D = q.shape
        Hkv, sk = k.shape[1], k.shape[2]
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        U = _ulysses_size(mode, ulysses_size, P)
    if check_ranks:
        meta = None if error is not None else {
            "batch": B, "hq": Hq, "hkv": Hkv, "d": D, "dtype": q.dtype, "layout": layout, "causal": causal,
            "mode": mode, "quant": config_key(cfg), "scale": scale, "ulysses_size": U if mode == "hybrid" else 0,
            "return_lse": return_lse, "ring_kv": ring_kv}
        qlens, klens = check_ranks_fn(group, q, meta, 0 if error else sq, 0 if error else sk, error)
    else:
        qlens, klens = [sq] * P, [sk] * P
    if causal and qlens != klens:
        raise ValueError(f"causal sequence parallelism needs equal q and k shards on every rank, got q {qlens}, "
                         f"k {klens}")

    common = {"quant": cfg, "scale": scale, "causal": causal, "backend": backend}

    def local(qh, kh, vh):
        res = _local_attention(qh, kh, vh, return_lse=return_lse, bwd_recompute=bwd_recompute, **common)
        return res if return_lse else (res, None)

    if mode == "ring":
        out, lse = _ring(q, k, v, group=group, qlens=qlens, klens=klens, bwd_recompute=bwd_recompute,
                         want_lse=return_lse, ring_kv=ring_kv, **common)
    elif mode == "ulysses" or U == P:
        out, lse = ulysses_attention(q, k, v, group=group, qlens=qlens, klens=klens, nhd=nhd, inner=local)
    elif U == 1:
        out, lse = _ring(q, k, v, group=group, qlens=qlens, klens=klens, bwd_recompute=bwd_recompute,
                         want_lse=return_lse, ring_kv=ring_kv, **common)
    else:
        ugroup, rgroup = hybrid_groups(group, U)
        g = r // U
        uq, uk = qlens[g * U:(g + 1) * U], klens[g * U:(g + 1) * U]
        seg_q = [sum(qlens[i * U:(i + 1) * U]) for i in range(P // U)]
        seg_k = [sum(klens[i * U:(i + 1) * U]) for i in range(P // U)]

        def across(qh, kh, vh):
            return _ring(qh, kh, vh, group=rgroup, qlens=seg_q, klens=seg_k, bwd_recompute=bwd_recompute,
                         want_lse=return_lse, ring_kv=ring_kv, **common)

        out, lse = ulysses_attention(q, k, v, group=ugroup, qlens=uq, klens=uk, nhd=nhd, inner=across)
    if nhd:
        out = out.transpose(1, 2)
    out = out.contiguous()
    return (out, lse.contiguous()) if return_lse else out


check_ranks_fn = check_ranks  # the argument of attention() shadows the function's name


def _validate(q, k, v, *, mode, quant, causal, scale, layout, ulysses_size, ring_kv, P):
    """This rank's own input checks (ValueError / TypeError); returns the QuantConfig."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ring_kv not in RING_KV:
        raise ValueError(f"ring_kv must be one of {RING_KV}, got {ring_kv!r}")
    cfg = validate_inputs(q, k, v, causal=causal, attn_mask=None, scale=scale, layout=layout, quant=quant)
    s_ax = 2 if layout == "HND" else 1
    sq, sk = q.shape[s_ax], k.shape[s_ax]
    U = _ulysses_size(mode, ulysses_size, P)
    if causal and sq != sk:
        raise ValueError(f"causal sequence parallelism needs q and k/v shards of the same tokens: this rank has "
                         f"{sq} queries and {sk} keys")
    err = split_heads_error(q.shape[1 if layout == "HND" else 2], U, f"mode={mode!r} over {U} ranks")
    if err:
        raise ValueError(err)
    return cfg


def _ulysses_size(mode: str, ulysses_size, P: int) -> int:
    """Ranks per Ulysses group: P for "ulysses", 1 for "ring", ``ulysses_size`` for "hybrid"."""
    if mode != "hybrid":
        if ulysses_size is not None:
            raise ValueError(f"ulysses_size is for mode='hybrid' only (mode={mode!r}), got {ulysses_size!r}")
        return P if mode == "ulysses" else 1
    if not isinstance(ulysses_size, int) or isinstance(ulysses_size, bool):
        raise TypeError(f"mode='hybrid' needs ulysses_size, an int dividing the group size {P}; got {ulysses_size!r}")
    if ulysses_size < 1 or P % ulysses_size:
        raise ValueError(f"ulysses_size must be a positive divisor of the group size {P}, got {ulysses_size}")
    return ulysses_size
