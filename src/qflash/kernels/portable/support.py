"""What the portable Triton family runs (data), and the config check a table cannot express.

Imports no Triton: ``qflash info`` and the dispatcher read it on machines without a GPU.
"""

from __future__ import annotations

from ...config import GranularityKind, QuantConfig
from ..family import FamilySupport

__all__ = ["SUPPORT", "kernel_support"]

SUPPORT = FamilySupport(
    devices=frozenset({"cuda"}),
    interpreter=True,  # TRITON_INTERPRET=1 on the CPU, when named explicitly (tests)
    head_dims=(1, 256),
    backward=True,
    notes="any CUDA GPU Triton supports; symmetric token/block Q/K scales, channel(N) V scales",
)


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


_SUPPORTED: dict[tuple[int, int], tuple[QuantConfig, tuple[bool, str]]] = {}


def kernel_support(cfg: QuantConfig, head_dim: int) -> tuple[bool, str]:
    """Whether the Triton kernels implement ``cfg`` at this head dim; the reason when not.

    Unsupported configs run on the reference path (correct, slower), never approximately.
    Cached by the config's identity (the entry keeps the config alive; hashing a nested frozen
    dataclass on every call costs microseconds).
    """
    hit = _SUPPORTED.get((id(cfg), head_dim))
    if hit is not None and hit[0] is cfg:
        return hit[1]
    res = _kernel_support(cfg, head_dim)
    if len(_SUPPORTED) >= 1024:
        _SUPPORTED.clear()
    _SUPPORTED[(id(cfg), head_dim)] = (cfg, res)
    return res


def _kernel_support(cfg: QuantConfig, head_dim: int) -> tuple[bool, str]:
    """Whether the Triton kernels implement ``cfg`` at this head dim; the reason when not.

    Unsupported configs run on the reference path (correct, slower), never approximately.
    """
    if head_dim > 256:
        return False, f"head dim {head_dim} > 256"
    if cfg.quantizes_qk:
        for name, op in (("q", cfg.q), ("k", cfg.k)):
            if op.strategy.value != "symmetric":
                return False, f"{name}: the kernels implement the symmetric strategy only"
            g = op.granularity
            if g.kind not in (GranularityKind.TOKEN, GranularityKind.BLOCK):
                return False, f"{name}: granularity {g} (kernels: token or block of 2^n tokens)"
            if g.kind is GranularityKind.BLOCK and not (_pow2(g.size) and 16 <= g.size <= 256):
                return False, f"{name}: block size {g.size} (kernels: a power of two in 16..256)"
        if cfg.smooth_q:
            if not (_pow2(cfg.q_mean_block) and 16 <= cfg.q_mean_block <= 256):
                return False, f"q_mean_block {cfg.q_mean_block} (kernels: a power of two in 16..256)"
            g = cfg.q.granularity
            if g.kind is GranularityKind.BLOCK and g.size != cfg.q_mean_block:
                return False, "smooth_q with block scales needs q block size == q_mean_block"
    if cfg.quantizes_pv:
        g = cfg.v.granularity
        if g.kind is not GranularityKind.CHANNEL or not (g.size == 0 or (_pow2(g.size) and 16 <= g.size <= 256)):
            return False, f"v: granularity {g} (kernels: channel(0) or channel(N), N a power of two in 16..256)"
        if g.size == 0 and (cfg.smooth_v or cfg.v.strategy.value != "symmetric"):
            return False, "v: channel(0) (kernels: symmetric and not smoothed)"
    return True, ""


