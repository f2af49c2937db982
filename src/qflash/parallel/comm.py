"""Communication for sequence parallelism: process-group helpers, the per-call rank check, the
Ulysses all-to-all, the ring exchange and the sequence redistribution (zig-zag), all on
``torch.distributed`` (NCCL on GPUs, gloo on CPUs; nothing home-made, no multicast APIs).

Tensors are HND, ``(B, H, S, D)``: the sequence is dim 2. ``lens`` lists every rank's local
sequence length in group-rank order; a rank's shard covers ``[sum(lens[:r]), sum(lens[:r+1]))``
of the global sequence.

Every function here is collective: all ranks of ``group`` call it with the same ``lens``.
"""

from __future__ import annotations

import struct
import zlib

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "HeadsToSeq",
    "Redistribute",
    "RingExchange",
    "SeqToHeads",
    "check_ranks",
    "hybrid_groups",
    "rank_and_size",
    "zigzag_intervals",
]


def rank_and_size(group) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); ``group=None`` is the default group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("qflash.parallel needs torch.distributed initialised (dist.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _meta_device(group, t) -> torch.device:
    """Where a small collective's tensor must live for ``group``'s backend (NCCL: a GPU; ``t``'s if
    it is a CUDA tensor, else the current one)."""
    if "nccl" not in str(dist.get_backend(group)).lower():
        return torch.device("cpu")
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return t.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# the per-call check
# --------------------------------------------------------------------------------------------

# Fields of the metadata row each rank contributes; the last two (sequence lengths) may differ.
_FIELDS = ("batch", "q heads", "kv heads", "head dim", "dtype", "layout", "causal", "mode", "quant",
           "scale", "ulysses_size", "return_lse", "ring_kv", "q length", "k length")
_SAME = len(_FIELDS) - 2


def _code(s: str) -> int:
    return zlib.crc32(s.encode())


def check_ranks(group, q, meta: dict | None, sq: int, sk: int,
                error: Exception | None = None) -> tuple[list[int], list[int]]:
    """One ``all_gather`` of a 16-int64 row per rank, then the same outcome on every rank.

    ``error``: this rank's own input error (``meta`` may then be None): it still takes part in
    the gather, then raises it, and every other rank raises a ValueError naming it — so a bad
    input on one rank stops all of them instead of leaving the others in a collective.
    Otherwise raises a ValueError if any field but the sequence lengths differs between ranks,
    and returns every rank's (q lengths, k lengths).

    ``meta``: batch, heads, head dim, dtype, layout, causal, mode, quant key, scale, ulysses_size,
    return_lse, ring_kv (the scale compares its float64 bits). Not checked: strides, devices, the values.
    """
    if meta is None:
        row = [0] * len(_FIELDS)
    else:
        row = [meta["batch"], meta["hq"], meta["hkv"], meta["d"], _code(str(meta["dtype"])), _code(meta["layout"]),
               int(meta["causal"]), _code(meta["mode"]), _code(meta["quant"]),
               struct.unpack("<q", struct.pack("<d", float(meta["scale"])))[0], int(meta["ulysses_size"] or 0),
               int(meta["return_lse"]), _code(meta["ring_kv"]), sq, sk]
    row = [int(error is not None), *row]
    r, P = rank_and_size(group)
    mine = torch.tensor(row, dtype=torch.int64, device=_meta_device(group, q))
    rows = torch.empty(P * len(row), dtype=torch.int64, device=mine.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(rows, mine, group=group)
    table = [t[1:] for t in rows.view(P, len(row)).tolist()]
    failed = [i for i, t in enumerate(rows.view(P, len(row))[:, 0].tolist()) if t]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"qflash.parallel.attention: rank(s) {failed} of the group rejected their inputs (their "
                         f"error says why); this is rank {r}, stopping with them")
    bad = [i for i in range(_SAME) if len({t[i] for t in table}) > 1]
    if bad:
        raise ValueError(
            "qflash.parallel.attention: ranks disagree on "
            + ", ".join(_FIELDS[i] for i in bad)
            + f" (this is rank {r}; every rank must pass the same batch, heads, head dim, "
            "dtype, layout and options, only the sequence length of its shard may differ)"
        )
    return [t[-2] for t in table], [t[-1] for t in table]


# --------------------------------------------------------------------------------------------
# Ulysses all-to-all: (B, H, s_r, D) local sequence, all heads  <->  (B, H/P, S, D) all sequence, H/P heads
# --------------------------------------------------------------------------------------------


def _seq_to_heads(x: torch.Tensor, group, lens: list[int]) -> torch.Tensor:
    """(B, H, lens[r], D) -> (B, H/P, sum(lens), D): head slice r of the whole sequence."""
    _, P = rank_and_size(group)
    B, H, s, D = x.shape
    hp = H // P
    send = x.reshape(B, P, hp, s, D).transpose(0, 1).contiguous()  # (P, B, hp, s, D): one chunk per peer
    if P == 1:
        return send[0]
    recv = x.new_empty(B * hp * sum(lens) * D)
    dist.all_to_all_single(recv, send.view(-1), output_split_sizes=[B * hp * n * D for n in lens],
                           input_split_sizes=[B * hp * s * D] * P, group=group)
    if len(set(lens)) == 1:
        return recv.view(P, B, hp, s, D).permute(1, 2, 0, 3, 4).reshape(B, hp, P * s, D)
    parts = recv.split([B * hp * n * D for n in lens])
    return torch.cat([p.view(B, hp, n, D) for p, n in zip(parts, lens)], dim=2)


def _heads_to_seq(y: torch.Tensor, group, lens: list[int], nhd: bool = False) -> torch.Tensor:
    """(B, H/P, sum(lens), D) -> (B, H, lens[r], D); inverse of ``_seq_to_heads``. ``nhd``: the
    result is the HND view of a contiguous (B, lens[r], H, D) buffer (what NHD callers want),
    else contiguous HND."""
    r, P = rank_and_size(group)
    B, hp, _, D = y.shape
    s = lens[r]
    if P == 1:
        return y.transpose(1, 2).contiguous().transpose(1, 2) if nhd else y.contiguous()
    send = torch.cat([c.reshape(-1) for c in y.split(lens, dim=2)]) if len(set(lens)) > 1 else \
        y.reshape(B, hp, P, s, D).permute(2, 0, 1, 3, 4).reshape(-1)
    recv = y.new_empty(P * B * hp * s * D)
    dist.all_to_all_single(recv, send, output_split_sizes=[B * hp * s * D] * P,
                           input_split_sizes=[B * hp * n * D for n in lens], group=group)
    chunks = recv.view(P, B, hp, s, D)  # from peer j: its head slice j of my shard
    if nhd:
        return chunks.permute(1, 3, 0, 2, 4).reshape(B, s, P * hp, D).transpose(1, 2)
    return chunks.transpose(0, 1).reshape(B, P * hp, s, D)


class SeqToHeads(torch.autograd.Function):
    """Differentiable ``_seq_to_heads``: its gradient is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, lens):
        ctx.group, ctx.lens = group, lens
        return _seq_to_heads(x, group, lens)

    @staticmethod
    @once_differentiable  # the collectives in the backward are not differentiable
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group, ctx.lens), None, None


class HeadsToSeq(torch.autograd.Function):
    """Differentiable ``_heads_to_seq``: its gradient is the forward all-to-all."""

    @staticmethod
    def forward(ctx, y, group, lens, nhd=False):
        ctx.group, ctx.lens = group, lens
        return _heads_to_seq(y, group, lens, nhd)

    @staticmethod
    @once_differentiable  # the collectives in the backward are not differentiable
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group, ctx.lens), None, None, None


# --------------------------------------------------------------------------------------------
# sequence redistribution (contiguous shards <-> zig-zag chunks)
# --------------------------------------------------------------------------------------------


def zigzag_intervals(total: int, P: int) -> list[list[tuple[int, int]]]:
    """Rank r's zig-zag share of a sequence of ``total`` tokens: chunks r and 2P-1-r of 2P
    near-equal chunks (``[c·total // 2P, (c+1)·total // 2P)``), so that causal work is balanced."""
    b = [c * total // (2 * P) for c in range(2 * P + 1)]
    return [[(b[r], b[r + 1]), (b[2 * P - 1 - r], b[2 * P - r])] for r in range(P)]


def contiguous_intervals(lens: list[int]) -> list[list[tuple[int, int]]]:
    offs = [sum(lens[:i]) for i in range(len(lens) + 1)]
    return [[(offs[i], offs[i + 1])] for i in range(len(lens))]


def _pieces(src: list[tuple[int, int]], dst: list[tuple[int, int]]):
    """Overlaps of a sender's intervals with a receiver's: (a, b, offset in sender, offset in receiver)."""
    out = []
    dst_off = 0
    for da, db in dst:
        src_off = 0
        for sa, sb in src:
            a, b = max(sa, da), min(sb, db)
            if a < b:
                out.append((a, b, src_off + a - sa, dst_off + a - da))
            src_off += sb - sa
        dst_off += db - da
    return out


def _redistribute(x: torch.Tensor, group, src: list, dst: list) -> torch.Tensor:
    """Move the sequence (dim 2) of ``x`` from layout ``src`` to ``dst`` (per rank interval lists)."""
    r, P = rank_and_size(group)
    B, H, _, D = x.shape
    out = x.new_empty((B, H, sum(b - a for a, b in dst[r]), D))
    ops, recvs = [], []
    for peer in range(P):
        for tag, (a, b, so, do) in enumerate(_pieces(src[r], dst[peer])):
            if peer == r:
                out[:, :, do:do + b - a] = x[:, :, so:so + b - a]
            else:
                ops.append(dist.P2POp(dist.isend, x[:, :, so:so + b - a].contiguous(), _global(group, peer),
                                      group, tag))
        if peer != r:
            for tag, (a, b, so, do) in enumerate(_pieces(src[peer], dst[r])):
                buf = x.new_empty((B, H, b - a, D))
                ops.append(dist.P2POp(dist.irecv, buf, _global(group, peer), group, tag))
                recvs.append((buf, do))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for buf, do in recvs:
        out[:, :, do:do + buf.shape[2]] = buf
    return out


class Redistribute(torch.autograd.Function):
    """Differentiable ``_redistribute``: the gradient moves back from ``dst`` to ``src``."""

    @staticmethod
    def forward(ctx, x, group, src, dst):
        ctx.group, ctx.src, ctx.dst = group, src, dst
        return _redistribute(x, group, src, dst)

    @staticmethod
    @once_differentiable  # the collectives in the backward are not differentiable
    def backward(ctx, g):
        return _redistribute(g.contiguous(), ctx.group, ctx.dst, ctx.src), None, None, None


# --------------------------------------------------------------------------------------------
# the ring
# --------------------------------------------------------------------------------------------


class RingExchange:
    """One step of the ring: send tensors to rank r+1 and receive same-shaped ones from r-1,
    asynchronously (``batch_isend_irecv``), so the caller computes while they travel.

    ``start(tensors, shapes, dtypes=None)`` posts the sends of ``tensors`` and the receives of fresh
    buffers of ``shapes`` (``dtypes``: one per buffer, default the first tensor's; its device);
    ``wait()`` returns the received buffers.
    Empty tensors are not sent (both sides skip them, they know the lengths).
    """

    def __init__(self, group, tag0: int = 0):
        self.group, self.tag0 = group, tag0  # distinct tags keep two concurrent rings apart (gloo)
        r, P = rank_and_size(group)
        self.next, self.prev = _global(group, (r + 1) % P), _global(group, (r - 1) % P)
        self._reqs, self._bufs = [], []

    def start(self, tensors, shapes, dtypes=None):
        t0 = tensors[0]
        dtypes = dtypes or [t0.dtype] * len(shapes)
        self._bufs = [torch.empty(s, dtype=dt, device=t0.device) for s, dt in zip(shapes, dtypes)]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, self.tag0 + i)
               for i, t in enumerate(tensors) if t.numel()]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group, self.tag0 + i)
                for i, b in enumerate(self._bufs) if b.numel()]
        self._reqs = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> list[torch.Tensor]:
        for req in self._reqs:
            req.wait()
        self._reqs = []
        return self._bufs


# --------------------------------------------------------------------------------------------
# hybrid sub-groups
# --------------------------------------------------------------------------------------------

_HYBRID: dict[tuple, tuple] = {}


def hybrid_groups(group, ulysses_size: int):
    """(Ulysses group, ring group) of this rank for ``ulysses_size`` consecutive ranks per Ulysses
    group: group-rank ``g·U + u`` is in Ulysses group ``g`` (ranks g·U .. g·U+U-1) and ring group
    ``u`` (ranks u, U+u, 2U+u, ...). Built once per (group ranks, backend, U) and cached.

    ``group`` None (the default group): every process creates every sub-group, in one order
    (``dist.new_group``'s rule), so the first call is collective over the default group. Another
    group: each member creates only its two sub-groups, synchronised among their members
    (``use_local_synchronization``), so processes outside ``group`` are not involved.
    """
    r, P = rank_and_size(group)
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(P))
    backend = dist.get_backend(group)
    key = (ranks, str(backend), ulysses_size)
    if key not in _HYBRID:
        U, R = ulysses_size, P // ulysses_size
        members = [[ranks[g * U + u] for u in range(U)] for g in range(R)]  # the Ulysses groups
        members += [[ranks[g * U + u] for g in range(R)] for u in range(U)]  # then the ring groups
        mine = (r // U, R + r % U)
        if group is None:
            made = [dist.new_group(m, backend=backend) for m in members]
            _HYBRID[key] = (made[mine[0]], made[mine[1]])
        else:  # Ulysses groups first on every rank: no two members wait on each other in a cycle
            _HYBRID[key] = tuple(dist.new_group(members[i], backend=backend, use_local_synchronization=True)
                                 for i in mine)
    return _HYBRID[key]
