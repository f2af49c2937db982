"""The rows of a benchmark: each qflash preset and each full-precision baseline present.

An ``Impl`` builds a zero-argument callable for given inputs and names the context it must
run in (an SDPA backend restriction). A baseline that cannot run here (a backend without a
kernel for this device/shape, SageAttention without a GPU) is reported as skipped, with why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


@dataclass(frozen=True)
class Impl:
    """One row: ``name`` (e.g. "qflash int8", "sdpa", "sdpa FLASH_ATTENTION"), its ``kind``
    ("qflash" or "baseline"), ``preset`` (qflash only) and what it runs on (``backend``)."""

    name: str
    kind: str
    preset: str | None
    backend: str
    build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], Callable[[], torch.Tensor]]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # the backend of one shape's call (q, k, v) where it depends on the shape, else ``backend``
    backend_for: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], str] | None = None


def qflash_backend(preset: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel family that runs ``qflash.attention(q, k, v, quant=preset)``: the dispatcher's
    pick, or "hopper>portable" where the Hopper family hands a small call to the portable one."""
    from ..kernels import dispatch
    from ..spec import AttnSpec

    family = dispatch.select(AttnSpec.build(preset), q, k, v, None)
    hands_off = getattr(family, "hands_off", None)
    return f"{family.name}>portable" if hands_off is not None and hands_off(q, k) else family.name


def _qflash(preset: str, device: torch.device) -> Impl:
    """``backend``: the kernel family the dispatcher picks for this preset at head dim 128 (a
    row's own backend comes from ``qflash_backend`` on its inputs)."""
    from .. import attention
    from ..kernels import dispatch
    from ..spec import AttnSpec

    probe = torch.empty((1, 1, 1, 128), dtype=torch.bfloat16, device=device)
    backend = dispatch.select(AttnSpec.build(preset), probe, probe, probe, None).name
    return Impl(f"qflash {preset}", "qflash", preset, backend,
                lambda q, k, v, c: (lambda: attention(q, k, v, quant=preset, causal=c)),
                backend_for=lambda q, k, v: qflash_backend(preset, q, k, v))


def _sdpa(backend: str | None) -> Impl:
    build = lambda q, k, v, c: (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=c))
    if backend is None:
        return Impl("sdpa", "baseline", None, "torch default", build)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return Impl(f"sdpa {backend}", "baseline", None, f"torch {backend}", build,
                lambda: sdpa_kernel(getattr(SDPBackend, backend)))


def _sage(device: torch.device) -> list[Impl]:
    if device.type != "cuda":
        return []
    try:
        import sageattention as sa
    except Exception:
        return []
    out = []
    # the Hopper kernel by name where it exists (the peer issue 3 measures), else the dispatcher
    names = ("sageattn_qk_int8_pv_fp8_cuda_sm90",) if hasattr(sa, "sageattn_qk_int8_pv_fp8_cuda_sm90") else ("sageattn",)
    for fname in names:
        f = getattr(sa, fname, None)
        if f is not None:
            out.append(Impl(f"sageattention {fname}", "baseline", None, "sageattention",
                            lambda q, k, v, c, f=f: (lambda: f(q, k, v, tensor_layout="HND", is_causal=c))))
    return out


def build_impls(presets: list[str], device: torch.device) -> list[Impl]:
    """qflash presets first, then SDPA default (the speed-up baseline), its backends, SageAttention."""
    return ([_qflash(p, device) for p in presets] + [_sdpa(None)] + [_sdpa(b) for b in SDPA_BACKENDS]
            + _sage(device))
