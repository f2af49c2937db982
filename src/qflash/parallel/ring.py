"""Ring attention: every rank keeps its queries, the K/V blocks travel around the ring.

Step t on rank r computes its queries against the block of rank ``(r - t) mod P`` with
``qflash.attention(..., return_lse=True)`` while the next block is already on its way
(``comm.RingExchange``: ``batch_isend_irecv`` into fresh buffers, two in flight at most), and
folds the partial result into an fp32 running output with the log-sum-exp (``merge.merge_into``).

Causal: the ranks hold the sequence in zig-zag order (rank r: chunks r and 2P-1-r of 2P; the
caller permutes, ``api``), so that each rank does the same work. Then block (r, src) is

    src == r: the local causal attention (both chunks, equal lengths: plain causal);
    src <  r: all local queries against the first chunk of src's block (fully visible);
    src >  r: the second local chunk of queries against all of src's block (fully visible);

half a block's work for every off-diagonal step, on every rank.

What travels: rings with a pre-quantisable preset (``int8``, ``int8-fp8``, ``fp8``;
``plan.kv_codes``) quantise each rank's K/V shard once (``qflash.quantize_kv``) and pass the
``QuantizedKV``'s codes, scales and K mean (``_ring_codes``); otherwise K/V travel in the input
dtype and each rank quantises every block it receives inside ``qflash.attention``. Causal rings
quantise each zig-zag chunk separately (a later rank needs the first chunk alone).

Backward (``RingAttention.backward``): the K/V blocks go around the ring again, and each block's
dK/dV accumulator (fp32) travels with it and arrives home after the last step. A block's
gradients use the *global* O and lse (rows of the merged result), which makes the blockwise
gradients exact: dS = P ∘ (dP − rowsum(dO ∘ O) + dlse) with P = exp(S − lse_global). On CUDA the
block gradients come from the backward kernel family (``family.backward`` with the global O and
lse); on other devices from fp32 PyTorch math here (``_block_grads_torch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .comm import RingExchange, rank_and_size
from .merge import merge_into

__all__ = ["RingAttention", "RingPlan", "ring_forward"]


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Everything a ring call needs besides the tensors (same on every rank but ``q_first``).

    klens: local key lengths of every rank (group-rank order). Causal only: ``k_first[i]`` is the
    length of rank i's first zig-zag chunk, ``q_first`` this rank's (queries and keys share it).
    """

    group: object
    quant: object  # QuantConfig
    scale: float
    causal: bool
    klens: tuple
    k_first: tuple
    q_first: int
    backend: str
    bwd_recompute: bool | None = None
    kv_codes: bool = False  # the forward passes each rank's K/V quantised once (see _ring_codes)


def _block(plan: RingPlan, r: int, src: int, sq: int, sk: int):
    """(query rows, key columns, diagonal?) that rank r computes against src's block, or None."""
    if not plan.causal:
        rows, cols, diag = slice(0, sq), slice(0, sk), False
    elif src == r:
        rows, cols, diag = slice(0, sq), slice(0, sk), True
    elif src < r:
        rows, cols, diag = slice(0, sq), slice(0, plan.k_first[src]), False
    else:
        rows, cols, diag = slice(plan.q_first, sq), slice(0, sk), False
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return None
    return rows, cols, diag


def ring_forward(q, k, v, plan: RingPlan, quant=None):
    """Merged attention of the local queries over every rank's K/V.

    q (B, Hq, sq, D), k/v (B, Hkv, sk, D): HND, this rank's (zig-zag, if causal) share.
    Returns out fp32 (B, Hq, sq, D) and lse fp32 (B, Hq, sq) (-inf: a row that saw no key).
    ``quant`` overrides ``plan.quant`` (the backward's exact recompute).
    """
    from ..api import attention

    r, P = rank_and_size(plan.group)
    B, H, sq, D = q.shape
    Hkv = k.shape[1]
    out = torch.zeros((B, H, sq, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, sq), float("-inf"), dtype=torch.float32, device=q.device)
    if plan.kv_codes and quant is None:
        _ring_codes(q, k, v, plan, out, lse)
        return out, lse
    ring = RingExchange(plan.group)
    kb, vb = k, v
    q_rows = {}  # the causal second chunk of queries, made contiguous once (kernels copy strided operands)
    for step in range(P):
        src = (r - step) % P
        if step + 1 < P:  # the next block travels while this one is computed
            n = plan.klens[(r - step - 1) % P]
            ring.start([kb, vb], [(B, Hkv, n, D), (B, Hkv, n, v.shape[-1])])
        blk = _block(plan, r, src, sq, kb.shape[2])
        if blk is not None:
            rows, cols, diag = blk
            key = (rows.start, rows.stop)
            if key not in q_rows:
                q_rows[key] = q if rows.start == 0 else q[:, :, rows].contiguous()
            o, part_lse = attention(q_rows[key], kb[:, :, cols], vb[:, :, cols], quant=plan.quant if quant is None
                                    else quant, causal=diag, scale=plan.scale, return_lse=True, backend=plan.backend)
            merge_into(out[:, :, rows], lse[:, :, rows], o, part_lse)
        if step + 1 < P:
            kb, vb = ring.wait()
    return out, lse


def _codes_fields(qkv) -> list:
    """The tensors of a ``QuantizedKV`` that travel (codes, scales, K mean), in a fixed order."""
    return [t for t in (qkv.k, qkv.k_scale, qkv.k_mean, qkv.v, qkv.v_scale) if t is not None]


def _codes_buffers(qkv, n: int) -> tuple[list, list]:
    """Shapes and dtypes of ``_codes_fields`` for a block of ``n`` keys shaped like ``qkv``'s."""
    import math

    from ..quant.kv import V_BLOCK

    B, H, _, D = qkv.k.shape
    specs = [((B, H, n, D), qkv.k.dtype),
             ((B, H, n if qkv.k_block == 1 else math.ceil(n / qkv.k_block)), torch.float32)]
    if qkv.k_mean is not None:
        specs.append(((B, H, D), torch.float32))
    if qkv.quant.quantizes_pv:
        specs.append(((B, H, D, math.ceil(n / V_BLOCK) * V_BLOCK), qkv.v.dtype))
    else:
        specs.append(((B, H, n, D), qkv.v.dtype))
    if qkv.v_scale is not None:
        specs.append(((B, H, D), torch.float32))
    return [x[0] for x in specs], [x[1] for x in specs]


def _pieces(plan: RingPlan, rank: int) -> list[int]:
    """Key lengths of the pieces rank ``rank``'s block is quantised in: the whole block, or (causal)
    its two zig-zag chunks (a later rank needs the first one alone)."""
    n = plan.klens[rank]
    return [plan.k_first[rank], n - plan.k_first[rank]] if plan.causal else [n]


def _ring_codes(q, k, v, plan: RingPlan, out, lse) -> None:
    """Ring forward on quantised K/V: each rank quantises its K/V shard once (``qflash.quantize_kv``;
    causal: each of its two zig-zag chunks) and the codes, scales and K means travel instead of the
    input-dtype K/V (int8 K + fp8 V: about half the bytes). Fills ``out`` / ``lse`` in place.

    Causal steps (``_block``'s cases): src == r is the local causal attention on the input-dtype
    K/V (nothing travelled); src < r: all queries against src's first chunk; src > r: the second
    chunk of queries against both chunks (two calls, merged)."""
    import dataclasses

    from ..api import attention
    from ..prequant import quantize_kv

    r, P = rank_and_size(plan.group)
    sq = q.shape[2]
    bounds, a = [], 0
    for n in _pieces(plan, r):
        bounds.append((a, a + n))
        a += n
    mine = [quantize_kv(k[:, :, a:b].contiguous(), v[:, :, a:b].contiguous(), plan.quant) for a, b in bounds]
    names = ("k", "k_scale", "k_mean", "v", "v_scale")
    q2 = q[:, :, plan.q_first:].contiguous() if plan.causal else None
    cur = mine
    ring = RingExchange(plan.group)
    for step in range(P):
        src = (r - step) % P
        if step + 1 < P:
            shapes, dtypes = [], []
            for tmpl, n in zip(mine, _pieces(plan, (r - step - 1) % P)):
                sh, dt = _codes_buffers(tmpl, n)
                shapes += sh
                dtypes += dt
            ring.start([t for qkv in cur for t in _codes_fields(qkv)], shapes, dtypes)
        if not plan.causal or src < r:  # all queries against the block (non-causal) or its first chunk
            calls = [(slice(0, sq), q, cur[0])]
        elif src > r:
            calls = [(slice(plan.q_first, sq), q2, piece) for piece in cur]
        else:  # the diagonal block: local, in the input dtype
            o, part_lse = attention(q, k, v, quant=plan.quant, causal=True, scale=plan.scale, return_lse=True,
                                    backend=plan.backend)
            merge_into(out, lse, o, part_lse)
            calls = []
        for rows, qq, qkv in calls:
            if qq.shape[2] and qkv.k.shape[2]:
                o, part_lse = attention(qq, qkv, quant=plan.quant, scale=plan.scale, return_lse=True,
                                        backend=plan.backend)
                merge_into(out[:, :, rows], lse[:, :, rows], o, part_lse)
        if step + 1 < P:
            got = iter(ring.wait())
            cur = [dataclasses.replace(tmpl, **{nm: (next(got) if getattr(tmpl, nm) is not None else None)
                                               for nm in names}) for tmpl in mine]


def _block_grads_torch(q, k, v, dout, lse, delta, dlse, scale, diag):
    """fp32 gradients of one block given the global lse and delta = rowsum(dO ∘ O).

    q, dout (B, Hq, m, D); k, v (B, Hkv, n, D); lse, delta, dlse (B, Hq, m) (dlse may be None).
    Returns dq (B, Hq, m, D), dk, dv (B, Hkv, n, D), all fp32.
    """
    B, Hq, m, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qf, do = q.float(), dout.float()
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if diag:  # bottom-right causal, as qflash.attention aligns it
        i = torch.arange(m, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        s = s.masked_fill(j > i + (n - m), float("-inf"))
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - ref[..., None])
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    shift = delta if dlse is None else delta - dlse.float()
    ds = p * (dp - shift[..., None])
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    if g > 1:
        dk = dk.view(B, Hkv, g, n, D).sum(2)
        dv = dv.view(B, Hkv, g, n, dv.shape[-1]).sum(2)
    return dq, dk, dv


def _grad_family(plan: RingPlan, q, k):
    """The kernel family for the block gradients, or None for the PyTorch math."""
    from ..kernels import dispatch
    from ..spec import AttnSpec

    spec = AttnSpec.build("none", causal=False, scale=plan.scale, return_lse=True, backend=plan.backend)
    fam = dispatch.backward_family(spec, q, k, None)
    return None if fam is dispatch.REFERENCE else fam


def _block_grads(fam, plan, q, k, v, out, dout, lse, delta, dlse, diag):
    if fam is None:
        return _block_grads_torch(q, k, v, dout, lse, delta, dlse, plan.scale, diag)
    from ..spec import AttnSpec

    spec = AttnSpec.build("none", causal=diag, scale=plan.scale, return_lse=True, backend=fam.name)
    dq, dk, dv, _ = fam.backward(spec, q, k, v, out, lse.contiguous(), dout,
                                 None if dlse is None else dlse.contiguous(), None, mask_grad=False)
    return dq.float(), dk.float(), dv.float()


def _needs_recompute(plan: RingPlan, fam, dtype) -> bool:
    """Whether the backward first recomputes the exact global O and lse: as ``qflash.attention``
    decides (``qflash.autograd``), and always for quantised presets on the PyTorch path (the
    reference backward is exact, whatever the policy)."""
    from ..autograd import recompute
    from ..spec import AttnSpec

    spec = AttnSpec.build(plan.quant, bwd_recompute=plan.bwd_recompute)
    if not spec.quantized:
        return False
    return fam is None or recompute(spec, dtype)


def ring_backward(q, k, v, out, lse, dout, dlse, plan: RingPlan):
    """dq, dk, dv (like q, k, v) of the ring forward, with the K/V blocks and their dK/dV
    accumulators (fp32) going around the ring once more."""
    r, P = rank_and_size(plan.group)
    B, H, sq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    fam = _grad_family(plan, q, k)
    if _needs_recompute(plan, fam, q.dtype):
        from ..config import PRESETS

        out, lse = ring_forward(q, k, v, plan, quant=PRESETS["none"])
        out = out.to(q.dtype)
    delta = (dout.float() * out.float()).sum(-1)
    dq = torch.zeros((B, H, sq, D), dtype=torch.float32, device=q.device)
    dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    kv_ring, acc_ring = RingExchange(plan.group, 0), RingExchange(plan.group, 2)
    kb, vb = k, v
    for step in range(P):
        src = (r - step) % P
        nxt = plan.klens[(r - step - 1) % P]
        if step + 1 < P:
            kv_ring.start([kb, vb], [(B, Hkv, nxt, D), (B, Hkv, nxt, Dv)])
        blk = _block(plan, r, src, sq, kb.shape[2])
        grads = None
        if blk is not None:
            rows, cols, diag = blk
            grads = _block_grads(fam, plan, q[:, :, rows], kb[:, :, cols], vb[:, :, cols], out[:, :, rows],
                                 dout[:, :, rows], lse[:, :, rows], delta[:, :, rows],
                                 None if dlse is None else dlse[:, :, rows], diag)
        if step > 0:  # this block's accumulator, from the rank that held the block before
            dk_acc, dv_acc = acc_ring.wait()
        if grads is not None:
            dq[:, :, rows] += grads[0]
            dk_acc[:, :, cols] += grads[1]
            dv_acc[:, :, cols] += grads[2]
        if P > 1:  # pass it on; after the last step it reaches the block's owner
            acc_ring.start([dk_acc, dv_acc], [(B, Hkv, nxt, D), (B, Hkv, nxt, Dv)])
        if step + 1 < P:
            kb, vb = kv_ring.wait()
    if P > 1:
        dk_acc, dv_acc = acc_ring.wait()
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """``ring_forward`` with ``ring_backward`` as its gradient: (q, k, v, plan) -> (out, lse).

    out is in q's dtype, (B, Hq, sq, Dv) contiguous; lse fp32 (B, Hq, sq)."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = ring_forward(q, k, v, plan)
        out = out.to(q.dtype)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    @once_differentiable  # the collectives in the backward are not differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ring_backward(q, k, v, out, lse, dout, dlse, ctx.plan)
        return dq, dk, dv, None
