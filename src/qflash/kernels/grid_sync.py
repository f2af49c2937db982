"""A barrier between the programs of one launch that work on the same head (the cooperative
one-launch mode of the portable forward, ``attn_fwd``'s ``COOP``).

Why: a small quantised call is a quantiser launch and an attention launch, and at one wave of
programs the second launch's gap and the quantiser's own chain are most of the call (H200,
1x24x256x128 int8: the attention kernel alone 8.0 µs, the whole call 13.6). With a barrier, each
program quantises its share of its head's K tiles, publishes them, waits for the head's other
programs, then runs the attention loop on the codes: one launch, and no K tile quantised twice.

``head_barrier(sync, n)`` (device): the sense-reversing barrier. ``sync`` points at two int32
words of the head, (arrivals, generation). A program reads the generation, arrives (an
acquire-release add on the arrivals); the last of ``n`` arrivals resets the count to 0 and bumps
the generation (release); the others spin until the generation moves (acquire). The count is
0 again after every round, so the words need zeroing once, when the buffer is made, and never
between calls: a CUDA-graph replay or a recorded plan runs it as is. Triton issues a scalar
atomic from one thread of the program; the ``debug_barrier`` before it orders every thread's
stores of the tiles before that thread's release (the pattern of CUDA's grid sync), the one
after it every thread's loads after the acquire.

It needs every program of a head resident at once: ``launch`` uses it only for grids of at most
one program per SM (CTAs are dispatched in order, and a head's programs are consecutive in the
grid), and never under the CPU interpreter (which runs programs one after another; there the
launcher splits the kernel into its two phases, two launches).

``sync_words(device, n_heads)`` (host): the current stream's buffer of (arrivals, generation)
pairs, made with ``torch.zeros`` the first time a stream asks (recorded as a memset node if that
happens inside a CUDA-graph capture). One buffer per stream, as PyTorch keys cuBLAS workspaces:
launches on one stream run one after another, so two calls never share live counters. Two CUDA
graphs captured on the same stream and replayed at the same time on different streams would
share them (the same limit PyTorch's cuBLAS workspace has).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_HEADS", "head_barrier", "is_sync_buffer", "sync_words"]

#: (arrivals, generation) pairs per stream buffer: the cooperative mode runs at most one program
#: per SM, so B·Hkv stays far below this
MAX_HEADS = 4096

_BUFFERS: dict[tuple[int, int], torch.Tensor] = {}
_STORAGES: set[int] = set()


def sync_words(device: torch.device, n_heads: int) -> torch.Tensor:
    """(MAX_HEADS, 2) int32 zeros-initialised counters of the current stream on ``device``."""
    if n_heads > MAX_HEADS:
        raise ValueError(f"the cooperative mode keeps counters for at most {MAX_HEADS} heads, got {n_heads}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = torch.zeros((MAX_HEADS, 2), dtype=torch.int32, device=torch.device("cuda", index))
        _STORAGES.add(buf.untyped_storage().data_ptr())
    return buf


def is_sync_buffer(t: torch.Tensor) -> bool:
    """Whether ``t`` lives in a stream's counter buffer (a recorded plan resolves such a pointer
    to the replaying stream's buffer instead of copying it into its scratch)."""
    return t.untyped_storage().data_ptr() in _STORAGES


@triton.jit
def head_barrier(sync, n_arrivals):
    """Wait until ``n_arrivals`` programs (this one included) have called this on ``sync`` (a
    pointer to this head's (arrivals, generation) int32 pair); everything those programs stored
    before their call is visible to this one's loads after it."""
    gen_ptr = sync + 1
    gen = tl.atomic_add(gen_ptr, 0, sem="relaxed", scope="gpu")  # cannot move before this program arrives
    tl.debug_barrier()  # every thread's stores precede the arrival below
    old = tl.atomic_add(sync, 1, sem="acq_rel", scope="gpu")
    if old == n_arrivals - 1:
        tl.atomic_xchg(sync, 0, sem="relaxed", scope="gpu")  # the next round (the next call) starts at 0
        tl.atomic_add(gen_ptr, 1, sem="release", scope="gpu")
    else:
        cur = tl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu")
        while cur == gen:
            cur = tl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()  # every thread's loads follow the acquire
