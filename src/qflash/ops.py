"""``torch.library`` custom ops: the layer between the public API and the dispatcher.

Two ops are registered here::

    qflash::attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, str spec) -> (Tensor, Tensor)
    qflash::attention_bwd(Tensor q, Tensor k, Tensor v, Tensor? out, Tensor? lse, Tensor grad_out,
                          Tensor? grad_lse, Tensor? attn_mask, str spec, bool mask_grad)
                          -> (Tensor, Tensor, Tensor, Tensor)

``spec`` is ``AttnSpec.key()`` (``qflash.spec``): the call's whole description as one string,
parsed back once per distinct call (cached). The forward runs ``qflash.kernels.dispatch.forward``
(the family the spec and the tensors select); the ops give it what ``torch.compile`` /
``torch.export`` / CUDA graphs need: fake (meta) implementations with the exact output shapes,
dtypes and strides, and the straight-through autograd of ``qflash.autograd``.

Shapes (all "HND", possibly strided views of "NHD" tensors; nothing is copied on the way in):

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); fp16 / bf16 / fp32, one dtype.
    attn_mask: None, or bool (True = attend) / float (additive), broadcastable to (B, Hq, Sq, Sk).
    returns out (B, Hq, Sq, Dv) in q's dtype, and lse:
        - spec.return_lse: fp32 (B, Hq, Sq), contiguous, natural-log log-sum-exp of the scaled,
          masked scores (-inf for rows with every key masked);
        - otherwise an empty fp32 tensor of shape (0,) (custom ops cannot return None).
    spec.layout "HND": ``out`` is contiguous (B, Hq, Sq, Dv); "NHD": ``out`` is the (B, Hq, Sq, Dv)
        view of a contiguous (B, Sq, Hq, Dv) buffer, so ``out.transpose(1, 2)`` is contiguous.

``run(spec, q, k, v, attn_mask)`` is the one way in from Python: plain eager inference (no
autograd, not tracing, ordinary tensors) calls the dispatcher directly — the op dispatcher costs
~100 µs of CPU per call, as much as a whole small attention — and everything else (torch.compile,
autograd, tensor subclasses, modes) goes through the op.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import autograd
from .autograd import bwd_recompute_default  # noqa: F401  (re-exported: the policy lives in qflash.autograd)
from .config import QuantConfig
from .kernels import dispatch
from .reference import reference_backward  # noqa: F401  (re-exported)
from .spec import BACKENDS, BWD_LOWBIT_MODES, LAYOUTS, AttnSpec, check_bwd_args, config_from_key, config_key

__all__ = [
    "BACKENDS",
    "BWD_LOWBIT_MODES",
    "OUT_LAYOUTS",
    "attention_bwd",
    "attention_fwd",
    "bwd_recompute_default",
    "call_attention_fwd",
    "check_bwd_args",
    "config_from_key",
    "config_key",
    "reference_backward",
    "run",
    "run_kv",
]

OUT_LAYOUTS = LAYOUTS


def _empty_out(q: torch.Tensor, v: torch.Tensor, out_layout: str) -> torch.Tensor:
    """Uninitialised output (B, Hq, Sq, Dv) in q's dtype, with ``out_layout``'s memory order."""
    B, H, Sq, _ = q.shape
    Dv = v.shape[-1]
    if out_layout == "NHD":
        return q.new_empty((B, Sq, H, Dv)).transpose(1, 2)
    return q.new_empty((B, H, Sq, Dv))


def _op_spec(q, attn_mask, key: str) -> AttnSpec:
    if q.dim() != 4:
        raise ValueError(f"qflash::attention_fwd takes HND tensors (B, H, S, D); got q of shape {tuple(q.shape)}")
    spec = AttnSpec.from_key(key)
    if (attn_mask is None) != (spec.mask == "none"):
        raise ValueError(f"spec says mask kind {spec.mask!r} but attn_mask is {'None' if attn_mask is None else 'given'}")
    return spec


@torch.library.custom_op("qflash::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    spec: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantised attention forward on validated HND tensors; see the module docstring."""
    s = _op_spec(q, attn_mask, spec)
    out, lse = dispatch.forward(s, q, k, v, attn_mask)
    # Pin the output metadata the fake implementation promises, whatever the family returned.
    want = _empty_out(q, v, s.layout)
    if out.dtype != q.dtype or out.shape != want.shape or out.stride() != want.stride():
        want.copy_(out)
        out = want
    if s.return_lse:
        lse = lse.to(torch.float32).contiguous()
    else:
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, attn_mask, spec):
    s = _op_spec(q, attn_mask, spec)
    out = _empty_out(q, v, s.layout)
    B, H, Sq, _ = q.shape
    lse = q.new_empty((B, H, Sq) if s.return_lse else (0,), dtype=torch.float32)
    return out, lse


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
    spec: str,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through gradients of ``qflash::attention_fwd`` on the family ``spec.backend`` names.

    ``out`` / ``lse``: the forward's (exact for ``none``, the quantised ones when the policy reuses
    them), used as they are; None: the exact O and lse are recomputed first (one ``none`` forward).
    Returns (dq like q, dk like k, dv like v, dmask): dmask has ``attn_mask``'s shape and dtype
    when ``mask_grad`` (float masks only), else an empty (0,) tensor.
    """
    s = AttnSpec.from_key(spec)
    dq, dk, dv, dmask = dispatch.family(s.backend).backward(
        s, q, k, v, out, lse, grad_out, grad_lse, attn_mask, mask_grad=mask_grad,
        grad_buffers=(_grad_buffer(q), _grad_buffer(k), _grad_buffer(v)),
    )
    if dmask is None:
        dmask = q.new_empty((0,), dtype=torch.float32)
    elif dmask.shape != attn_mask.shape or not dmask.is_contiguous():
        dmask = dmask.expand(attn_mask.shape).contiguous()
    return dq, dk, dv, dmask


@attention_bwd.register_fake
def _attention_bwd_fake(q, k, v, out, lse, grad_out, grad_lse, attn_mask, spec, mask_grad):
    if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = q.new_empty((0,), dtype=torch.float32)
    return _grad_buffer(q), _grad_buffer(k), _grad_buffer(v), dmask


attention_fwd.register_autograd(autograd.backward, setup_context=autograd.setup_context)


# --------------------------------------------------------------------------------------------
# the way in from Python
# --------------------------------------------------------------------------------------------


_is_compiling = torch.compiler.is_compiling


def _dispatch_mode():
    return _get_current_dispatch_mode()


def _eager_fast_path(q, k, v, attn_mask) -> bool:
    """Plain eager inference on plain tensors: no autograd, no compile trace, no dispatch or
    torch-function mode (then the op and its dispatcher can be skipped). Called on every small
    call, so it uses the cheapest form of each test (~1 µs)."""
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return False  # subclasses (FakeTensor, functorch wrappers) need the dispatcher
    if attn_mask is not None and type(attn_mask) is not torch.Tensor:
        return False
    if _is_compiling():
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (attn_mask is not None and attn_mask.requires_grad)):
        return False
    # plain tensors see __torch_function__ only through a mode, __torch_dispatch__ likewise
    return _dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled()


def run(spec: AttnSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None):
    """Attention on validated HND tensors described by ``spec``: ``(out, lse | None)``.

    Plain eager inference skips the op (module docstring); otherwise the op runs, asking for the
    lse also when the gradient policy keeps it for the backward (``autograd.wants_lse``).
    """
    if _eager_fast_path(q, k, v, attn_mask):
        return dispatch.forward(spec, q, k, v, attn_mask)
    want_lse = autograd.wants_lse(spec, q, k, v, attn_mask)
    out, lse = torch.ops.qflash.attention_fwd(q, k, v, attn_mask, spec.key(want_lse))
    return out, (lse if spec.return_lse else None)


def run_kv(spec: AttnSpec, q: torch.Tensor, qkv, attn_mask: torch.Tensor | None = None):
    """Attention of validated HND q on a ``QuantizedKV`` (``qflash.prequant``): ``(out, lse | None)``.

    Forward only, eager: the dispatcher's ``forward_kv`` directly (no custom op, so no
    ``torch.compile`` graph and no autograd; ``qflash.attention`` refuses q that needs a gradient).
    """
    return dispatch.forward_kv(spec, q, qkv, attn_mask)


def call_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    quant: str | QuantConfig,
    *,
    causal: bool | str = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out_layout: str = "HND",
    backend: str = "auto",
    bwd_lowbit: str = "none",
    bwd_recompute: bool | None = None,
):
    """``run`` with the options as keywords (tests, benchmarks): builds the ``AttnSpec``."""
    spec = AttnSpec.build(quant, causal=causal, attn_mask=attn_mask, scale=scale, layout=out_layout,
                          return_lse=return_lse, backend=backend, bwd_lowbit=bwd_lowbit, bwd_recompute=bwd_recompute)
    return run(spec, q, k, v, attn_mask)
