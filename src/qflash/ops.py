"""``torch.library`` custom ops: the layer between the public API and the launchers.

One op is registered here, ``torch.ops.qflash.attention_fwd``::

    qflash::attention_fwd(Tensor q, Tensor k, Tensor v, str quant, bool causal, Tensor? attn_mask,
                          float? scale, bool return_lse, str out_layout, str backend,
                          str bwd_lowbit="none", bool? bwd_recompute=None) -> (Tensor, Tensor)

It wraps ``qflash.backend.attention_forward`` (Triton kernels on CUDA, the fake-quant reference
elsewhere) and gives it what ``torch.compile`` / ``torch.export`` / CUDA graphs need:

- a **fake (meta) implementation** with the exact output shapes, dtypes and strides, so the op
  traces under ``torch.compile(fullgraph=True)`` without running;
- an **autograd formula** (see "Backward" below);
- op-friendly arguments only: the ``QuantConfig`` dataclass travels as a string (``config_key``),
  a preset name such as ``"int8"`` or a text serialisation of any config (``"cfg:..."``), and is
  turned back into the frozen dataclass by ``config_from_key`` (cached).

Shapes (all "HND", possibly strided views of "NHD" tensors; nothing is copied on the way in):

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); fp16 / bf16 / fp32, one dtype.
    attn_mask: None, or bool (True = attend) / float (additive), broadcastable to (B, Hq, Sq, Sk).
    returns out (B, Hq, Sq, Dv) in q's dtype, and lse:
        - return_lse=True:  fp32 (B, Hq, Sq), contiguous, natural-log log-sum-exp of the scaled,
          masked scores (-inf for rows with every key masked);
        - return_lse=False: an empty fp32 tensor of shape (0,) (custom ops cannot return None).
    out_layout="HND": ``out`` is contiguous (B, Hq, Sq, Dv).
    out_layout="NHD": ``out`` is the (B, Hq, Sq, Dv) view of a contiguous (B, Sq, Hq, Dv) buffer,
        so ``out.transpose(1, 2)`` is contiguous with no copy.

``causal`` is bottom-right aligned (query i sees key j iff j <= i + Sk - Sq), as everywhere in
qflash; ``qflash.sdpa`` converts PyTorch's top-left convention before calling the op.

Backward (straight-through estimator)
-------------------------------------
The forward is quantised; its true derivative is zero almost everywhere (rounding), which is
useless. The registered backward instead returns the gradients of *exact* attention
``softmax(q·kᵀ·scale + mask)·v`` evaluated at the unquantised q, k, v — the straight-through
estimator used for quantisation-aware training. Where the forward runs the Triton kernels, so
does the backward: ``qflash::attention_bwd`` (FlashAttention-2 style kernels in
``qflash.kernels.attn_bwd``, O(S) memory). Elsewhere it is computed in plain PyTorch in fp32
(``reference_backward``, exact whatever the two options below say), materialising the
(B, Hq, Sq, Sk) probability matrix. Gradients flow to q, k, v and to a floating-point
``attn_mask`` (bool masks get none). With ``quant="none"`` this is simply the gradient of attention.

The two backward arguments (forward outputs are unchanged by them; they only steer autograd):

- ``bwd_lowbit``: "none" (the kernels' matmuls in the input dtype) or "int8" (INT8 Q·Kᵀ, Pᵀ·dO,
  dSᵀ·Q, dS·K; ~1.5-2% gradient relL2, see ``qflash.kernels.bwd_launch``).
- ``bwd_recompute`` (quantised presets; ignored for ``none``, whose O and lse are exact): True
  runs one extra exact (``none``) forward in the backward to get the exact O and lse and saves
  only q, k, v; False reuses the quantised forward's own O and lse (saved with q, k, v), skipping
  that forward (~0.6-0.8 ms at the Flux shape on an H100, where SDPA's whole fwd+bwd is 1.67 ms)
  at the cost of part of the forward's error leaking into the gradient; None picks
  ``bwd_recompute_default`` (measured numbers there). Reuse needs the forward's lse:
  ``call_attention_fwd`` asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .config import Granularity, OperandQuant, QuantConfig, resolve_quant

__all__ = [
    "BACKENDS",
    "BWD_LOWBIT_MODES",
    "OUT_LAYOUTS",
    "attention_fwd",
    "bwd_recompute_default",
    "call_attention_fwd",
    "check_bwd_args",
    "config_from_key",
    "config_key",
    "reference_backward",
]

OUT_LAYOUTS = ("HND", "NHD")
BACKENDS = ("auto", "triton", "reference")
BWD_LOWBIT_MODES = ("none", "int8")  # == qflash.kernels.bwd_launch.LOWBIT_MODES (that module needs triton)

_KEY_PREFIX = "cfg:"

# The key format knows these fields; if config.py grows new ones, config_key refuses loudly
# (NotImplementedError) instead of dropping them.
_OPERANDS = ("q", "k", "v", "p")
_FLAGS = ("smooth_k", "smooth_q", "smooth_v")
_INTS = ("q_mean_block",)
_KNOWN_FIELDS = (
    {f.name for f in dataclasses.fields(QuantConfig)} == set(_OPERANDS + _FLAGS + _INTS + ("name",))
    and [f.name for f in dataclasses.fields(OperandQuant)] == ["precision", "granularity", "strategy"]
    and [f.name for f in dataclasses.fields(Granularity)] == ["kind", "size"]
)


def _encode_operand(op: OperandQuant) -> str:
    return f"{op.precision.value}/{op.granularity.kind.value}/{op.granularity.size}/{op.strategy.value}"


def config_key(quant: str | QuantConfig) -> str:
    """The string that stands for ``quant`` in op calls.

    A preset name stays itself (``"int8"``). A ``QuantConfig`` becomes a lossless text form,
    ``"cfg:q=int8/token/0/symmetric;k=...;smooth_k=1;...;name=<name>"``, that ``config_from_key``
    parses back in this process or another (e.g. a cached compiled graph). Only f-strings and
    attribute reads: ``torch.compile`` traces it to a constant without a graph break.
    """
    if isinstance(quant, str):
        resolve_quant(quant)  # a ValueError listing the presets if it is not one
        return quant
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be a preset name (str) or a QuantConfig, got {type(quant).__name__}")
    if not _KNOWN_FIELDS:
        raise NotImplementedError("qflash.ops.config_key does not know QuantConfig's current fields; update it")
    parts = [f"{name}={_encode_operand(getattr(quant, name))}" for name in _OPERANDS]
    parts += [f"{name}={'1' if getattr(quant, name) else '0'}" for name in _FLAGS]
    parts += [f"{name}={int(getattr(quant, name))}" for name in _INTS]
    return _KEY_PREFIX + ";".join(parts) + ";name=" + quant.name  # name last: it may hold any character


def _decode_operand(text: str) -> OperandQuant:
    precision, kind, size, strategy = text.split("/")
    return OperandQuant(precision=precision, granularity=Granularity(kind, int(size)), strategy=strategy)


@functools.lru_cache(maxsize=256)
def _parse_key(key: str) -> QuantConfig:
    try:
        n_fixed = len(_OPERANDS) + len(_FLAGS) + len(_INTS)
        items = key[len(_KEY_PREFIX):].split(";", n_fixed)
        if len(items) != n_fixed + 1:
            raise ValueError(f"expected {n_fixed + 1} ';'-separated fields, got {len(items)}")
        kw = {}
        for item in items:
            name, _, value = item.partition("=")
            if name in _OPERANDS:
                kw[name] = _decode_operand(value)
            elif name in _FLAGS:
                if value not in ("0", "1"):
                    raise ValueError(f"{name} must be 0 or 1, got {value!r}")
                kw[name] = value == "1"
            elif name in _INTS:
                kw[name] = int(value)
            elif name == "name":
                kw[name] = value
            else:
                raise ValueError(f"unknown field {name!r}")
        return QuantConfig(**kw)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"quant key {key[:100]!r} is not a valid serialised QuantConfig: {exc}") from exc


def config_from_key(key: str) -> QuantConfig:
    """Inverse of ``config_key``: a preset name or a ``"cfg:..."`` serialisation -> QuantConfig."""
    if not isinstance(key, str):
        raise TypeError(f"quant key must be a str, got {type(key).__name__}")
    if key.startswith(_KEY_PREFIX):
        return _parse_key(key)
    return resolve_quant(key)  # preset name, or a ValueError listing the presets


# --------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def _empty_out(q: torch.Tensor, v: torch.Tensor, out_layout: str) -> torch.Tensor:
    """Uninitialised output (B, Hq, Sq, Dv) in q's dtype, with ``out_layout``'s memory order."""
    B, H, Sq, _ = q.shape
    Dv = v.shape[-1]
    if out_layout == "NHD":
        return q.new_empty((B, Sq, H, Dv)).transpose(1, 2)
    return q.new_empty((B, H, Sq, Dv))


def check_bwd_args(bwd_lowbit, bwd_recompute) -> None:
    """ValueError/TypeError naming the argument unless ``bwd_lowbit`` is one of
    ``BWD_LOWBIT_MODES`` and ``bwd_recompute`` is a bool or None."""
    if not isinstance(bwd_lowbit, str) or bwd_lowbit not in BWD_LOWBIT_MODES:
        raise ValueError(f"bwd_lowbit must be one of {BWD_LOWBIT_MODES}, got {bwd_lowbit!r}")
    if bwd_recompute is not None and not isinstance(bwd_recompute, bool):
        raise TypeError(f"bwd_recompute must be a bool or None, got {type(bwd_recompute).__name__}")


def _check_op_args(q, out_layout: str, backend: str, bwd_lowbit: str, bwd_recompute) -> None:
    if q.dim() != 4:
        raise ValueError(f"qflash::attention_fwd takes HND tensors (B, H, S, D); got q of shape {tuple(q.shape)}")
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_bwd_args(bwd_lowbit, bwd_recompute)


@torch.library.custom_op("qflash::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    quant: str,
    causal: bool,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    return_lse: bool,
    out_layout: str,
    backend: str,
    bwd_lowbit: str = "none",
    bwd_recompute: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantised attention forward on validated HND tensors; see the module docstring.

    ``quant`` is a ``config_key`` string. Inputs are expected to have passed
    ``qflash.api.validate_inputs`` (the public functions do that); the op itself only checks
    what it needs to pick a code path. ``bwd_lowbit`` / ``bwd_recompute`` only configure the
    backward (module docstring).
    """
    _check_op_args(q, out_layout, backend, bwd_lowbit, bwd_recompute)
    from .backend import attention_forward

    cfg = config_from_key(quant)
    out, lse = attention_forward(
        q, k, v, cfg, causal=causal, attn_mask=attn_mask, scale=scale, return_lse=return_lse,
        out_layout=out_layout, backend=backend,
    )
    # Pin the output metadata the fake implementation promises, whatever the backend returned.
    want = _empty_out(q, v, out_layout)
    if out.dtype != q.dtype or out.shape != want.shape or out.stride() != want.stride():
        want.copy_(out)
        out = want
    if return_lse:
        lse = lse.to(torch.float32).contiguous()
    else:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, quant, causal, attn_mask, scale, return_lse, out_layout, backend,
                        bwd_lowbit="none", bwd_recompute=None):
    _check_op_args(q, out_layout, backend, bwd_lowbit, bwd_recompute)
    out = _empty_out(q, v, out_layout)
    B, H, Sq, _ = q.shape
    lse = q.new_empty((B, H, Sq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


# --------------------------------------------------------------------------------------------
# autograd: straight-through estimator through exact attention (Triton kernels / plain PyTorch)
# --------------------------------------------------------------------------------------------


def reference_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
):
    """Gradients of exact attention at (q, k, v), in fp32, returned in the inputs' dtypes.

    Args:
        q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv): HND, Hq a multiple of Hkv.
        grad_out (B, Hq, Sq, Dv): gradient of the output.
        grad_lse (B, Hq, Sq) or None: gradient of the log-sum-exp output (d lse / d s = p).
        causal: bottom-right aligned. attn_mask: bool (keep) or float (additive).

    Returns ``(dq, dk, dv, dmask)``; ``dmask`` is None unless ``attn_mask`` is floating point,
    in which case it has ``attn_mask``'s shape (summed over broadcast dimensions) and dtype.
    Rows with every key masked contribute nothing.
    """
    from .reference import expand_kv, keep_mask

    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf = q.float()
    kf = expand_kv(k, Hq).float()
    vf = expand_kv(v, Hq).float()
    keep, additive = keep_mask(Sq, Sk, causal, attn_mask, q.device)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if additive is not None:
        s = s + additive.float()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)))
    p = torch.where(finite, p, torch.zeros_like(p))  # (B, Hq, Sq, Sk); rows with no key: 0

    do = grad_out.float()
    dv = torch.matmul(p.transpose(-1, -2), do)  # (B, Hq, Sk, Dv)
    dp = torch.matmul(do, vf.transpose(-1, -2))  # (B, Hq, Sq, Sk)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    if grad_lse is not None and grad_lse.numel():
        ds = ds + p * grad_lse.float()[..., None]
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale  # (B, Hq, Sk, D)
    if group > 1:  # GQA: sum the query heads that share a key/value head
        dk = dk.view(B, Hkv, group, Sk, D).sum(dim=2)
        dv = dv.view(B, Hkv, group, Sk, dv.shape[-1]).sum(dim=2)
    dmask = None
    if attn_mask is not None and attn_mask.is_floating_point():
        dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


# --- fused Triton backward (issue 7) ------------------------------------------------------------
# Where the forward runs the Triton kernels (CUDA, or backend="triton"), the backward does too:
# ``qflash::attention_bwd`` below wraps ``qflash.kernels.bwd_launch.ste_backward`` (FlashAttention-2
# style kernels recomputing P from the lse, O(S) memory). Same STE semantics as
# ``reference_backward``; for quantised presets it either reuses the forward's O and lse or first
# recomputes the exact ones (one ``none`` forward, only q, k, v saved): ``bwd_recompute``.
# Elsewhere ``reference_backward`` runs (exact; the backward options change nothing there).

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
    from .config import PRESETS

    cfg = quant if isinstance(quant, QuantConfig) else config_from_key(quant)
    if not (cfg.quantizes_qk or cfg.quantizes_pv):
        return False
    if dtype not in _BWD_REUSE_DTYPES:
        return True
    return not any(lowbit == bwd_lowbit and cfg == PRESETS[name] for name, lowbit in _BWD_REUSE_DEFAULT)


def _bwd_recompute(key: str, bwd_lowbit: str, bwd_recompute: bool | None, dtype: torch.dtype) -> bool:
    """The resolved ``bwd_recompute`` for a ``config_key``: never for exact forwards."""
    if not _quantizes(key):
        return False
    return bwd_recompute_default(key, bwd_lowbit, dtype) if bwd_recompute is None else bool(bwd_recompute)


def _grad_buffer(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised gradient with t's strides when its channel dim is contiguous (the kernels
    need that), else contiguous. Real and fake implementations allocate through this."""
    g = torch.empty_like(t)
    return g if g.stride(-1) == 1 else t.new_empty(t.shape)


@torch.library.custom_op("qflash::attention_bwd", mutates_args=())
def attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    quant: str,
    causal: bool,
    scale: float | None,
    lowbit: str,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """STE gradients of ``qflash::attention_fwd`` with the Triton backward kernels.

    ``out`` / ``lse``: the forward's (exact for ``none``, the quantised ones when the forward ran
    with ``bwd_recompute`` False), used as they are; None: the exact O and lse are recomputed
    first (one ``none`` forward). ``lowbit``: "none" (input-dtype matmuls) or "int8".
    Returns (dq like q, dk like k, dv like v, dmask): dmask has ``attn_mask``'s shape and dtype
    when ``mask_grad`` (float masks only), else an empty (0,) tensor.
    """
    from .kernels.bwd_launch import ste_backward

    cfg = config_from_key(quant)
    recompute = out is None or lse is None or lse.numel() == 0
    dq, dk, dv, dmask = ste_backward(
        q, k, v, grad_out, grad_lse, cfg, out=out, lse=lse, causal=causal, attn_mask=attn_mask, scale=scale,
        recompute=recompute, lowbit=lowbit, mask_grad=mask_grad,
        grad_buffers=(_grad_buffer(q), _grad_buffer(k), _grad_buffer(v)),
    )
    if dmask is None:
        dmask = q.new_empty((0,), dtype=torch.float32)
    elif dmask.shape != attn_mask.shape or not dmask.is_contiguous():
        dmask = dmask.expand(attn_mask.shape).contiguous()
    return dq, dk, dv, dmask


@attention_bwd.register_fake
def _attention_bwd_fake(q, k, v, out, lse, grad_out, grad_lse, attn_mask, quant, causal, scale, lowbit, mask_grad):
    if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = q.new_empty((0,), dtype=torch.float32)
    return _grad_buffer(q), _grad_buffer(k), _grad_buffer(v), dmask


def _bwd_uses_kernels(q: torch.Tensor, backend: str) -> bool:
    """The backward runs where the forward would run the kernels (``backend.attention_forward``)."""
    if backend == "reference" or q.shape[-1] > 256:
        return False
    from .backend import kernels_usable

    return backend == "triton" or (backend == "auto" and q.device.type == "cuda" and kernels_usable(q.device)[0])


def _setup_context(ctx, inputs, output):
    q, k, v, quant, causal, attn_mask, scale, return_lse, _out_layout, backend, bwd_lowbit, bwd_recompute = inputs
    ctx.causal = causal
    ctx.scale = scale
    ctx.quant = quant
    ctx.lowbit = bwd_lowbit
    ctx.kernels = _bwd_uses_kernels(q, backend)
    if ctx.kernels and return_lse and not _bwd_recompute(quant, bwd_lowbit, bwd_recompute, q.dtype):
        out, lse = output  # exact forward, or a quantised one whose O and lse the backward reuses
        ctx.save_for_backward(q, k, v, attn_mask, out, lse)
    else:  # quantised forward (O, lse recomputed exactly in the backward) or reference backward
        ctx.save_for_backward(q, k, v, attn_mask, None, None)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, attn_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    if ctx.kernels:
        needs = getattr(ctx, "needs_input_grad", None)
        mask_grad = attn_mask is not None and attn_mask.is_floating_point() and (needs is None or bool(needs[5]))
        dq, dk, dv, dmask = torch.ops.qflash.attention_bwd(
            q, k, v, out, lse, grad_out, grad_lse, attn_mask, ctx.quant, ctx.causal, ctx.scale, ctx.lowbit, mask_grad
        )
        dmask = dmask if mask_grad else None
    else:
        dq, dk, dv, dmask = reference_backward(
            q, k, v, grad_out, grad_lse, causal=ctx.causal, attn_mask=attn_mask, scale=ctx.scale
        )
    return dq, dk, dv, None, None, dmask, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Python-side convenience
# --------------------------------------------------------------------------------------------


def _eager_fast_path(q, k, v, attn_mask) -> bool:
    tensors = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
    if any(type(t) is not torch.Tensor for t in tensors):
        return False  # subclasses (FakeTensor, functorch wrappers) need the dispatcher
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None and not torch.overrides.has_torch_function(tensors)


def call_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    quant: str | QuantConfig,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out_layout: str = "HND",
    backend: str = "auto",
    bwd_lowbit: str = "none",
    bwd_recompute: bool | None = None,
):
    """Call ``torch.ops.qflash.attention_fwd`` with Python-friendly arguments.

    Same contract as ``qflash.backend.attention_forward`` (HND inputs, validated): returns
    ``(out, lse)`` with ``lse`` None unless ``return_lse``. ``bwd_lowbit`` / ``bwd_recompute``
    configure the backward (module docstring).

    Plain eager inference (no autograd, not tracing, ordinary tensors) skips the op dispatcher,
    which costs ~100 µs of CPU per call — as much as a whole small attention. Everything else
    (torch.compile, autograd, tensor subclasses, modes) goes through the op.
    """
    check_bwd_args(bwd_lowbit, bwd_recompute)
    if _eager_fast_path(q, k, v, attn_mask):
        from .backend import attention_forward

        cfg = quant if isinstance(quant, QuantConfig) else config_from_key(config_key(quant))
        return attention_forward(q, k, v, cfg, causal=bool(causal), attn_mask=attn_mask, scale=scale,
                                 return_lse=bool(return_lse), out_layout=out_layout, backend=backend)
    # With gradients on, an exact forward also returns its lse so the backward need not rerun it
    # (2.9 ms instead of 3.7 ms fwd+bwd at the Flux shape on an H100, benchmarks/bwd_bench.py);
    # so does a quantised one whose backward reuses its O and lse (bwd_recompute resolved False).
    key = config_key(quant)
    needs_grad = any(t.requires_grad for t in (q, k, v)) or (attn_mask is not None and attn_mask.requires_grad)
    want_lse = bool(return_lse) or (
        torch.is_grad_enabled() and needs_grad and not _bwd_recompute(key, bwd_lowbit, bwd_recompute, q.dtype))
    out, lse = torch.ops.qflash.attention_fwd(
        q, k, v, key, bool(causal), attn_mask, None if scale is None else float(scale),
        want_lse, out_layout, backend, bwd_lowbit, bwd_recompute,
    )
    return out, (lse if return_lse else None)


def _quantizes(key: str) -> bool:
    cfg = config_from_key(key)
    return cfg.quantizes_qk or cfg.quantizes_pv
