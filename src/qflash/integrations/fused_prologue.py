"""``fuse_prologue=True`` of ``qflash.integrations.diffusers.apply``: the q/k RMSNorm, RoPE and
[text, image] concat that precede attention done by ``qflash.fused.qkv_prologue`` (two Triton
launches that write Q and the preset's quantised K/V), then ``qflash.attention(q, QuantizedKV)``.

The diffusers processors call ``flux_attention`` / ``generic_attention``; each returns None when
the call does not match the pattern it fuses (an attention mask, gradients, a norm that is not an
RMSNorm, norms with different eps, a preset whose K/V cannot be pre-quantised, a head dim the
Triton prologue does not take on CUDA), and the processor then runs its unfused body. Presets
that cannot be pre-quantised (``none``, ``int4``) still get the fused RMSNorm + RoPE
(``qflash.fused.rmsnorm_rope``) in the Flux processor (``flux_norm_rope``).

Shapes: the processors' (B, S, H, D) projections (strided views are fine); outputs (B, S, H, D).
"""

from __future__ import annotations

import torch

from ..api import attention
from ..config import QuantConfig, resolve_quant
from ..fused.qkv_prologue import rmsnorm_rope_quantize, triton_unsupported_reason
from ..fused.rmsnorm_rope import rmsnorm_rope
from ..prequant import preferred_v_order
from ..quant.kv import unsupported_reason

__all__ = ["flux_attention", "flux_norm_rope", "generic_attention", "norm_params"]

_NO_NORM = object()


def norm_params(norm, like: torch.Tensor):
    """(weight (D,), eps) of an RMSNorm module (diffusers' or torch's), ``(None, None)`` for no
    norm, or ``_NO_NORM`` when it is something else (LayerNorm, a bias, ...): not fusable."""
    if norm is None:
        return None, None
    if type(norm).__name__ != "RMSNorm" or getattr(norm, "bias", None) is not None:
        return _NO_NORM
    w = getattr(norm, "weight", None)
    if w is None:
        w = torch.ones(like.shape[-1], device=like.device, dtype=like.dtype)
    eps = getattr(norm, "eps", None)
    if eps is None:  # torch.nn.RMSNorm(eps=None): the input dtype's epsilon
        eps = torch.finfo(like.dtype).eps
    return w, float(eps)


def _fusable(cfg: QuantConfig, x: torch.Tensor, rope: bool, tensors) -> bool:
    if unsupported_reason(cfg) is not None:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False  # qflash.attention(q, QuantizedKV) is forward only
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(-1) != 1:
        return False
    # on CUDA only where the Triton prologue runs (its PyTorch path is for CPU and tests)
    return not x.is_cuda or triton_unsupported_reason(cfg, x.shape[-1], rope) is None


def _norms(attn, query, encoder_query):
    """(wq, wk, waq, wak, eps) of a Flux attention, or None if they cannot be fused."""
    parts = [norm_params(attn.norm_q, query), norm_params(attn.norm_k, query)]
    if encoder_query is not None:
        parts += [norm_params(getattr(attn, "norm_added_q", None), query),
                  norm_params(getattr(attn, "norm_added_k", None), query)]
    if any(p is _NO_NORM for p in parts) or any(p[0] is None for p in parts):
        return None
    eps = {p[1] for p in parts}
    if len(eps) != 1:  # one eps per launch
        return None
    ws = [p[0] for p in parts] + [None, None]
    return ws[0], ws[1], ws[2], ws[3], eps.pop()


def flux_attention(attn, query, key, value, encoder_query, encoder_key, encoder_value, image_rotary_emb, quant,
                   attn_mask=None):
    """Flux's prologue + attention fused: ``(B, S_txt + S_img, H, D)`` or None (not fusable).

    query/key/value (B, S_img, H, D); encoder_* (B, S_txt, H, D) or None (single-stream blocks);
    image_rotary_emb (cos, sin) (S_txt + S_img, D) or None.
    """
    if attn_mask is not None:
        return None
    cfg = resolve_quant(quant)
    rope = image_rotary_emb is not None
    if not _fusable(cfg, query, rope, (query, key, value, encoder_query, encoder_key, encoder_value)):
        return None
    norms = _norms(attn, query, encoder_query)
    if norms is None:
        return None
    wq, wk, waq, wak, eps = norms
    cos, sin = image_rotary_emb if rope else (None, None)
    q, qkv = rmsnorm_rope_quantize(query, key, value, cfg, norm_q=wq, norm_k=wk, eps=eps, cos=cos, sin=sin,
                                   q_prefix=encoder_query, k_prefix=encoder_key, v_prefix=encoder_value,
                                   norm_q_prefix=waq, norm_k_prefix=wak,
                                   v_order=preferred_v_order(cfg, query.device, query.dtype, query.shape[-1]))
    return attention(q, qkv, layout="NHD")


def flux_norm_rope(attn, query, key, encoder_query, encoder_key, image_rotary_emb):
    """The fused RMSNorm + concat + RoPE of q and k alone (``rmsnorm_rope``, one launch each), for
    presets whose K/V are quantised inside attention: ``(query, key)`` or None (not fusable)."""
    norms = _norms(attn, query, encoder_query)
    if norms is None or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)):
        return None
    wq, wk, waq, wak, eps = norms
    cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
    return (rmsnorm_rope(query, wq, cos, sin, eps, x_prefix=encoder_query, weight_prefix=waq),
            rmsnorm_rope(key, wk, cos, sin, eps, x_prefix=encoder_key, weight_prefix=wak))


def generic_attention(attn, query, key, value, quant, attn_mask=None):
    """``AttnProcessor2_0``'s q/k norm + attention fused: HND views in (B, H, S, D), the HND view of
    a (B, Sq, H, D) output out, or None (not fusable: a mask, a non-RMSNorm norm, ...)."""
    if attn_mask is not None:
        return None
    cfg = resolve_quant(quant)
    qn, kn, vn = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views
    if not _fusable(cfg, kn, False, (query, key, value)) or qn.stride(-1) != 1 or vn.stride(-1) != 1:
        return None
    pq, pk = norm_params(attn.norm_q, qn), norm_params(attn.norm_k, kn)
    if pq is _NO_NORM or pk is _NO_NORM:
        return None
    (wq, eps_q), (wk, eps_k) = pq, pk
    order = preferred_v_order(cfg, kn.device, kn.dtype, kn.shape[-1])
    if wq is not None and wk is not None and eps_q == eps_k and qn.shape[1] == kn.shape[1]:
        q, qkv = rmsnorm_rope_quantize(qn, kn, vn, cfg, norm_q=wq, norm_k=wk, eps=eps_q, v_order=order)
    else:  # cross-attention, one norm only, or none: Q as diffusers computes it, K's norm fused
        q = (attn.norm_q(query) if attn.norm_q is not None else query).transpose(1, 2)
        _, qkv = rmsnorm_rope_quantize(None, kn, vn, cfg, norm_k=wk, eps=eps_k if wk is not None else 0.0,
                                       v_order=order)
    return attention(q, qkv, layout="NHD").transpose(1, 2)
