"""``qflash.sdpa``: a drop-in for ``torch.nn.functional.scaled_dot_product_attention``, and
``qflash.patch_sdpa``: a reversible way to route every SDPA call through it.

``qflash.sdpa`` has PyTorch's signature and semantics — inputs (..., L, E), boolean mask = keep,
float mask = additive, ``is_causal`` aligned to the *top-left* corner, ``scale``, ``enable_gqa`` —
and runs quantised attention (``quant=``) through ``torch.ops.qflash.attention_fwd``. Calls it
cannot run exactly (dropout, float64, an unsupported head dim, ...) go to PyTorch's own SDPA with
a one-time ``QFlashFallbackWarning`` saying why (``fallback=True``, the default), or raise a
``ValueError`` (``fallback=False``). It never returns a silently different result.

Where it runs: on CUDA the Triton kernels; on any other device (CPU, MPS) the pure-PyTorch
fake-quant reference, which computes the same numbers as the kernels, much more slowly.

(This module is ``qflash.dropin`` rather than ``qflash.sdpa`` because ``qflash.sdpa`` is the
function.)
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .api import SUPPORTED_DTYPES, validate_inputs
from .config import QuantConfig, resolve_quant
from .ops import run
from .spec import AttnSpec, check_bwd_args

__all__ = [
    "QFlashFallbackWarning",
    "disable_sdpa_patch",
    "enable_sdpa_patch",
    "fallback_reason",
    "original_sdpa",
    "patch_sdpa",
    "reset_fallback_warnings",
    "sdpa",
    "sdpa_patch_active",
]

#: PyTorch's own SDPA, read (never written) when this module is imported.
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


class QFlashFallbackWarning(UserWarning):
    """``qflash.sdpa`` handed a call to PyTorch's SDPA (shown once per reason)."""


_WARNED: set[str] = set()  # no lock: a rare duplicate warning between threads is harmless, and
# torch.compile cannot trace a lock


def reset_fallback_warnings() -> None:
    """Forget which fallback reasons were already reported (each warns once per process)."""
    _WARNED.clear()


def _warn_once(code: str, message: str) -> bool:
    if code in _WARNED:
        return False
    _WARNED.add(code)
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename == __file__:  # point at the first caller outside
        frame, level = frame.f_back, level + 1  # this module (also through the patch wrapper)
    warnings.warn(
        f"qflash.sdpa falls back to PyTorch's scaled_dot_product_attention: {message}. "
        "(Shown once per reason; pass fallback=False to raise instead.)",
        QFlashFallbackWarning,
        stacklevel=level,
    )
    return True


# Under torch.compile _warn_once runs once while tracing, without a graph break: this is what
# torch.compiler.assume_constant_result does (it sets this attribute, torch 2.4-2.13), without importing
# torch._dynamo at `import qflash` (~1.5 s of CPU; issue 14). tests/test_cli_bench.py checks both.
_warn_once._dynamo_marked_constant = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# what qflash can run
# --------------------------------------------------------------------------------------------


def _shape(t) -> str:
    return str(tuple(t.shape))


def fallback_reason(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, quant="int8"
) -> tuple[str, str] | None:
    """Why ``qflash.sdpa`` would hand this call to PyTorch: ``(code, message)``, or None if it runs it.

    ``code`` is a short stable identifier (e.g. ``"dropout"``, ``"dtype"``, ``"head_dim"``).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if any(t.is_nested for t in (query, key, value)):
        return "nested", "nested (jagged) tensors are not supported"
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        return "dropout", f"dropout_p={dropout_p!r} (qflash has no attention dropout; only 0.0 runs quantised)"
    if query.dim() != key.dim() or query.dim() != value.dim():
        return "rank", f"query, key, value have different ranks ({query.dim()}, {key.dim()}, {value.dim()})"
    if not 2 <= query.dim() <= 4:
        return "rank", f"inputs of rank {query.dim()} (qflash runs 2-D, 3-D and 4-D (..., L, E) inputs)"
    if query.dtype not in SUPPORTED_DTYPES:
        return "dtype", f"dtype {query.dtype} (qflash runs float16, bfloat16 and float32)"
    if not (query.dtype == key.dtype == value.dtype):
        return "mixed_dtype", f"mixed dtypes query={query.dtype}, key={key.dtype}, value={value.dtype}"
    if not (query.device == key.device == value.device):
        return "device", f"tensors on different devices ({query.device}, {key.device}, {value.device})"
    L, E = query.shape[-2:]
    S, Ek = key.shape[-2:]
    Sv, Ev = value.shape[-2:]
    if Ek != E or Ev != E:
        return "head_dim", f"head dims differ (query {E}, key {Ek}, value {Ev}); qflash needs one head dim"
    if Sv != S:
        return "shape", f"key and value sequence lengths differ (key {_shape(key)}, value {_shape(value)})"
    if E == 0:  # empty batch, heads or sequences run in qflash (empty output; zeros for Sk = 0)
        return "empty", f"head dim 0 (query {_shape(query)}, key {_shape(key)})"
    if query.dim() >= 3:
        if key.shape[:-2] != value.shape[:-2]:
            return "shape", f"key {_shape(key)} and value {_shape(value)} differ in batch/heads"
        if query.shape[:-3] != key.shape[:-3]:
            return "broadcast", f"batch dims differ (query {_shape(query)}, key {_shape(key)}): broadcasting is PyTorch's"
        hq, hk = query.shape[-3], key.shape[-3]
        if hq != hk and hk != 1 and not (enable_gqa and hq % hk == 0):
            return "heads", (
                f"query has {hq} heads and key/value {hk}"
                + (" (not a divisor)" if enable_gqa else " without enable_gqa=True")
            )
    if is_causal and attn_mask is not None:
        return "causal_and_mask", "is_causal=True together with attn_mask (PyTorch's behaviour for this varies by version)"
    if not isinstance(is_causal, bool):
        return "args", f"is_causal must be a bool, got {type(is_causal).__name__}"
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        return "scale", f"scale={scale!r} (qflash takes a finite float or None)"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return "mask", f"attn_mask of type {type(attn_mask).__name__}"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return "mask", f"attn_mask of dtype {attn_mask.dtype} (bool or floating point only)"
        if attn_mask.device != query.device:
            return "device", f"attn_mask on {attn_mask.device}, inputs on {query.device}"
        if attn_mask.dim() < 2:  # PyTorch accepts these for some input ranks and backends, not others
            return "mask_rank", f"attn_mask of shape {_shape(attn_mask)} (qflash needs at least (L|1, S|1))"
        target = tuple(query.shape[:-2]) + (L, S)
        if attn_mask.dim() > len(target) or any(
            m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))
        ):
            return "mask", f"attn_mask of shape {_shape(attn_mask)} does not broadcast to {target}"
        if attn_mask.is_nested:
            return "nested", "nested attn_mask"
    q4, k4, v4, m4 = _to_4d(query, key, value, attn_mask)
    try:
        validate_inputs(q4, k4, v4, causal=False, attn_mask=m4, scale=scale, layout="HND", quant=quant)
    except (ValueError, TypeError) as exc:
        return "unsupported:" + re.sub(r"\d+", "N", str(exc)), str(exc)
    return None


def _to_4d(query, key, value, attn_mask):
    """(..., L, E) -> (B, H, L, E) views; the mask keeps broadcasting against (B, H, L, S)."""
    nd = query.dim()
    if nd == 4:
        return query, key, value, attn_mask
    if nd == 3:  # (N, L, E) -> (N, 1, L, E); a 3-D mask (N|1, L|1, S|1) gains the head axis
        m = attn_mask.unsqueeze(-3) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        return query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), m
    # nd == 2: (L, E) -> (1, 1, L, E)
    return query[None, None], key[None, None], value[None, None], attn_mask


def _memory_layout(q4: torch.Tensor) -> str:
    """"NHD" when q is the (B, H, L, E) view of a (B, L, H, E) buffer, else "HND"."""
    if q4.shape[1] > 1 and q4.shape[2] > 1 and q4.stride(1) < q4.stride(2):
        return "NHD"
    return "HND"


# --------------------------------------------------------------------------------------------
# sdpa
# --------------------------------------------------------------------------------------------


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    quant: str | QuantConfig = "int8",
    fallback: bool = True,
    bwd_lowbit: str = "none",
    bwd_recompute: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Quantised ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's semantics.

    Args:
        query: (N, ..., Hq, L, E) — 2-D (L, E), 3-D (N, L, E) or 4-D (N, Hq, L, E) run quantised;
            float16, bfloat16 or float32.
        key: (N, ..., H, S, E); ``H`` equal to ``Hq``, 1 (broadcast), or a divisor of ``Hq`` with
            ``enable_gqa=True``.
        value: (N, ..., H, S, E) — the same head dim as query and key (else: fallback).
        attn_mask: bool (True = take part in attention) or float (added to the scaled scores),
            broadcastable to (N, ..., Hq, L, S).
        dropout_p: must be 0.0 to run quantised (else: fallback).
        is_causal: PyTorch's *top-left* causal mask (query i sees keys j <= i), also when L != S.
            Not together with ``attn_mask`` (fallback).
        scale: softmax scale; default 1 / sqrt(E).
        enable_gqa: allow Hq to be a multiple of H (grouped-query attention).
        quant: a preset name (``"none"``, ``"int8"``, ``"int8-fp8"``, ``"int4"``, ``"fp8"``) or a
            ``QuantConfig``. ``"none"`` matches PyTorch to float rounding; ``"int8"`` stays within
            ~2% relative L2 of exact attention on N(0, 1) inputs, ``"int8-fp8"`` within ~5%.
        fallback: when qflash cannot run the call, ``True`` hands it to PyTorch's SDPA (warning
            once per reason, ``QFlashFallbackWarning``), ``False`` raises ``ValueError``.
        bwd_lowbit, bwd_recompute: the backward's options, as in ``qflash.attention`` ("none" |
            "int8" matmuls; recompute or reuse the forward's O and lse). Unused by fallbacks.
        backend: as in ``qflash.attention`` ("auto", or a kernel family by name).

    Returns:
        (N, ..., Hq, L, E) in query's dtype. Rows whose keys are all masked are zero (as PyTorch
        2.5+). For 4-D inputs that are (N, L, H, E) buffers seen through ``.transpose(1, 2)``,
        the output has the same memory order, so transposing back is free.

    Gradients are straight-through: those of exact attention at the unquantised inputs
    (``qflash.autograd``). Invalid ``quant`` / ``bwd_*`` values raise whatever ``fallback`` is.
    """
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, quant, fallback, bwd_lowbit,
                 bwd_recompute, backend)[0]


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, quant, fallback, bwd_lowbit,
          bwd_recompute, backend):
    """``sdpa``, also saying whether qflash ran the call (True) or PyTorch did (False)."""
    cfg = resolve_quant(quant)  # a bad preset name is the caller's error, never a fallback
    check_bwd_args(bwd_lowbit, bwd_recompute)
    why = fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, quant=cfg)
    if why is not None:
        code, message = why
        if not fallback:
            raise ValueError(f"qflash.sdpa cannot run this call quantised: {message}")
        _warn_once(code, message)
        return original_sdpa()(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        ), False

    q4, k4, v4, m4 = _to_4d(query, key, value, attn_mask)
    # PyTorch's causal is top-left aligned: the kernels move their diagonal, no (L, S) mask is built
    spec = AttnSpec.build(cfg, causal="top_left" if is_causal else "none", attn_mask=m4, scale=scale,
                          layout=_memory_layout(q4), backend=backend, bwd_lowbit=bwd_lowbit,
                          bwd_recompute=bwd_recompute)
    out, _ = run(spec, q4, k4, v4, m4)
    if query.dim() == 3:
        return out.squeeze(1), True
    if query.dim() == 2:
        return out[0, 0], True
    return out, True


# --------------------------------------------------------------------------------------------
# patching torch.nn.functional.scaled_dot_product_attention
# --------------------------------------------------------------------------------------------


@dataclass
class _Patch:
    """A handle of ``enable_sdpa_patch``. ``replaced`` / ``passed``: eager calls the patch routed
    to qflash / handed to PyTorch (not counted while ``torch.compile`` traces)."""

    installed: object  # the wrapper put into torch.nn.functional
    previous: object  # what was there before it
    quant: str | QuantConfig
    fallback: bool
    active: bool = field(default=True)
    replaced: int = 0
    passed: int = 0


_PATCHES: list[_Patch] = []
_PATCH_LOCK = threading.RLock()


def original_sdpa():
    """The SDPA that fallbacks call: what ``F.scaled_dot_product_attention`` was before the
    outermost active qflash patch (normally PyTorch's builtin). Never a qflash wrapper."""
    if _PATCHES:
        return _PATCHES[0].previous
    current = F.scaled_dot_product_attention
    return _TORCH_SDPA if getattr(current, "__qflash_patch__", False) else current


def sdpa_patch_active() -> bool:
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` is routed through qflash."""
    return bool(_PATCHES)


def _make_wrapper(patch: _Patch):
    quant, fallback = patch.quant, patch.fallback

    def scaled_dot_product_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        out, routed = _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, quant, fallback,
                            "none", None, "auto")
        if not torch.compiler.is_compiling():
            if routed:
                patch.replaced += 1
            else:
                patch.passed += 1
        return out

    scaled_dot_product_attention.__qflash_patch__ = True
    scaled_dot_product_attention.__doc__ = (
        f"torch.nn.functional.scaled_dot_product_attention routed through qflash.sdpa(quant={quant!r}) "
        "by qflash.patch_sdpa; see qflash.sdpa."
    )
    scaled_dot_product_attention.__qualname__ = "qflash_patched_scaled_dot_product_attention"
    return scaled_dot_product_attention


def enable_sdpa_patch(quant: str | QuantConfig = "int8", *, fallback: bool = True) -> _Patch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through ``qflash.sdpa``.

    Affects every caller that looks the function up at call time (``F.scaled_dot_product_attention(...)``,
    diffusers, transformers' "sdpa" attention, ``nn.MultiheadAttention``); not code that bound the
    function to a local name before patching. Process-wide (all threads). Patches nest: each call
    pushes one, ``disable_sdpa_patch`` pops the innermost. Returns a handle for
    ``disable_sdpa_patch(handle)``.
    """
    resolve_quant(quant)  # fail early on a bad preset name
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback must be a bool, got {type(fallback).__name__}")
    with _PATCH_LOCK:
        patch = _Patch(installed=None, previous=F.scaled_dot_product_attention, quant=quant, fallback=fallback)
        patch.installed = _make_wrapper(patch)
        F.scaled_dot_product_attention = patch.installed
        _PATCHES.append(patch)
    return patch


def disable_sdpa_patch(handle: _Patch | None = None) -> bool:
    """Undo the innermost ``enable_sdpa_patch`` (or ``handle``, which must be the innermost).

    Restores the exact object that was in ``torch.nn.functional`` before that patch. Returns
    False when no qflash patch is active. If someone replaced SDPA on top of the qflash patch
    meanwhile, their replacement is discarded with a ``RuntimeWarning``.
    """
    with _PATCH_LOCK:
        if not _PATCHES:
            return False
        top = _PATCHES[-1]
        if handle is not None and handle is not top:
            if not getattr(handle, "active", False):
                return False  # already undone
            raise RuntimeError("qflash SDPA patches must be undone innermost first; this handle is not the innermost")
        if F.scaled_dot_product_attention is not top.installed:
            warnings.warn(
                "torch.nn.functional.scaled_dot_product_attention was replaced after qflash patched it; "
                "restoring the function from before the qflash patch discards that replacement",
                RuntimeWarning,
                stacklevel=2,
            )
        F.scaled_dot_product_attention = top.previous
        _PATCHES.pop()
        top.active = False
    return True


@contextlib.contextmanager
def patch_sdpa(quant: str | QuantConfig = "int8", *, fallback: bool = True):
    """Context manager: ``torch.nn.functional.scaled_dot_product_attention`` runs ``qflash.sdpa``.

    Example::

        with qflash.patch_sdpa(quant="int8"):
            image = pipe(prompt).images[0]

    On exit — normal or by exception — the exact previous function object is restored. Nestable
    (the inner ``quant`` wins inside the inner block). See ``enable_sdpa_patch``.
    """
    handle = enable_sdpa_patch(quant, fallback=fallback)
    try:
        yield handle
    finally:
        disable_sdpa_patch(handle)
