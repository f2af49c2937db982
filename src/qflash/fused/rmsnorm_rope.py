"""Pre-attention fusion for Flux: per-head RMSNorm + rotary embedding (+ the text/image concat) in
one launch per tensor.

Flux's attention processor (diffusers ``FluxAttnProcessor``) does, for q and for k, right before
attention::

    x_img = RMSNorm_img(x_img)                # (B, S_img, H, D), one kernel (read + write)
    x_txt = RMSNorm_txt(x_txt)                # double-stream blocks only
    x = cat([x_txt, x_img], dim=1)            # read + write
    x = apply_rotary_emb(x, (cos, sin))       # ~8 elementwise kernels, fp32 temporaries

``rmsnorm_rope`` computes the same thing reading x once and writing the result once (in x's dtype,
so qflash's quantiser then reads it once), with every intermediate in fp32 registers.

Numerics: the norm and the rotation are computed in fp32 from the input and rounded once at the
end; diffusers rounds after the norm too (bf16 in between). The two differ by about one bf16 ulp.

Shapes (documented at the producer):

- ``x`` (B, S, H, D) and optional ``x_prefix`` (B, S_p, H, D): float16/bfloat16/float32, last dim
  contiguous, any other strides (e.g. views of a fused QKV projection).
- ``weight`` / ``weight_prefix``: (D,) RMSNorm scale of each part (any float dtype).
- ``cos``, ``sin``: (S_p + S, D) float32, Flux's "repeat-interleaved" layout (cos[2j] == cos[2j+1]),
  as ``FluxPosEmbed`` returns them; or None for no rotation.
- output: (B, S_p + S, H, D) contiguous, x's dtype; rows [0, S_p) come from ``x_prefix``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.common import cdiv, next_pow2

__all__ = ["rmsnorm_rope", "rmsnorm_rope_reference", "rmsnorm_rope_triton"]


@triton.jit
def _split_pairs(t, ROWS: tl.constexpr, HALF: tl.constexpr):
    """(ROWS, 2*HALF) -> even, odd columns, each (ROWS, HALF)."""
    return tl.split(tl.reshape(t, (ROWS, HALF, 2)))


@triton.jit
def _rmsnorm_rope_kernel(
    xa_ptr, wa_ptr, xb_ptr, wb_ptr, cos_ptr, sin_ptr, out_ptr,
    S_A, H,
    stride_ab, stride_as, stride_ah,  # x_prefix (B, S_p, H, D) strides; D contiguous
    stride_bb, stride_bs, stride_bh,  # x (B, S, H, D)
    stride_ob, stride_os, stride_oh,  # out (B, S_p + S, H, D)
    stride_cs,  # cos / sin (S_p + S, D) row stride
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_ROPE: tl.constexpr,
):
    # One program: one token (pid 0, over S_p + S), one batch row, BLOCK_H heads. Rows are loaded
    # and stored whole (vectorised); the rotation mixes each (even, odd) pair, split in registers.
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    hmask = offs_h[:, None] < H
    if pid_t < S_A:
        row = xa_ptr + pid_b * stride_ab + pid_t.to(tl.int64) * stride_as
        ptrs = row + offs_h[:, None].to(tl.int64) * stride_ah + offs_d[None, :]
        w = tl.load(wa_ptr + offs_d).to(tl.float32)
    else:
        row = xb_ptr + pid_b * stride_bb + (pid_t - S_A).to(tl.int64) * stride_bs
        ptrs = row + offs_h[:, None].to(tl.int64) * stride_bh + offs_d[None, :]
        w = tl.load(wb_ptr + offs_d).to(tl.float32)
    x = tl.load(ptrs, mask=hmask, other=0.0).to(tl.float32)  # (BLOCK_H, HEAD_DIM)

    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)  # (BLOCK_H,)
    y = x * r[:, None] * w[None, :]

    if HAS_ROPE:
        c = tl.load(cos_ptr + pid_t.to(tl.int64) * stride_cs + offs_d)[None, :]
        s = tl.load(sin_ptr + pid_t.to(tl.int64) * stride_cs + offs_d)[None, :]
        y_even, y_odd = _split_pairs(y, BLOCK_H, HALF)
        # rotate_half: (-odd, even) interleaved, i.e. partner[2j] = -y[2j+1], partner[2j+1] = y[2j]
        partner = tl.reshape(tl.join(-y_odd, y_even), (BLOCK_H, HEAD_DIM))
        y = y * c + partner * s

    optrs = (out_ptr + pid_b * stride_ob + pid_t.to(tl.int64) * stride_os
             + offs_h[:, None].to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=hmask)


def _check(x, weight, cos, sin, x_prefix, weight_prefix):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, S, H, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    B, S, H, D = x.shape
    if D % 2 or D < 2:
        raise ValueError(f"x's head dim must be even (rotation pairs), got x of shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    S_p = 0
    if x_prefix is not None:
        if x_prefix.dim() != 4 or x_prefix.shape[0] != B or x_prefix.shape[2:] != x.shape[2:]:
            raise ValueError(f"x_prefix must be (B={B}, S_p, H={H}, D={D}), got {tuple(x_prefix.shape)}")
        if x_prefix.dtype != x.dtype or x_prefix.device != x.device:
            raise ValueError(f"x_prefix ({x_prefix.dtype}, {x_prefix.device}) must match x ({x.dtype}, {x.device})")
        if weight_prefix is None or weight_prefix.shape != (D,):
            raise ValueError(f"weight_prefix must have shape ({D},) when x_prefix is given")
        S_p = x_prefix.shape[1]
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    if cos is not None and (cos.shape != (S_p + S, D) or sin.shape != (S_p + S, D)):
        raise ValueError(f"cos and sin must be ({S_p + S}, {D}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return B, S, H, D, S_p


def rmsnorm_rope_reference(x, weight, cos, sin, eps, *, x_prefix=None, weight_prefix=None) -> torch.Tensor:
    """The fused computation in plain PyTorch (fp32 throughout, one rounding at the end)."""
    _check(x, weight, cos, sin, x_prefix, weight_prefix)

    def norm(t, w):
        t = t.float()
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w.float()

    y = norm(x, weight)
    if x_prefix is not None:
        y = torch.cat([norm(x_prefix, weight_prefix), y], dim=1)
    if cos is not None:
        c = cos.float()[None, :, None, :]
        s = sin.float()[None, :, None, :]
        even, odd = y[..., 0::2], y[..., 1::2]
        rot = torch.stack([-odd, even], dim=-1).flatten(-2)
        y = y * c + rot * s
    return y.to(x.dtype).contiguous()


def rmsnorm_rope_triton(x, weight, cos, sin, eps, *, x_prefix=None, weight_prefix=None,
                        block_h: int = 8, num_warps: int = 4) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    B, S, H, D, S_p = _check(x, weight, cos, sin, x_prefix, weight_prefix)
    if x.stride(-1) != 1 or (x_prefix is not None and x_prefix.stride(-1) != 1):
        raise ValueError("x and x_prefix need a contiguous last (head) dim")
    if D & (D - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head dim, got {D}")
    out = torch.empty(B, S_p + S, H, D, dtype=x.dtype, device=x.device)
    xa = x_prefix if x_prefix is not None else x
    wa = weight_prefix if x_prefix is not None else weight
    has_rope = cos is not None
    c = cos.float().contiguous() if has_rope else out
    s = sin.float().contiguous() if has_rope else out
    block_h = min(block_h, next_pow2(H))
    grid = (S_p + S, B, cdiv(H, block_h))
    _rmsnorm_rope_kernel[grid](
        xa, wa, x, weight, c, s, out,
        S_p, H,
        xa.stride(0), xa.stride(1), xa.stride(2),
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        c.stride(0) if has_rope else 0,
        float(eps),
        HEAD_DIM=D, BLOCK_H=block_h, HAS_ROPE=has_rope, num_warps=num_warps,
    )
    return out


def rmsnorm_rope(x, weight, cos, sin, eps, *, x_prefix=None, weight_prefix=None) -> torch.Tensor:
    """RMSNorm each head of ``x`` (and ``x_prefix``), concatenate [x_prefix, x] along the sequence,
    rotate by (cos, sin); one read and one write. See the module docstring for shapes.

    Runs the Triton kernel on CUDA (power-of-two head dim), the PyTorch reference elsewhere.
    """
    D = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 0
    if (isinstance(x, torch.Tensor) and x.is_cuda and D and not D & (D - 1)
            and x.stride(-1) == 1 and (x_prefix is None or x_prefix.stride(-1) == 1)):
        return rmsnorm_rope_triton(x, weight, cos, sin, eps, x_prefix=x_prefix, weight_prefix=weight_prefix)
    return rmsnorm_rope_reference(x, weight, cos, sin, eps, x_prefix=x_prefix, weight_prefix=weight_prefix)
