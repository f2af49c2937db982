"""Error metrics, and the exact reference they are measured against.

Reference policy (``exact_reference``), recorded in every output next to the numbers:

- ``fp64``: ``qflash.reference.exact_attention`` in float64 on the CPU, one (batch, head) at a
  time. Used when each head's score matrix is small (S <= ``FP64_MAX_SEQ``) — every CPU run and
  the small GPU shapes.
- ``fp32-chunked``: softmax(q·kᵀ·scale)·v in float32 on the inputs' device with TF32 disabled,
  one head and ``CHUNK`` queries at a time (exact softmax per query row; nothing is tiled along
  keys). Used for the big GPU shapes, where fp64 would take minutes. Its own error is ~1e-6
  relative, far below the bf16 output rounding (~2e-3) it is used to measure.

``heads`` (``--ref-heads N``) limits the reference, and so the error metrics, to the first N
heads of each batch element; the record says which.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..reference import exact_attention

FP64_MAX_SEQ = 4096
CHUNK = 4096


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """rel_l2, rel_l1, cosine, max_abs (float64 arithmetic) and nonfinite (count) of out vs ref."""
    o = out.detach().to(torch.float64)
    r = ref.detach().to(device=o.device, dtype=torch.float64)
    nonfinite = int((~torch.isfinite(o)).sum().item())
    d = o - r
    rn2 = torch.linalg.vector_norm(r).item()
    rn1 = r.abs().sum().item()
    on2 = torch.linalg.vector_norm(o).item()
    dot = (o * r).sum().item()
    return {
        "rel_l2": torch.linalg.vector_norm(d).item() / rn2 if rn2 else math.nan,
        "rel_l1": d.abs().sum().item() / rn1 if rn1 else math.nan,
        "cosine": dot / (on2 * rn2) if on2 and rn2 else math.nan,
        "max_abs": d.abs().max().item() if d.numel() else 0.0,
        "nonfinite": nonfinite,
    }


@contextlib.contextmanager
def _ieee_fp32():
    """Disable TF32 in CUDA matmuls for the duration (the reference must be real fp32)."""
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    m.fp32_precision = "ieee"
    try:
        yield
    finally:
        m.fp32_precision = old


def _chunked_fp32(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Exact attention of one head, q/k/v (S, D), fp32, CHUNK query rows at a time."""
    S = q.shape[0]
    kf, vf = k.float(), v.float()
    out = torch.empty(S, v.shape[-1], dtype=torch.float32, device=q.device)
    cols = torch.arange(k.shape[0], device=q.device)
    for i0 in range(0, S, CHUNK):
        s = (q[i0:i0 + CHUNK].float() @ kf.T) * scale
        if causal:
            rows = torch.arange(i0, min(i0 + CHUNK, S), device=q.device)
            s.masked_fill_(cols[None, :] > rows[:, None] + (k.shape[0] - S), float("-inf"))
        out[i0:i0 + CHUNK] = torch.softmax(s, dim=-1) @ vf
    return out


def exact_reference(q, k, v, *, causal: bool, heads: int = 0, method: str = "auto") -> tuple[torch.Tensor, dict]:
    """Exact attention of HND q, k, v (same head count) for the first ``heads`` heads (0: all).

    Returns ``(ref, info)``: ``ref`` is (B, h, S, D) float64 (method fp64, on the CPU) or float32
    (fp32-chunked, on q's device); ``info`` = {"method", "heads", "device"} for the record.
    """
    B, H, S, D = q.shape
    h = H if heads <= 0 else min(heads, H)
    if method == "auto":
        method = "fp64" if S <= FP64_MAX_SEQ else "fp32-chunked"
    scale = 1.0 / math.sqrt(D)
    if method == "fp64":
        ref = torch.empty(B, h, S, v.shape[-1], dtype=torch.float64)
        for b in range(B):
            for i in range(h):
                sl = (slice(b, b + 1), slice(i, i + 1))
                ref[sl] = _exact64(q[sl], k[sl], v[sl], causal)
        dev = "cpu"
    elif method == "fp32-chunked":
        ref = torch.empty(B, h, S, v.shape[-1], dtype=torch.float32, device=q.device)
        with _ieee_fp32():
            for b in range(B):
                for i in range(h):
                    ref[b, i] = _chunked_fp32(q[b, i], k[b, i], v[b, i], causal, scale)
        dev = str(q.device)
    else:
        raise ValueError(f"method must be 'auto', 'fp64' or 'fp32-chunked', got {method!r}")
    return ref, {"method": method, "heads": h, "device": dev}


def _exact64(q, k, v, causal: bool) -> torch.Tensor:
    """fp64 exact attention of a (1, 1, S, D) slice on the CPU, kept in fp64 (not cast back)."""
    return exact_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), causal=causal)
