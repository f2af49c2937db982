"""Shared by every kernel family: the codes kernels and launchers agree on, and small host helpers.

Host code (launchers, dispatch) uses the plain ints; ``@triton.jit`` code uses their ``C``-prefixed
``tl.constexpr`` twins (Triton kernels may read a global only when it is a constexpr), so no kernel
compares a literal integer. Adding a mask kind or a Q·K operand kind starts here.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "LOG2E", "LN2",
    "MASK_NONE", "MASK_BOOL", "MASK_ADD",
    "QK_FLOAT", "QK_INT8", "QK_INT4", "QK_FP8",
    "cdiv", "next_pow2", "mask_operand", "causal_offset",
    "triton_status", "interpreter_enabled", "triton_usable",
]

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E): scores are kept in log2 units
LN2 = 0.6931471805599453

# MASK_KIND: what the attn_mask operand is
MASK_NONE = 0  # no mask tensor (causal is separate: IS_CAUSAL + a diagonal offset)
MASK_BOOL = 1  # bool, True = attend
MASK_ADD = 2  # floating point, added to the scaled scores

# KIND: how Q·Kᵀ operands are stored
QK_FLOAT = 0  # the input dtype (fp16 / bf16 / fp32)
QK_INT8 = 1  # int8 codes
QK_INT4 = 2  # int4 codes, two per byte (low nibble = even channel)
QK_FP8 = 3  # fp8 e4m3 codes

try:  # the constexpr twins for @triton.jit code
    import triton.language as _tl
except Exception:  # no (working) triton: host code still imports this module
    _tl = None
if _tl is not None:
    CMASK_NONE = _tl.constexpr(MASK_NONE)
    CMASK_BOOL = _tl.constexpr(MASK_BOOL)
    CMASK_ADD = _tl.constexpr(MASK_ADD)
    CQK_FLOAT = _tl.constexpr(QK_FLOAT)
    CQK_INT8 = _tl.constexpr(QK_INT8)
    CQK_INT4 = _tl.constexpr(QK_INT4)
    CQK_FP8 = _tl.constexpr(QK_FP8)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` goes through the JIT's call machinery: ~4 µs)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def causal_offset(top_left: bool, sq: int, sk: int) -> int:
    """The kernels' causal diagonal offset: query i sees key j iff ``j <= i + offset``.

    Bottom-right alignment (FlashAttention's) is ``sk - sq``; top-left (PyTorch SDPA's) is 0.
    """
    return 0 if top_left else sk - sq


def mask_operand(attn_mask: torch.Tensor | None, B: int, H: int, sq: int, sk: int, dummy: torch.Tensor):
    """(tensor, MASK_KIND, 4 strides) for a mask broadcastable to (B, H, sq, sk): a stride-0 view, no copy."""
    if attn_mask is None:
        return dummy, MASK_NONE, (0, 0, 0, 0)
    m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(B, H, sq, sk)
    return m4, (MASK_BOOL if attn_mask.dtype == torch.bool else MASK_ADD), m4.stride()


_TRITON_STATUS: tuple[bool, str] | None = None


def triton_status() -> tuple[bool, str]:
    """(available, reason): whether Triton imports here, and why not if it doesn't."""
    global _TRITON_STATUS
    if _TRITON_STATUS is None:
        try:
            import triton
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_STATUS = (False, f"triton is not importable ({type(exc).__name__}: {exc})")
        else:
            _TRITON_STATUS = (True, f"triton {triton.__version__}")
    return _TRITON_STATUS


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, a debug switch)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_numpy_problem() -> str | None:
    """Why Triton's CPU interpreter would fail on this NumPy (3.6 breaks on 2.4: "only 0-dimensional
    arrays can be converted to Python scalars" from inside a kernel), or None."""
    try:
        import numpy
    except ImportError:
        return "Triton's interpreter needs numpy, which is not installed"
    if tuple(int(p) for p in numpy.__version__.split(".")[:2] if p.isdigit()) >= (2, 4):
        return f"Triton's CPU interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, found {numpy.__version__}"
    return None


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device`` (CUDA, or the CPU interpreter), and why not."""
    ok, why = triton_status()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, "cuda"
    if interpreter_enabled() and device.type == "cpu":
        problem = _interpreter_numpy_problem()
        if problem:
            return False, problem
        return True, "triton interpreter (TRITON_INTERPRET=1)"
    return False, f"the Triton kernels run on CUDA devices; this tensor is on {device.type}"
