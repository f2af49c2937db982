"""``QuantizedKV``: keys and values already in an attention preset's quantised format.

``qflash.quantize_kv(k, v, quant=...)`` (or a fused pre-attention kernel such as
``qflash.fused.qkv_prologue``) produces one; ``qflash.attention(q, qkv)`` consumes it, so K and
V are quantised once (e.g. reused by several query batches, or written directly by the kernel
that computes them) instead of inside every attention call.

Operands (``B`` batch, ``H`` key/value heads, ``S`` keys, ``D`` head dim):

==========  ============================  ==========  ==============================================
field       shape                         dtype       notes
==========  ============================  ==========  ==============================================
k           (B, H, S, D)                  int8 / f8   codes of ``k - k_mean`` (smooth_k) or of ``k``
k_scale     (B, H, S) per token, or       fp32        ``k ≈ codes · scale``; K granularity token or
            (B, H, ceil(S / n)) block(n)              block(n) (the preset's)
k_mean      (B, H, D) or None             fp32        the subtracted token mean (smooth_k): only the
                                                      log-sum-exp needs it (softmax is invariant)
v (P·V      (B, H, D, S_pad)              fp8 e4m3    Vᵀ codes, keys contiguous, zero past S,
 in fp8)                                              S_pad = ceil(S / 128)·128; ``v_order``
                                                      "hopper": keys of each 32-key chunk in the
                                                      Hopper kernel's P-operand order
v (P·V in   (B, H, S, D)                  k's input   the values, unquantised (the ``int8`` preset)
 float)                                   dtype
v_scale     (B, H, D) or None             fp32        one FP8 scale per channel over all keys
==========  ============================  ==========  ==============================================

The codes are ``qflash.quant.core``'s arithmetic, so ``qflash.reference`` reproduces attention
on them exactly (``dequantized``). Supported configs (``unsupported_reason``): Q/K INT8 or FP8
symmetric, K per token or per block, no Q or V smoothing, V in float or FP8 with one scale per
channel over all keys — the ``int8``, ``int8-fp8`` and ``fp8`` presets. ``int4`` (Q smoothing's
bias restoration reads unquantised K) and ``none`` (nothing to quantise) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import GranularityKind, Precision, QuantConfig, Strategy
from .core import QuantizedTensor, dequantize, quantize, token_mean

__all__ = ["QuantizedKV", "V_BLOCK", "V_ORDERS", "hopper_key_order", "quantize_kv_reference", "unsupported_reason"]

V_BLOCK = 128  # Vᵀ is padded to a multiple of this many keys (the families' key tiles divide it)
V_ORDERS = ("keys", "hopper")


def unsupported_reason(cfg: QuantConfig) -> str | None:
    """None if ``cfg``'s K/V can be pre-quantised into a ``QuantizedKV``, else why not."""
    if not cfg.quantizes_qk:
        return f"quant {cfg.name!r} does not quantise Q·K (nothing to pre-quantise)"
    k = cfg.k
    if k.precision not in (Precision.INT8, Precision.FP8_E4M3):
        return f"K precision {k.precision.value} (pre-quantised K: int8 or fp8_e4m3)"
    if k.strategy is not Strategy.SYMMETRIC or cfg.q.strategy is not Strategy.SYMMETRIC:
        return "asymmetric Q/K (pre-quantised K: symmetric)"
    if k.granularity.kind not in (GranularityKind.TOKEN, GranularityKind.BLOCK):
        return f"K granularity {k.granularity} (pre-quantised K: token or block(n))"
    if cfg.smooth_q:
        return "smooth_q (its bias restoration reads the unquantised K)"
    if cfg.smooth_v:
        return "smooth_v"
    if cfg.quantizes_pv and (cfg.v.granularity.kind is not GranularityKind.CHANNEL or cfg.v.granularity.size):
        return f"V granularity {cfg.v.granularity} (pre-quantised V: channel(0), one scale per channel)"
    return None


def hopper_key_order(n: int, device=None) -> torch.Tensor:
    """Column of each key in the "hopper" Vᵀ order: key 32a+16h+8i+2q+e sits at column
    32a+16h+4q+2i+e (``n`` a multiple of 32). ``vt_hopper[..., col] = vt_keys``."""
    k = torch.arange(n, device=device)
    r = k % 32
    return k - r + (r // 16) * 16 + ((r % 8) // 2) * 4 + ((r % 16) // 8) * 2 + r % 2


@dataclass(frozen=True, eq=False)
class QuantizedKV:
    """Pre-quantised keys and values (fields and shapes: the module docstring).

    Build one with ``qflash.quantize_kv``; pass it as ``k`` to ``qflash.attention(q, qkv)``.
    Immutable; ``eq=False``: compared by identity (it holds tensors).
    """

    quant: QuantConfig
    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor | None
    v: torch.Tensor
    v_scale: torch.Tensor | None
    v_order: str
    dtype: torch.dtype

    def __post_init__(self):
        why = unsupported_reason(self.quant)
        if why is not None:
            raise ValueError(f"QuantizedKV: {why}")
        if self.v_order not in V_ORDERS:
            raise ValueError(f"QuantizedKV: v_order must be one of {V_ORDERS}, got {self.v_order!r}")
        k = self.k
        want = torch.int8 if self.quant.k.precision is Precision.INT8 else torch.float8_e4m3fn
        if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.dtype != want:
            raise ValueError(f"QuantizedKV.k must be (B, H, S, D) {want} codes, got "
                             f"{getattr(k, 'dtype', type(k).__name__)} {tuple(getattr(k, 'shape', ()))}")
        B, H, S, D = k.shape
        nk = S if self.quant.k.granularity.kind is GranularityKind.TOKEN else math.ceil(S / self.quant.k.granularity.size)
        self._check("k_scale", self.k_scale, (B, H, nk), torch.float32)
        if self.quant.smooth_k:
            self._check("k_mean", self.k_mean, (B, H, D), torch.float32)
        elif self.k_mean is not None:
            raise ValueError("QuantizedKV.k_mean must be None when the config does not smooth K")
        if self.quant.quantizes_pv:
            self._check("v", self.v, (B, H, D, self.padded_keys), torch.float8_e4m3fn)
            self._check("v_scale", self.v_scale, (B, H, D), torch.float32)
        else:
            self._check("v", self.v, (B, H, S, D), self.dtype)
            if self.v_scale is not None:
                raise ValueError("QuantizedKV.v_scale must be None when V is not quantised")
            if self.v_order != "keys":
                raise ValueError("QuantizedKV: unquantised V has no 'hopper' order")

    def _check(self, name, t, shape, dtype):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"QuantizedKV.{name} must be {dtype} {tuple(shape)}, got {got}")
        if t.device != self.k.device:
            raise ValueError(f"QuantizedKV.{name} is on {t.device}, k on {self.k.device}: one device expected")

    # --- shape helpers --------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """(B, H, S, D) of the keys (HND)."""
        return self.k.shape

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def padded_keys(self) -> int:
        return math.ceil(self.k.shape[2] / V_BLOCK) * V_BLOCK

    @property
    def k_block(self) -> int:
        """Keys sharing one K scale: 1 (per token) or the block size."""
        g = self.quant.k.granularity
        return 1 if g.kind is GranularityKind.TOKEN else g.size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.k_scale, self.k_mean, self.v, self.v_scale)
                   if t is not None)

    def __repr__(self) -> str:
        B, H, S, D = self.shape
        return (f"QuantizedKV(quant={self.quant.name!r}, B={B}, H={H}, S={S}, D={D}, v_order={self.v_order!r}, "
                f"dtype={self.dtype}, device={self.device})")

    # --- views for consumers ---------------------------------------------------------------------
    def vt_in_key_order(self) -> torch.Tensor:
        """Vᵀ codes (B, H, D, S_pad) with keys in plain order (a gather when ``v_order`` is "hopper")."""
        if not self.quant.quantizes_pv:
            raise ValueError("vt_in_key_order: V is not quantised in this QuantizedKV")
        if self.v_order == "keys":
            return self.v
        col = hopper_key_order(self.v.shape[-1], self.v.device)
        return self.v.view(torch.uint8)[..., col].view(torch.float8_e4m3fn)

    def k_tensor(self) -> QuantizedTensor:
        """K's codes and scales as a ``QuantizedTensor`` (of ``k - k_mean`` when smoothed)."""
        return QuantizedTensor(self.k, self.k_scale, None, self.quant.k.precision, self.quant.k.granularity,
                               Strategy.SYMMETRIC, self.k.shape, self.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32):
        """Fake-quant values: (k_hat = codes·scale (+ k_mean), v_hat) in ``dtype``, each (B, H, S, D)."""
        k_hat = dequantize(self.k_tensor(), torch.float32)
        if self.k_mean is not None:
            k_hat = k_hat + self.k_mean[:, :, None, :]
        if self.quant.quantizes_pv:
            S = self.seq_len
            v_hat = self.vt_in_key_order()[..., :S].transpose(-1, -2).float() * self.v_scale[:, :, None, :]
        else:
            v_hat = self.v.float()
        return k_hat.to(dtype), v_hat.to(dtype)


def quantize_kv_reference(k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, v_order: str = "keys") -> QuantizedKV:
    """``QuantizedKV`` of HND k, v (B, H, S, D) in pure PyTorch: exactly the codes and scales
    ``qflash.reference.fake_quant_attention`` quantises K and V to (any device)."""
    why = unsupported_reason(cfg)
    if why is not None:
        raise ValueError(f"quantize_kv: {why}")
    B, H, S, D = k.shape
    kf = k.float()
    k_mean = token_mean(kf) if cfg.smooth_k else None  # (B, H, 1, D)
    if k_mean is not None and S == 0:
        k_mean = kf.new_zeros(B, H, 1, D)
    kq = quantize(kf - k_mean if k_mean is not None else kf, cfg.k)
    if cfg.quantizes_pv:
        vq = quantize(v.float(), cfg.v)  # channel(0): scale (B, H, 1, D)
        s_pad = math.ceil(S / V_BLOCK) * V_BLOCK
        vt = torch.zeros(B, H, D, s_pad, dtype=torch.float8_e4m3fn, device=k.device)
        vt[..., :S] = vq.data.transpose(-1, -2)
        if v_order == "hopper":
            out = torch.empty_like(vt)
            out.view(torch.uint8)[..., hopper_key_order(s_pad, k.device)] = vt.view(torch.uint8)
            vt = out
        v_scale = vq.scale.reshape(B, H, D) if S else torch.full((B, H, D), 1 / 448.0, device=k.device)
        vv = vt
    else:
        vv, v_scale = v.contiguous(), None
        v_order = "keys"
    k_scale = kq.scale.reshape(B, H, -1)
    return QuantizedKV(cfg, kq.data, k_scale, k_mean.reshape(B, H, D) if k_mean is not None else None, vv, v_scale,
                       v_order, k.dtype)
