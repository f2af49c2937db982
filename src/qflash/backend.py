"""Backend selection: the Triton kernels where they can run, the reference path elsewhere.

All functions take HND tensors (B, H, S, D) — possibly strided views of NHD inputs.
"""

from __future__ import annotations

import functools
import os

import torch

from .config import QuantConfig

__all__ = ["attention_forward", "triton_status", "kernels_usable"]


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(available, reason): whether Triton imports here, and why not if it doesn't."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, a debug switch)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and why not if they can't."""
    ok, why = triton_status()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, "cuda"
    if interpreter_enabled() and device.type == "cpu":
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    return False, f"the Triton kernels run on CUDA devices; this tensor is on {device.type}"


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: QuantConfig,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out_layout: str = "HND",
    backend: str = "auto",
):
    """Run attention on validated HND tensors; returns (out HND view in q's dtype, lse or None).

    ``backend``: "auto" (kernels on CUDA, else reference), "triton" or "reference".
    ``out_layout``: memory layout of the output ("NHD" writes a (B, S, H, D) buffer and returns
    its HND view), so callers in NHD get a contiguous result without a copy.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    use_kernels = backend == "triton" or (backend == "auto" and q.device.type == "cuda" and kernels_usable(q.device)[0])
    if use_kernels and backend == "auto":
        from .kernels.launch import kernel_support

        # configs the kernels do not implement (asymmetric, group scales, ...) run on the
        # reference path: correct, slower — never an error from "auto"
        use_kernels = kernel_support(cfg, q.shape[-1])[0]
    if use_kernels:
        from .kernels.launch import attention_fwd

        return attention_fwd(
            q, k, v, cfg, causal=causal, attn_mask=attn_mask, scale=scale, return_lse=return_lse, out_layout=out_layout
        )
    from .reference import fake_quant_attention

    res = fake_quant_attention(q, k, v, cfg, causal=causal, attn_mask=attn_mask, scale=scale, return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    if out_layout == "NHD":
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out, lse
