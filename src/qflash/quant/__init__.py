"""Quantisers: codes, scales, INT4 packing and smoothing helpers (pure PyTorch here)."""

from .core import (
    QuantizedTensor,
    block_mean,
    codes_as_float,
    dequantize,
    expand_scales,
    pack_int4,
    quantize,
    token_mean,
    unpack_int4,
)

__all__ = [
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "codes_as_float",
    "expand_scales",
    "pack_int4",
    "unpack_int4",
    "token_mean",
    "block_mean",
]
