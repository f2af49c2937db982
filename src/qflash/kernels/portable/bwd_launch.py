"""Launchers of the attention backward: allocate gradients, pick a config, run the Triton kernels.

Gradient semantics (every preset): the **straight-through estimator**. The quantised forward's
true derivative is zero almost everywhere (rounding), so the backward returns the gradient of
*exact* attention ``softmax(q·kᵀ·scale + mask)·v`` at the unquantised q, k, v, applied to the
incoming ``grad_out`` (and ``grad_lse``). For ``quant="none"`` that is simply the gradient.

Which O and lse the backward uses (``ste_backward``):

- ``none`` forward: its own O and lse (exact up to the input dtype) — nothing is recomputed.
- quantised forwards, two modes (``recompute``):

  * recompute (``True``, this launcher's default): the forward's O and lse belong to the
    *quantised* scores, so the backward first runs the ``none`` forward (one extra forward
    launch, ~0.6-0.8 ms at the Flux shape on an H100) to get the exact O and lse, then the
    exact backward: gradients as accurate as ``none``'s; only q, k, v are saved.
  * reuse (``False``): the forward's own O and lse. P = exp(q·kᵀ·scale - lse_quant) from the
    unquantised q, k then does not quite sum to 1 per row, and delta = rowsum(dO ⊙ O_quant)
    carries part of the forward's error into dS: on N(0,1) inputs the gradient relL2 of the
    bf16 backward goes from 0.24% to 0.3% (int8) / 0.6% (int8-fp8) / 1.1% (fp8) / 3.4% (int4),
    2-3x that with ``causal`` (S 256-512). ``qflash.autograd`` reuses by default where that stays small
    (``qflash.autograd.bwd_recompute_default``, numbers there).

Low-bit option (``lowbit="int8"``): INT8 Q·Kᵀ, Pᵀ·dO, dSᵀ·Q and dS·K with per-token scales of
Q, K (smoothed: mean over tokens removed) and dO, and on-the-fly per-row scales of P and dS (see
``attn_bwd``'s docstring); dO·Vᵀ stays in the input dtype (SageBwd: dP is the sensitive
product). Gradient error vs exact (N(0,1) inputs, D=64): about 1.5% relL2 on dQ, dK, dV, against
0.2-0.6% for the bf16 backward; measured in the tests and the bench.

Shapes (HND views; NHD inputs are strided views, read without copies, and gradients come back
with the inputs' strides): q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv),
out / grad_out (B, Hq, Sq, Dv), lse / grad_lse fp32 (B, Hq, Sq). Hq a multiple of Hkv.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...config import PRESETS, QuantConfig
from ..common import LOG2E, MASK_ADD, causal_offset, cdiv, mask_operand, next_pow2
from . import attn_bwd
from .tuning import BwdConfig, pick_bwd_config

__all__ = [
    "LOWBIT_MODES",
    "BwdCodes",
    "BwdConfig",
    "attention_bwd",
    "pick_bwd_config",
    "quantize_for_backward",
    "ste_backward",
]

LOWBIT_MODES = ("none", "int8")
# (QK_INT8, PDO_INT8, DS_INT8): the kernels keep the three flags apart, so a mode that quantises
# fewer products is one line here (measured: Q·Kᵀ alone in INT8 leaves dS·K in bf16 against an
# unsmoothed K, whose channel offsets then amplify P's error in dQ — worse than all four in INT8).
_FLAGS = {"none": (False, False, False), "int8": (True, True, True)}


def _hpad(d: int) -> int:
    return max(next_pow2(d), 16)


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass
class BwdCodes:
    """INT8 operands of the low-bit backward (all contiguous).

    q_codes (B, Hq, Sq, D) int8, q_scale (B, Hq, Sq) fp32: q ≈ q_codes * q_scale, per token.
    k_codes (B, Hkv, Sk, D) int8, k_scale (B, Hkv, Sk) fp32: k - k_mean ≈ k_codes * k_scale.
    k_mean (B, Hkv, D) fp32: mean of k over tokens (K smoothing).
    row_bias (B, Hq, Sq) fp32: ``scale * log2(e) * q·k_mean``, the score term smoothing removed.
    """

    q_codes: torch.Tensor
    q_scale: torch.Tensor
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    row_bias: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.q_codes, self.q_scale, self.k_codes, self.k_scale, self.k_mean, self.row_bias))


def _rowquant(x: torch.Tensor, mean: torch.Tensor, group: int, *, sub_mean: bool, rb_mult: float | None):
    B, H, S, D = x.shape
    codes = torch.empty((B, H, S, D), dtype=torch.int8, device=x.device)
    scales = torch.empty((B, H, S), dtype=torch.float32, device=x.device)
    rb = torch.empty((B, H, S), dtype=torch.float32, device=x.device) if rb_mult is not None else scales
    if x.numel():
        block = 64
        attn_bwd.rowquant_int8_kernel[(cdiv(S, block), B * H)](
            x, codes, scales, mean, rb, *x.stride()[:3], H, S, group, 0.0 if rb_mult is None else rb_mult,
            SUB_MEAN=sub_mean, ROW_BIAS=rb_mult is not None,
            HEAD_DIM=D, HEAD_DIM_PAD=_hpad(D), BLOCK=block, num_warps=4,
        )
    return codes, scales, rb


def quantize_for_backward(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> BwdCodes:
    """INT8 codes of q and of the smoothed k for ``lowbit`` backwards (two small Triton launches
    and one mean over k's tokens). Can run at forward time so that only codes are saved."""
    q, k = _rowmajor(q), _rowmajor(k)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k_mean = k.float().mean(dim=2).contiguous() if k.shape[2] else torch.zeros(k.shape[:2] + (D,), device=k.device)
    kc, ks, _ = _rowquant(k, k_mean, 1, sub_mean=True, rb_mult=None)
    qc, qs, rb = _rowquant(q, k_mean, q.shape[1] // k.shape[1], sub_mean=False, rb_mult=scale * LOG2E)
    return BwdCodes(qc, qs, kc, ks, k_mean, rb)


def _check_grad_buffer(name: str, buf: torch.Tensor | None, like: torch.Tensor):
    if buf is None:
        return torch.empty_like(like)
    if buf.shape != like.shape or buf.dtype != like.dtype or buf.stride(-1) != 1:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, dtype {like.dtype} and a contiguous "
                         f"last dim; got {tuple(buf.shape)} {buf.dtype} strides {buf.stride()}")
    return buf


def attention_bwd(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    lowbit: str = "none",
    mask_grad: bool = False,
    top_left: bool = False,
    codes: BwdCodes | None = None,
    kernel_config: BwdConfig | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
):
    """Gradients of attention from O and lse: returns ``(dq, dk, dv, dmask)``.

    Args:
        q, k, v: HND views (channel dim contiguous, else copied). With ``lowbit="int8"`` and
            ``codes`` given, q and k may be None (the kernels then read codes only).
        out, lse: the forward's output (B, Hq, Sq, Dv) and natural-log lse fp32 (B, Hq, Sq)
            (-inf for rows with no visible key). They must be those of the attention whose
            gradient is wanted (``ste_backward`` takes care of quantised forwards).
        grad_out: (B, Hq, Sq, Dv); grad_lse: (B, Hq, Sq) or None.
        causal (bottom-right aligned; ``top_left=True``: PyTorch's top-left), attn_mask (bool keep / float additive, broadcastable to
            (B, Hq, Sq, Sk)), scale (default 1/sqrt(D)): as in the forward.
        lowbit: "none" | "int8" (see the module docstring).
        mask_grad: also return the gradient of a floating-point mask (its shape, summed over
            broadcast dims); materialises an fp32 (B, Hq, Sq, Sk) buffer.
        codes: precomputed ``quantize_for_backward(q, k, scale)`` (low-bit modes; same scale).
        kernel_config: fixed tiles (tests); default ``pick_bwd_config``.
        dq, dk, dv: optional preallocated outputs (e.g. NaN-poisoned in tests).

    Returns dq like q (same strides when q is given), dk like k, dv like v, and dmask or None.
    """
    if lowbit not in LOWBIT_MODES:
        raise ValueError(f"lowbit must be one of {LOWBIT_MODES}, got {lowbit!r}")
    qk_int8, pdo_int8, ds_int8 = _FLAGS[lowbit]
    if (q is None or k is None) and codes is None:
        raise ValueError("q / k may only be None when their INT8 codes are given")
    if (q is None or k is None) and not (qk_int8 and ds_int8):
        raise ValueError(f"q and k are needed by lowbit={lowbit!r}; only lowbit='int8' reads codes alone")
    v, out, grad_out = (_rowmajor(t) for t in (v, out, grad_out))
    q = _rowmajor(q) if q is not None else None
    k = _rowmajor(k) if k is not None else None
    qref = q if q is not None else codes.q_codes
    kref = k if k is not None else codes.k_codes
    B, Hq, Sq, D = qref.shape
    Hkv, Sk = kref.shape[1], kref.shape[2]
    Dv = v.shape[-1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if tuple(v.shape) != (B, Hkv, Sk, Dv) or tuple(out.shape) != (B, Hq, Sq, Dv) or grad_out.shape != out.shape:
        raise ValueError(f"shape mismatch: q {tuple(qref.shape)}, k {tuple(kref.shape)}, v {tuple(v.shape)}, "
                         f"out {tuple(out.shape)}, grad_out {tuple(grad_out.shape)}")
    if lse.shape != (B, Hq, Sq):
        raise ValueError(f"lse must have shape {(B, Hq, Sq)}, got {tuple(lse.shape)}")
    dev = v.device
    dtype = v.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qk_mult = scale * LOG2E

    dq = _check_grad_buffer("dq", dq, q if q is not None else torch.empty((B, Hq, Sq, D), dtype=dtype, device=dev))
    dk = _check_grad_buffer("dk", dk, k if k is not None else torch.empty((B, Hkv, Sk, D), dtype=dtype, device=dev))
    dv = _check_grad_buffer("dv", dv, v)
    dmask = None
    if Sq == 0 or Sk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
            dmask = torch.zeros_like(attn_mask)
        return dq, dk, dv, dmask

    kc = kernel_config or pick_bwd_config(dev, D, v.dtype)
    if pdo_int8 and (kc.block_m1 < 32 or kc.block_n2 < 32):
        # INT8 MMAs reduce over block_m1 (Pᵀ·dO, dSᵀ·Q) and block_n2 (dS·K): Hopper's INT8 MMA
        # wants K >= 32. Both are loop steps, not grid dims, so raising them is always safe.
        kc = dataclasses.replace(kc, block_m1=max(kc.block_m1, 32), block_n2=max(kc.block_n2, 32))
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    lse2 = torch.empty_like(delta)
    has_dlse = grad_lse is not None and grad_lse.numel() > 0
    dlse = grad_lse.to(torch.float32).contiguous() if has_dlse else delta
    if pdo_int8:
        doc = torch.empty((B, Hq, Sq, Dv), dtype=torch.int8, device=dev)
        dos = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    else:
        doc, dos = delta, delta  # dummies, never dereferenced
    pre_block = 64
    attn_bwd.bwd_preprocess_kernel[(cdiv(Sq, pre_block), B * Hq)](
        out, grad_out, dlse, lse, delta, lse2, doc, dos,
        *out.stride()[:3], *grad_out.stride()[:3], Hq, Sq,
        HAS_DLSE=has_dlse, QUANT_DO=pdo_int8,
        HEAD_DIM_V=Dv, HEAD_DIM_V_PAD=_hpad(Dv), BLOCK_M=pre_block, num_warps=4,
    )

    if qk_int8 or ds_int8:
        if codes is None:
            codes = quantize_for_backward(q, k, scale)
        qc, qs, kcodes, ks, km, rb = (codes.q_codes, codes.q_scale, codes.k_codes, codes.k_scale,
                                      codes.k_mean, codes.row_bias)
    else:
        qc = qs = kcodes = ks = km = rb = delta
    qa = q if q is not None else qc
    ka = k if k is not None else kcodes

    m4, mask_kind, mask_strides = mask_operand(attn_mask, B, Hq, Sq, Sk, delta)
    write_ds = bool(mask_grad and mask_kind == MASK_ADD)
    ds_buf = torch.zeros((B, Hq, Sq, Sk), dtype=torch.float32, device=dev) if write_ds else delta
    dot_precision = "ieee" if dtype == torch.float32 else "tf32"
    common = {"HEAD_DIM": D, "HEAD_DIM_PAD": _hpad(D), "HEAD_DIM_V": Dv, "HEAD_DIM_V_PAD": _hpad(Dv),
              "DOT_PRECISION": dot_precision}
    q_str = qa.stride()[:3] if q is not None else (0, 0, 0)
    k_str = ka.stride()[:3] if k is not None else (0, 0, 0)

    attn_bwd.bwd_dkdv_kernel[(cdiv(Sk, kc.block_n1), B * Hkv)](
        qa, ka, v, grad_out, qc, qs, kcodes, ks, rb, doc, dos, lse2, delta, m4, dk, dv,
        *q_str, *k_str, *v.stride()[:3], *grad_out.stride()[:3], *mask_strides,
        *dk.stride()[:3], *dv.stride()[:3],
        Hq, Hkv, Hq // Hkv, Sq, Sk, causal_offset(top_left, Sq, Sk), qk_mult, scale,
        QK_INT8=qk_int8, PDO_INT8=pdo_int8, DS_INT8=ds_int8, IS_CAUSAL=bool(causal), MASK_KIND=mask_kind,
        BLOCK_M=kc.block_m1, BLOCK_N=kc.block_n1, num_warps=kc.num_warps1, num_stages=kc.num_stages1, **common,
    )
    attn_bwd.bwd_dq_kernel[(cdiv(Sq, kc.block_m2), B * Hq)](
        qa, ka, v, grad_out, qc, qs, kcodes, ks, km, rb, dlse, lse2, delta, m4, dq, ds_buf,
        *q_str, *k_str, *v.stride()[:3], *grad_out.stride()[:3], *mask_strides,
        *dq.stride()[:3],
        Hq, Hq // Hkv, Sq, Sk, causal_offset(top_left, Sq, Sk), qk_mult, scale,
        QK_INT8=qk_int8, DS_INT8=ds_int8, HAS_DLSE=has_dlse,
        IS_CAUSAL=bool(causal), MASK_KIND=mask_kind, WRITE_DS=write_ds,
        BLOCK_M=kc.block_m2, BLOCK_N=kc.block_n2, num_warps=kc.num_warps2, num_stages=kc.num_stages2, **common,
    )
    if write_ds:
        dmask = ds_buf.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return dq, dk, dv, dmask


def ste_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    cfg: QuantConfig,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    recompute: bool = True,
    lowbit: str = "none",
    mask_grad: bool = False,
    top_left: bool = False,
    kernel_config: BwdConfig | None = None,
    grad_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
):
    """Straight-through-estimator gradients of the forward ``cfg`` ran: ``(dq, dk, dv, dmask)``.

    ``out`` / ``lse``: the forward's output and lse if it kept them. ``recompute`` True runs the
    ``none`` forward first to get the exact O and lse (also whenever ``out`` or ``lse`` is
    missing); False uses ``out`` / ``lse`` as given (the module docstring has both modes' errors).
    The launcher takes the choice as given: the defaults (which presets reuse) are the gradient
    policy's, ``qflash.autograd``. ``grad_buffers``: optional preallocated (dq, dk, dv).
    """
    if recompute or out is None or lse is None or lse.numel() == 0:
        from .launch import attention_fwd

        out, lse = attention_fwd(q, k, v, PRESETS["none"], causal=causal, attn_mask=attn_mask, scale=scale,
                                 return_lse=True, top_left=top_left)
    dq, dk, dv = grad_buffers if grad_buffers is not None else (None, None, None)
    return attention_bwd(q, k, v, out, lse, grad_out, grad_lse, causal=causal, attn_mask=attn_mask, scale=scale,
                         lowbit=lowbit, mask_grad=mask_grad, top_left=top_left, kernel_config=kernel_config,
                         dq=dq, dk=dk, dv=dv)
