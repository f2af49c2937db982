"""qflash in Hugging Face transformers: ``attn_implementation="qattn-int8"`` and friends.

Usage::

    import qflash.integrations.transformers as qft

    qft.register()                     # "qattn" (int8) and "qattn-none", "qattn-int8", ... "qattn-fp8"
    model = AutoModel.from_pretrained(path, attn_implementation="qattn-int8")
    model.set_attn_implementation("qattn-int8-fp8")   # or switch a loaded model

Why not "qflash": transformers (5.x, ``utils.generic.is_flash_attention_requested``) treats every
implementation name that contains "flash" as a FlashAttention kernel and tries to import one for
it (``set_attn_implementation("qflash-int8")`` fails with "Could not find the currently requested
flash attention implementation"); ``register`` therefore refuses names containing "flash".

What is registered, through transformers' public interfaces (5.x):

- ``AttentionInterface.register(name, fn)``: ``fn`` has transformers' calling convention
  ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)`` with
  query/key/value in (B, H, S, D) (key/value with the model's key/value heads) and returns
  ``(attn_output (B, S, H, D), None)``; the attention is ``qflash.sdpa`` (CPU and other devices:
  the exact/fake-quant reference path; CUDA: the Triton kernels).
- ``AttentionMaskInterface.register(name, sdpa_mask)``: the model builds the same masks as for
  ``"sdpa"`` (a boolean mask, True = attend, or None when the call is purely causal / has no
  padding). Without this transformers builds *no* mask for an unknown name, and padding would
  be silently ignored.

Semantics, as transformers' own ``sdpa_attention_forward``:

- masks: bool (True = attend) or additive float (0 / ``finfo(dtype).min``), broadcastable to
  (B, H, S_q, S_k); with no mask, causal when the module says so (``is_causal`` keyword, else
  ``module.is_causal``, default True) and more than one query (top-left alignment, keys beyond
  the queries' count cropped, as transformers does for an empty static cache). Padded rows whose
  keys are all masked give zeros, never NaN. Anything else as a mask (a flex ``BlockMask``, an
  integer tensor) raises ``TypeError``.
- GQA: key/value heads fewer than query heads run with ``enable_gqa`` (no copy).
- ``scaling``: the softmax scale (default 1/sqrt(D)).
- ``dropout`` > 0 (a model in training mode with attention dropout) raises ``ValueError``: qflash
  has no attention dropout; call ``model.eval()``, set the config's attention dropout to 0, or
  train with ``attn_implementation="sdpa"``.
- Calls with a sliding window (``sliding_window`` keyword: Mistral, Gemma 2/3, Qwen2 ...), a
  position bias (T5-style), attention sinks (``s_aux``) or a softcap go to transformers'
  ``sdpa_attention_forward`` unchanged, with a one-time ``UserWarning`` per reason (softcap:
  transformers' own error).
- Calls ``qflash.sdpa`` cannot run quantised (fp64, head dims it does not support ...) go to
  PyTorch's SDPA with qflash's one-time ``QFlashFallbackWarning`` (``fallback=False``: raise).
"""

from __future__ import annotations

import warnings

import torch

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as _exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "qflash.integrations.transformers needs the optional dependency transformers (>= 5.0) with its "
        "AttentionInterface / AttentionMaskInterface, which is not importable here: pip install 'qflash[transformers]' "
        f"({type(_exc).__name__}: {_exc})"
    ) from _exc

from ..config import PRESETS, QuantConfig, resolve_quant
from ..dropin import sdpa

__all__ = ["attention_function", "register", "registered", "unregister"]

_WARNED: set[str] = set()
_REGISTERED: dict[str, object] = {}

# keyword -> why the call goes to transformers' sdpa_attention_forward instead
_UNSUPPORTED_KWARGS = {
    "sliding_window": "a sliding window",
    "position_bias": "a position bias",
    "s_aux": "attention sinks (s_aux)",
    "softcap": "a logit softcap",
}


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def attention_function(quant: str | QuantConfig = "int8", *, fallback: bool = True, backend: str = "auto",
                       bwd_lowbit: str = "none", bwd_recompute: bool | None = None, name: str = "qattn"):
    """A transformers attention function (for ``AttentionInterface.register``) running ``qflash.sdpa``.

    ``quant``, ``fallback``, ``backend``, ``bwd_lowbit``, ``bwd_recompute`` are ``qflash.sdpa``'s;
    ``name`` only appears in messages.
    """
    resolve_quant(quant)  # fail early on a bad preset name
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback must be a bool, got {type(fallback).__name__}")

    def qflash_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        for kw, what in _UNSUPPORTED_KWARGS.items():
            if kwargs.get(kw) is not None:
                _warn_once(
                    kw,
                    f"qflash ({name}): {type(module).__name__} asks for {what}, which the qflash transformers "
                    "integration does not run; these calls use transformers' 'sdpa' attention (not quantised)",
                )
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
        if dropout:
            raise ValueError(
                f"qflash ({name}): attention dropout {dropout} was requested ({type(module).__name__} is in training "
                "mode with attention dropout); qflash has no attention dropout. Call model.eval(), set the config's "
                "attention dropout to 0, or train with attn_implementation='sdpa'"
            )
        if kwargs.get("output_attentions", False):
            _warn_once("output_attentions", f"qflash ({name}) does not return attention weights "
                       "(output_attentions=True); use attn_implementation='eager' for them")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or not (
                attention_mask.dtype == torch.bool or attention_mask.is_floating_point()
            ):
                raise TypeError(
                    f"qflash ({name}): unsupported attention mask {type(attention_mask).__name__}"
                    f"{'' if not isinstance(attention_mask, torch.Tensor) else ' of dtype ' + str(attention_mask.dtype)}"
                    "; expected None, a bool tensor (True = attend) or an additive float tensor. Register with "
                    "qflash.integrations.transformers.register(), which sets up the same masks as 'sdpa'"
                )
            if attention_mask.is_floating_point() and attention_mask.dtype != query.dtype:
                # e.g. an fp32 mask of finfo(fp32).min for fp16 queries: clamp, so it stays finite
                attention_mask = attention_mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        q_len, kv_len = query.shape[2], key.shape[2]
        is_causal = kwargs.get("is_causal")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(is_causal) and attention_mask is None and q_len > 1
        if is_causal and kv_len > q_len:  # prefill into an empty static cache: the rest is empty
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        enable_gqa = key.shape[1] != query.shape[1]
        out = sdpa(query, key, value, attn_mask=attention_mask, is_causal=is_causal, scale=scaling,
                   enable_gqa=enable_gqa, quant=quant, fallback=fallback, bwd_lowbit=bwd_lowbit,
                   bwd_recompute=bwd_recompute, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    qflash_attention_forward.__qualname__ = qflash_attention_forward.__name__ = f"qflash_attention_forward[{name}]"
    qflash_attention_forward.qflash_quant = quant
    return qflash_attention_forward


def register(name: str = "qattn", quant: str | QuantConfig = "int8", **options) -> list[str]:
    """Register qflash attention with transformers; returns the names registered.

    ``name`` runs ``quant``; ``f"{name}-{preset}"`` runs each preset (``qattn-none``,
    ``qattn-int8``, ``qattn-int8-fp8``, ``qattn-int4``, ``qattn-fp8``). ``options`` go to
    ``qflash.sdpa`` (``fallback``, ``backend``, ``bwd_lowbit``, ``bwd_recompute``). Each name
    also gets transformers' ``sdpa_mask`` as its mask builder. Registering again replaces.
    """
    if not isinstance(name, str) or not name or "/" in name or name in ("eager", "sdpa") or name.startswith(
            ("flex_attention", "paged")):
        raise ValueError(f"name must be a new attention implementation name without '/', got {name!r}")
    if "flash" in name.lower():
        raise ValueError(
            f"name {name!r} contains 'flash': transformers treats such names as FlashAttention kernels and tries to "
            "import one (set_attn_implementation fails); use a name without it, e.g. the default 'qattn'"
        )
    names = {name: quant}
    names.update({f"{name}-{preset}": preset for preset in PRESETS})
    for n, q in names.items():
        fn = attention_function(q, name=n, **options)
        AttentionInterface.register(n, fn)
        AttentionMaskInterface.register(n, sdpa_mask)
        _REGISTERED[n] = fn
    return list(names)


def registered() -> list[str]:
    """The names this module registered (and did not unregister)."""
    return list(_REGISTERED)


def unregister(name: str | None = None) -> list[str]:
    """Remove the names ``register(name)`` added (all qflash names if None); returns them.

    Models already set to one of them fail at their next forward (transformers: not a valid
    attention implementation); switch them first (``model.set_attn_implementation("sdpa")``).
    """
    gone = [n for n in _REGISTERED if name is None or n == name or n.startswith(f"{name}-")]
    for n in gone:
        AttentionInterface._global_mapping.pop(n, None)
        AttentionMaskInterface._global_mapping.pop(n, None)
        del _REGISTERED[n]
    return gone

