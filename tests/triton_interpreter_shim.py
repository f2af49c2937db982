"""Test-only fixes for Triton 3.x's CPU interpreter (TRITON_INTERPRET=1), applied by conftest.

The interpreter converts floats bit by bit and gets two things wrong that our kernels rely on:
- fp32 -> fp8 e4m3 rounding does not carry into the exponent (126.3 becomes 64, not 128), and
  does not saturate like the GPU's ``cvt.rn.satfinite``;
- bf16 operands of ``tl.dot`` are multiplied as raw uint16 bit patterns.
Both are replaced with exact conversions through PyTorch's dtypes (RTNE, saturating fp8), so
interpreter runs compute what the GPU computes. Nothing outside the test suite uses this.
"""

from __future__ import annotations

import numpy as np
import torch


def apply() -> bool:
    """Patch the interpreter in place; returns False when this Triton has no such internals."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:
        return False
    if getattr(interp, "_qflash_shim", False):
        return True
    if not hasattr(interp, "_convert_float") or not hasattr(interp, "InterpreterBuilder"):
        return False

    torch_of = {
        "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
        "fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2,
    }
    uint_of = {8: torch.uint8, 16: torch.uint16, 32: torch.uint32, 64: torch.uint64}
    original = interp._convert_float

    def convert(data, src_ty, dst_ty, rounding_mode):
        if src_ty.name not in torch_of or dst_ty.name not in torch_of:
            return original(data, src_ty, dst_ty, rounding_mode)
        raw = np.ascontiguousarray(data)
        bits = torch.from_numpy(raw.view(getattr(np, f"uint{src_ty.primitive_bitwidth}")).copy())
        x = bits.view(uint_of[src_ty.primitive_bitwidth]).view(torch_of[src_ty.name]).to(torch.float64)
        if dst_ty.name == "fp8e4nv":
            x = x.clamp(-448.0, 448.0)
        y = x.to(torch.float32).to(torch_of[dst_ty.name]) if dst_ty.name != "fp64" else x
        return y.view(uint_of[dst_ty.primitive_bitwidth]).numpy().view(getattr(np, f"uint{dst_ty.primitive_bitwidth}"))

    interp._convert_float = convert

    builder = interp.InterpreterBuilder
    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def as_f32(h):
            if h.dtype.is_floating() and h.dtype.primitive_bitwidth in (8, 16) and h.dtype != tl.float16:
                return interp.TensorHandle(convert(h.data, h.dtype, tl.float32, None).view(np.float32), tl.float32)
            return h
        a, b = as_f32(a), as_f32(b)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    interp._qflash_shim = True
    return True
