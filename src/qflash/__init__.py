"""qflash: quantised flash attention for PyTorch (INT8 / INT4 / FP8, Triton kernels on NVIDIA GPUs,
an exact pure-PyTorch path everywhere else)."""

from . import parallel as parallel  # qflash.parallel.attention (torch.distributed: imported by torch)
from .api import attention
from .checks import InputReport, QFlashAccuracyWarning, check_inputs
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
from .dropin import (
    QFlashFallbackWarning,
    disable_sdpa_patch,
    enable_sdpa_patch,
    patch_sdpa,
    sdpa,
)
from .prequant import QuantizedKV, quantize_kv
from .quant import QuantizedTensor, dequantize, pack_int4, quantize, unpack_int4
from .sage_compat import sageattn

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Granularity",
    "GranularityKind",
    "InputReport",
    "OperandQuant",
    "Precision",
    "QFlashAccuracyWarning",
    "QFlashFallbackWarning",
    "QuantConfig",
    "QuantizedKV",
    "QuantizedTensor",
    "Strategy",
    "__version__",
    "attention",
    "check_inputs",
    "dequantize",
    "disable_sdpa_patch",
    "enable_sdpa_patch",
    "pack_int4",
    "patch_sdpa",
    "quantize",
    "quantize_kv",
    "resolve_quant",
    "sageattn",
    "sdpa",
    "unpack_int4",
]
