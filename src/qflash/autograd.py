"""The gradient policy: straight-through autograd of ``qflash::attention_fwd``, which O and lse the
backward uses, and what is saved between forward and backward.

Straight-through estimator
--------------------------
The forward is quantised; its true derivative is zero almost everywhere (rounding), which is
useless. The registered backward returns the gradients of *exact* attention
``softmax(q·kᵀ·scale + mask)·v`` at the unquantised q, k, v — the straight-through estimator of
quantisation-aware training. A kernel family with a backward computes them
(``dispatch.backward_family``: the portable Triton kernels on CUDA, ``qflash::attention_bwd``);
elsewhere the reference family does, in fp32 (``qflash.reference.reference_backward``, exact
whatever the options below say). Gradients flow to q, k, v and to a floating-point ``attn_mask``.

The two backward options (``AttnSpec.bwd_lowbit`` / ``bwd_recompute``; forward outputs are
unchanged by them):

- ``bwd_lowbit``: "none" (the kernels' matmuls in the input dtype) or "int8" (INT8 Q·Kᵀ, Pᵀ·dO,
  dSᵀ·Q, dS·K; ~1.5-2% gradient relL2, ``qflash.kernels.portable.bwd_launch``).
- ``bwd_recompute`` (quantised presets; an exact forward's O and lse are always reused): True runs
  one extra exact forward in the backward to get the exact O and lse and saves only q, k, v;
  False reuses the quantised forward's own O and lse (saved with q, k, v), skipping that forward
  (~0.6-0.8 ms at the Flux shape on an H100, where SDPA's whole fwd+bwd is 1.67 ms) at the cost of
  part of the forward's error leaking into the gradient; None: ``bwd_recompute_default``. Reuse
  needs the forward's lse, so ``wants_lse`` asks the forward for it.

This is the only module that decides these defaults; the launchers take explicit choices.
"""

from __future__ import annotations

import torch

from .config import PRESETS, QuantConfig, resolve_quant
from .kernels import dispatch
from .spec import BWD_LOWBIT_MODES, AttnSpec, config_from_key

__all__ = ["backward", "bwd_recompute_default", "recompute", "saved_bytes", "setup_context", "wants_lse"]

# (preset, bwd_lowbit) pairs whose backward reuses the quantised forward's O and lse by default.
# Rule: reuse where the gradient relL2 vs fp64 exact stays <= 1% or within 1.5x of the recompute
# mode's, causal and not. Measured on N(0,1) bf16 inputs, Triton kernels on the CPU interpreter,
# B1 H2 S256 D64 and S512 D128, dq/dk/dv worst of the two (recompute: 0.24% bf16 bwd, 1.5-1.8% INT8):
#   bwd "none"  reuse: int8 0.30% full / 0.52% causal     int8-fp8 0.62% / 1.47% (5.9x recompute)
#                      fp8 1.13% / 2.19%                   int4 3.4% / 9.3%
#   bwd "int8"  reuse vs recompute, worst ratio: int8 1.0x / 1.0x   int8-fp8 1.03x / 1.34x
#                      fp8 1.17x / 1.78x (2.64% vs 1.48%)  int4 2.2x / 5.9x
# Pure-PyTorch (fake-quant forward's O/lse, FA2 backward math in fp64) at the Flux shape's S:
# B1 H2 S4608 D128 full: int8 0.11%, int8-fp8 0.36%, fp8 0.63%, int4 2.4%; causal B1 H4 S1024 D64:
# int8 0.49%, int8-fp8 1.50%, fp8 2.69%, int4 8.4% (the first rows see few keys: error is larger).
# Custom QuantConfigs (not equal to a preset) recompute unless told otherwise.
# Review (helper, interpreter): int8-fp8 with the INT8 backward is 1.6-1.9x worse than recompute
# on square causal shapes (above the 1.5x rule), and in fp16/fp32 the exact recompute is 8-10^4x
# more accurate than reuse (0.03% / 4e-7 vs 0.23-0.46%): the default reuses for bf16 inputs only.
_BWD_REUSE_DEFAULT = frozenset({("int8", "none"), ("int8", "int8")})
_BWD_REUSE_DTYPES = (torch.bfloat16,)


def bwd_recompute_default(quant: str | QuantConfig, bwd_lowbit: str = "none",
                          dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the backward recomputes the exact O and lse by default (``bwd_recompute=None``).

    False for ``quant="none"`` (its O and lse are exact) and, for bf16 inputs, for the
    (preset, bwd_lowbit) pairs in ``_BWD_REUSE_DEFAULT`` (measured numbers beside it); True otherwise.
    """
    cfg = quant if isinstance(quant, QuantConfig) else config_from_key(quant)
    if not (cfg.quantizes_qk or cfg.quantizes_pv):
        return False
    if dtype not in _BWD_REUSE_DTYPES:
        return True
    return not any(lowbit == bwd_lowbit and cfg == PRESETS[name] for name, lowbit in _BWD_REUSE_DEFAULT)


def recompute(spec: AttnSpec, dtype: torch.dtype) -> bool:
    """The resolved ``bwd_recompute`` of a call: never for exact forwards."""
    if not spec.quantized:
        return False
    return bwd_recompute_default(spec.quant, spec.bwd_lowbit, dtype) if spec.bwd_recompute is None \
        else bool(spec.bwd_recompute)


def wants_lse(spec: AttnSpec, q, k, v, attn_mask) -> bool:
    """Whether the forward must return its lse: asked for, or kept for a backward that reuses the
    forward's O and lse (an exact forward, or a quantised one with recompute resolved False; 2.9 ms
    instead of 3.7 ms fwd+bwd at the Flux shape on an H100, benchmarks/bwd_bench.py)."""
    if spec.return_lse:
        return True
    if not torch.is_grad_enabled():
        return False
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad or \
        (attn_mask is not None and attn_mask.requires_grad)
    return needs_grad and not recompute(spec, q.dtype)


def setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key = inputs
    spec = AttnSpec.from_key(key)
    fam = dispatch.backward_family(spec, q, k, attn_mask)
    ctx.spec = spec.replace(backend=fam.name)
    ctx.kernels = fam is not dispatch.REFERENCE
    if ctx.kernels and spec.return_lse and not recompute(spec, q.dtype):
        out, lse = output  # exact forward, or a quantised one whose O and lse the backward reuses
        ctx.save_for_backward(q, k, v, attn_mask, out, lse)
    else:  # quantised forward (O, lse recomputed exactly in the backward) or reference backward
        ctx.save_for_backward(q, k, v, attn_mask, None, None)


def backward(ctx, grad_out, grad_lse):
    q, k, v, attn_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    needs = getattr(ctx, "needs_input_grad", None)
    mask_grad = attn_mask is not None and attn_mask.is_floating_point() and (needs is None or bool(needs[3]))
    if q.numel() == 0 or k.numel() == 0:  # B, H, Sq or Sk = 0: no score reaches the loss, every gradient is 0
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(attn_mask) if mask_grad else None, None)
    if ctx.kernels:
        dq, dk, dv, dmask = torch.ops.qflash.attention_bwd(
            q, k, v, out, lse, grad_out, grad_lse, attn_mask, ctx.spec.key(), mask_grad)
        dmask = dmask if mask_grad else None
    else:
        dq, dk, dv, dmask = dispatch.REFERENCE.backward(ctx.spec, q, k, v, None, None, grad_out, grad_lse, attn_mask,
                                                        mask_grad=True)
    return dq, dk, dv, dmask, None


def saved_bytes(
    B: int, Hq: int, Hkv: int, Sq: int, Sk: int, D: int, *,
    quant: str | QuantConfig = "none",
    dtype: torch.dtype = torch.bfloat16,
    lowbit: str = "none",
    return_lse: bool = True,
    recompute: bool | None = None,
    codes: bool = False,
) -> dict[str, int]:
    """Bytes kept between forward and backward (per attention call).

    The policy of this module (``bwd_lowbit=lowbit``, ``bwd_recompute=recompute``; None:
    ``bwd_recompute_default``): q, k, v (input dtype) always; out (input dtype) and lse (fp32) too
    when the backward uses the forward's own — an exact forward (``none``), or a quantised one with
    recompute off — and the forward returned its lse (``qflash.attention`` / ``qflash.sdpa`` ask
    for it then; ``return_lse=False`` models a direct op call without it, whose backward
    recomputes). ``lowbit`` does not change what is kept (the INT8 backward quantises q and k itself).

    ``codes=True`` (needs ``lowbit="int8"``): a caller that quantises q and k at forward time and
    keeps only their INT8 codes (``quantize_for_backward``; ``attention_bwd(None, None, ...,
    codes=...)``, as ``examples/train_tiny.py`` after an exact forward): INT8 codes with an fp32
    scale per token, the fp32 K mean and the fp32 row bias replace q and k, and out and lse are
    kept (without q and k nothing can be recomputed). The attention mask, if any, is the caller's
    tensor (not counted). Returns a dict of per-tensor bytes plus ``"total"``.
    """
    cfg = resolve_quant(quant)
    exact = not (cfg.quantizes_qk or cfg.quantizes_pv)
    if lowbit not in BWD_LOWBIT_MODES:
        raise ValueError(f"lowbit must be one of {BWD_LOWBIT_MODES}, got {lowbit!r}")
    if codes and lowbit != "int8":
        raise ValueError(f"codes=True needs lowbit='int8' (only the INT8 backward reads codes), got {lowbit!r}")
    if codes and recompute and not exact:
        raise ValueError("codes=True keeps no q and k: the backward cannot recompute O and lse (recompute=True)")
    el = torch.empty((), dtype=dtype).element_size()
    rows_q, rows_k = B * Hq * Sq, B * Hkv * Sk
    if recompute is None:
        recompute = bwd_recompute_default(cfg, lowbit, dtype)
    keeps_out = codes or ((exact or not recompute) and return_lse)
    res: dict[str, int] = {}
    if codes:
        res["q_codes+scales+row_bias"] = rows_q * (D + 8)
        res["k_codes+scales+mean"] = rows_k * (D + 4) + B * Hkv * D * 4
    else:
        res["q"] = rows_q * D * el
        res["k"] = rows_k * D * el
    res["v"] = rows_k * D * el
    if keeps_out:
        res["out"] = rows_q * D * el
        res["lse"] = rows_q * 4
    res["total"] = sum(res.values())
    return res
