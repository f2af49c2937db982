"""qflash: quantised flash attention for PyTorch (INT8 / INT4 / FP8, Triton kernels on NVIDIA GPUs,
an exact pure-PyTorch path everywhere else)."""

from .api import attention
from .config import (
    PRESETS,
    Granularity,
    GranularityKind,
    OperandQuant,
    Precision,
    QuantConfig,
    Strategy,
    resolve_quant,
)
from .quant import QuantizedTensor, dequantize, pack_int4, quantize, unpack_int4

__version__ = "0.1.0"

__all__ = [
    "attention",
    "PRESETS",
    "Granularity",
    "GranularityKind",
    "OperandQuant",
    "Precision",
    "QuantConfig",
    "Strategy",
    "resolve_quant",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "pack_int4",
    "unpack_int4",
    "__version__",
]
