"""Quantise and dequantise tensors in pure PyTorch (any device, no host synchronisation).

This is the definition of every code and scale the Triton kernels produce: the fused Triton
quantiser (``qflash.quant.fused``) must agree with these functions, and the fake-quant reference
uses them. Arithmetic is fp32 throughout:

- symmetric:  ``inv = qmax / amax``; ``code = clamp(round_half_even(x * inv), -qmax, qmax)``;
  ``scale = amax / qmax``; ``x ≈ code * scale``. An all-zero group gets ``amax = 1`` (any
  scale reproduces zeros), so no scale is ever 0; a group holding a NaN gets a NaN scale (never
  finite codes that would hide it), one holding an Inf an Inf scale.
- asymmetric: ``scale = (max - min) / (hi - lo)``; ``zero = round(lo - min / scale)``;
  ``code = clamp(round(x / scale) + zero, lo, hi)``; ``x ≈ (code - zero) * scale``.
- fp8 e4m3: symmetric with ``qmax = 448``; the code is ``(x * inv)`` rounded to e4m3 (RTNE).

INT4 codes are packed two per byte along the last dim, low nibble first: byte ``j`` holds
channel ``2j`` in bits 0..3 and channel ``2j+1`` in bits 4..7, each a signed two's-complement
nibble. Packed tensors are ``torch.uint8`` of shape ``(..., D // 2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import Granularity, GranularityKind, OperandQuant, Precision, Strategy

__all__ = [
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "pack_int4",
    "unpack_int4",
    "token_mean",
    "block_mean",
    "expand_scales",
]

_TINY = 1e-30  # amax below this counts as an all-zero group


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantised tensor and everything needed to dequantise it.

    Attributes:
        data: codes. int8 for INT8; uint8 ``(..., D//2)`` for packed INT4; float8_e4m3fn for FP8.
        scale: fp32 scales, shaped per ``granularity`` (see ``qflash.config.Granularity``).
        zero_point: fp32 zero points, same shape as ``scale`` (asymmetric only), else None.
        precision, granularity, strategy: how it was quantised.
        shape: the original (unpacked) shape.
        dtype: the original dtype (dequantise returns it).
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    precision: Precision
    granularity: Granularity
    strategy: Strategy
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points."""
        n = self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            n += self.zero_point.numel() * self.zero_point.element_size()
        return n


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even, like the kernels' magic-number trick


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] of shape (..., D), D even, into uint8 (..., D // 2)."""
    if codes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_int4: codes must be an integer tensor, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dim must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 (..., D // 2) into int8 codes (..., D) in [-8, 7] (sign-extended nibbles)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: packed must be torch.uint8, got {packed.dtype}")
    b = packed.to(torch.int16)
    lo = ((b & 0xF) ^ 0x8) - 0x8
    hi = ((b >> 4) ^ 0x8) - 0x8
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


def _grouped(x: torch.Tensor, g: Granularity, fill: float = 0.0) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View x (..., S, D) as groups: returns (xg, reduce_dims) with scales = reduce(xg, dims).

    xg has shape (..., nb, bs, D) for token/block/tensor, or (..., S, D/G, G) for group. A short
    last block is padded with ``fill`` rows: 0 is neutral for amax of |x|; the asymmetric min/max
    pass -inf/+inf so padding never widens the range.
    """
    *lead, S, D = x.shape
    if g.kind is GranularityKind.TENSOR:
        if x.numel() == 0:  # empty: a neutral all-zero group, so the scale is defined (1 / qmax)
            return x.new_zeros(*[1] * len(lead), 1, 1), (-1,)
        return x.reshape(*[1] * len(lead), 1, -1), (-1,)
    if g.kind is GranularityKind.GROUP:
        if D % g.size:
            raise ValueError(f"group size {g.size} must divide the head dim {D}")
        return x.reshape(*lead, S, D // g.size, g.size), (-1,)
    bs = g.token_block if g.kind is not GranularityKind.CHANNEL else (g.size or max(S, 1))
    nb = max(math.ceil(S / bs), 1) if S else 0
    pad = nb * bs - S
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill) if pad else x
    xb = xp.reshape(*lead, nb, bs, D)
    if g.kind is GranularityKind.CHANNEL:
        return xb, (-2,)
    return xb, (-2, -1)


def _reduce(xg: torch.Tensor, dims: tuple[int, ...], op: str) -> torch.Tensor:
    out = xg
    for d in sorted(dims):  # negative dims: reduce from the innermost outwards keeps indices valid
        out = out.amax(dim=d, keepdim=True) if op == "max" else out.amin(dim=d, keepdim=True)
    return out


def expand_scales(scale: torch.Tensor, g: Granularity, shape: torch.Size) -> torch.Tensor:
    """Broadcast a scale tensor back to the element shape ``shape`` (..., S, D)."""
    *lead, S, D = shape
    if g.kind is GranularityKind.TENSOR:
        return scale.reshape(*[1] * len(lead), 1, 1).expand(*shape)
    if g.kind is GranularityKind.GROUP:
        return scale.repeat_interleave(g.size, dim=-1)
    if g.kind is GranularityKind.CHANNEL:
        bs = g.size or max(S, 1)
        return scale.repeat_interleave(bs, dim=-2)[..., :S, :]
    bs = g.token_block
    return scale.repeat_interleave(bs, dim=-1)[..., :S].unsqueeze(-1).expand(*shape)


def _scale_shape(xg_reduced: torch.Tensor, g: Granularity, lead_len: int) -> torch.Tensor:
    if g.kind is GranularityKind.TENSOR:
        return xg_reduced.reshape(*[1] * lead_len, 1)
    if g.kind is GranularityKind.GROUP:
        return xg_reduced.squeeze(-1)
    if g.kind is GranularityKind.CHANNEL:
        return xg_reduced.squeeze(-2)
    return xg_reduced.squeeze(-1).squeeze(-1)


def quantize(
    x: torch.Tensor,
    precision: Precision | str | OperandQuant = Precision.INT8,
    granularity: Granularity | None = None,
    strategy: Strategy | str = Strategy.SYMMETRIC,
) -> QuantizedTensor:
    """Quantise ``x`` of shape (..., S, D) (fp16/bf16/fp32) to codes plus fp32 scales.

    Args:
        x: the tensor; the last two dims are tokens and channels.
        precision: int8, int4 or fp8_e4m3 (or an ``OperandQuant`` carrying all three settings).
        granularity: which elements share a scale (default: per token).
        strategy: symmetric or asymmetric (integer precisions only).

    Returns:
        A ``QuantizedTensor``; see the module docstring for the exact arithmetic.
    """
    if isinstance(precision, OperandQuant):
        precision, granularity, strategy = precision.precision, precision.granularity, precision.strategy
    spec = OperandQuant(Precision(precision), granularity or Granularity.token(), Strategy(strategy))
    precision, g, strategy = spec.precision, spec.granularity, spec.strategy
    if precision.is_float:
        raise ValueError(f"quantize: precision must be int8, int4 or fp8_e4m3, got {precision.value}")
    if not x.is_floating_point():
        raise TypeError(f"quantize: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"quantize: x must have shape (..., S, D), got {tuple(x.shape)}")
    if precision is Precision.INT4 and x.shape[-1] % 2:
        raise ValueError(f"quantize: int4 packs channel pairs, head dim must be even, got {x.shape[-1]}")

    xf = x.float()
    lead_len = x.dim() - 2
    xg, dims = _grouped(xf, g)
    if strategy is Strategy.SYMMETRIC:
        amax = _reduce(xg.abs(), dims, "max")
        amax = torch.where(amax <= _TINY, torch.ones_like(amax), amax)  # NaN stays NaN: its rows become NaN
        scale_g = amax / precision.qmax
        inv_g = precision.qmax / amax
        scale = _scale_shape(scale_g, g, lead_len)
        inv = expand_scales(_scale_shape(inv_g, g, lead_len), g, x.shape)
        y = xf * inv
        if precision is Precision.FP8_E4M3:
            data = y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        else:
            codes = round_half_even(y).clamp(-precision.qmax, precision.qmax).to(torch.int8)
            data = pack_int4(codes) if precision is Precision.INT4 else codes
        return QuantizedTensor(data, scale.contiguous(), None, precision, g, strategy, x.shape, x.dtype)

    lo, hi = precision.code_range
    xmax = _reduce(_grouped(xf, g, float("-inf"))[0], dims, "max")
    xmin = _reduce(_grouped(xf, g, float("inf"))[0], dims, "min")
    rng = xmax - xmin
    rng = torch.where(rng <= _TINY, torch.ones_like(rng), rng)
    scale_g = rng / (hi - lo)
    zero_g = round_half_even(lo - xmin / scale_g)
    scale = _scale_shape(scale_g, g, lead_len)
    zero = _scale_shape(zero_g, g, lead_len)
    codes = round_half_even(xf / expand_scales(scale, g, x.shape)) + expand_scales(zero, g, x.shape)
    codes = codes.clamp(lo, hi).to(torch.int8)
    data = pack_int4(codes) if precision is Precision.INT4 else codes
    return QuantizedTensor(data, scale.contiguous(), zero.contiguous(), precision, g, strategy, x.shape, x.dtype)


def codes_as_float(qt: QuantizedTensor) -> torch.Tensor:
    """The codes (zero point removed) as fp32, shape ``qt.shape``: ``x ≈ codes * scale``."""
    if qt.precision is Precision.INT4:
        c = unpack_int4(qt.data).float()
    else:
        c = qt.data.float()
    if qt.zero_point is not None:
        c = c - expand_scales(qt.zero_point, qt.granularity, qt.shape)
    return c


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reconstruct ``codes * scale`` (minus zero points) in ``dtype`` (default: the original)."""
    x = codes_as_float(qt) * expand_scales(qt.scale, qt.granularity, qt.shape)
    return x.to(dtype or qt.dtype)


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of x (..., S, D) in fp32, shape (..., 1, D). Used by smooth_k / smooth_v."""
    return x.float().mean(dim=-2, keepdim=True)


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of ``block`` tokens of x (..., S, D) in fp32, shape (..., ceil(S/block), D).

    The last block averages only the rows it has. Used by smooth_q (block bias restoration).
    """
    *lead, S, D = x.shape
    nb = math.ceil(S / block) if S else 0
    pad = nb * block - S
    xf = x.float()
    xp = torch.nn.functional.pad(xf, (0, 0, 0, pad)) if pad else xf
    sums = xp.reshape(*lead, nb, block, D).sum(dim=-2)
    counts = torch.full((nb,), float(block), device=x.device)
    if pad:
        counts[-1] = block - pad
    return sums / counts[:, None]
