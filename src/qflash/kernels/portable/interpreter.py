"""Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) compute what the GPU computes.

Triton 3.x's interpreter converts floats bit by bit and gets three things wrong that the kernels
rely on:

- fp32 -> fp8 e4m3 rounding does not carry into the exponent (126.3 becomes 64, not 128) and does
  not saturate like the GPU's ``cvt.rn.satfinite``;
- bf16 (and fp8) operands of ``tl.dot`` are multiplied as raw integer bit patterns (bf16 results
  off by ~1e9 relative);
- ``tl.math.fma`` rounds twice (``x*y`` then ``+z``) where the GPU rounds once.

``apply()`` replaces them with exact conversions through PyTorch's dtypes (RTNE, saturating fp8),
fp32 dots of the converted operands and a single-rounding fma (computed in fp64). The portable
family calls ``apply_if_interpreting()`` when its kernels are first imported, so every
interpreter run of qflash's kernels (tests, examples, a user's CPU debugging) gets GPU numbers.
Patching is idempotent and touches only the interpreter (a GPU run never imports it).
"""

from __future__ import annotations

__all__ = ["apply", "apply_if_interpreting"]


def apply_if_interpreting() -> bool:
    """``apply()`` when ``TRITON_INTERPRET`` is on; returns whether the interpreter is patched."""
    from ..common import interpreter_enabled

    return apply() if interpreter_enabled() else False


def apply() -> bool:
    """Patch the interpreter in place; returns False when this Triton has no such internals."""
    try:
        import numpy as np
        import torch
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:
        return False
    if getattr(interp, "_qflash_shim", False):
        return True
    builder = getattr(interp, "InterpreterBuilder", None)
    if not hasattr(interp, "_convert_float") or builder is None or not hasattr(builder, "create_dot"):
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
            x = x.clamp(-448.0, 448.0)  # saturating, like cvt.rn.satfinite (NaN stays NaN)
        y = x.to(torch.float32).to(torch_of[dst_ty.name]) if dst_ty.name != "fp64" else x
        return y.view(uint_of[dst_ty.primitive_bitwidth]).numpy().view(getattr(np, f"uint{dst_ty.primitive_bitwidth}"))

    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def as_f32(h):
            if h.dtype.is_floating() and h.dtype.primitive_bitwidth in (8, 16) and h.dtype != tl.float16:
                return interp.TensorHandle(convert(h.data, h.dtype, tl.float32, None).view(np.float32), tl.float32)
            return h
        return original_dot(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    def create_fma(self, x, y, z):
        # fp32: the product of two fp32 values is exact in fp64, so one rounding to fp32 at the end
        # is the GPU's fma.rn.f32 (but for rare double-rounding ties)
        if x.data.dtype == np.float32:
            with np.errstate(all="ignore"):
                r = (x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64)).astype(np.float32)
            return interp.TensorHandle(r, z.dtype.scalar)
        return original_fma(self, x, y, z)

    original_fma = builder.create_fma
    interp._convert_float = convert
    builder.create_dot = create_dot
    builder.create_fma = create_fma
    interp._qflash_shim = True
    return True
