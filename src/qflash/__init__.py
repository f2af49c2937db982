"""qflash: quantised flash attention for PyTorch (INT8 / INT4 / FP8, Triton kernels on NVIDIA GPUs,
an exact pure-PyTorch path everywhere else)."""

from .api import attention
from .sage_compat import sageattn
from .dropin import (
    QFlashFallbackWarning,
    disable_sdpa_patch,
    enable_sdpa_patch,
    patch_sdpa,
    sdpa,
)
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
    "sdpa",
    "patch_sdpa",
    "enable_sdpa_patch",
    "disable_sdpa_patch",
    "QFlashFallbackWarning",
    "sageattn",
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
