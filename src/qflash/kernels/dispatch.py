"""The dispatcher: which kernel family runs a call, from what each family declares it supports.

``FAMILIES`` is the registry, in order of preference: ``hopper`` (sm_90 Gluon), ``portable``
(Triton, any CUDA GPU), ``reference`` (pure PyTorch, any device, every config — the fake-quant
reference computes the kernels' numbers). ``backend="auto"`` takes the first family whose
``supports`` says yes, so it never raises; ``backend="<family>"`` runs that family or raises
``NotImplementedError`` with its reason. The protocol a family implements is in
``qflash.kernels.family``; a new family is one line in ``_ORDER``.

Imports nothing from ``qflash.ops`` / ``qflash.api`` (layers above), and no Triton until a
family's ``forward`` runs.
"""

from __future__ import annotations

import torch

from .family import Family, FamilySupport
from .hopper import FAMILY as _HOPPER
from .portable import FAMILY as _PORTABLE

__all__ = ["FAMILIES", "REFERENCE", "backward_family", "family", "forward", "forward_kv", "preferred_kv_order",
           "select", "select_kv", "explain"]

ALIASES = {"triton": "portable"}  # the pre-families name of the portable family


class ReferenceFamily(Family):
    """``qflash.reference.fake_quant_attention`` (forward) and the exact fp32 backward: every
    device, every config; the last resort of ``backend="auto"``."""

    name = "reference"
    support = FamilySupport(devices=frozenset(), head_dims=(1, 1 << 30), backward=True,
                            notes="pure PyTorch, any device, any QuantConfig")

    def forward(self, spec, q, k, v, attn_mask):
        from ..reference import fake_quant_attention

        res = fake_quant_attention(q, k, v, spec.quant, causal=spec.is_causal, attn_mask=attn_mask, scale=spec.scale,
                                   return_lse=spec.return_lse, top_left=spec.top_left)
        out, lse = res if spec.return_lse else (res, None)
        if spec.layout == "NHD":
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
        return out, lse

    def supports_kv(self, spec, q, qkv, attn_mask, *, explicit=False) -> tuple[bool, str]:
        return True, ""

    def forward_kv(self, spec, q, qkv, attn_mask):
        """``reference.fake_quant_attention_kv``: the given codes, dequantised (``QuantizedKV``)."""
        from ..reference import fake_quant_attention_kv

        res = fake_quant_attention_kv(q, qkv, causal=spec.is_causal, attn_mask=attn_mask, scale=spec.scale,
                                      return_lse=spec.return_lse, top_left=spec.top_left)
        out, lse = res if spec.return_lse else (res, None)
        if spec.layout == "NHD":
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
        return out, lse

    def backward(self, spec, q, k, v, out, lse, grad_out, grad_lse, attn_mask, *, mask_grad, grad_buffers=None):
        from ..reference import reference_backward

        dq, dk, dv, dmask = reference_backward(q, k, v, grad_out, grad_lse, causal=spec.is_causal,
                                               attn_mask=attn_mask, scale=spec.scale, top_left=spec.top_left)
        return dq, dk, dv, (dmask if mask_grad else None)

    def tuning(self, device) -> str:
        return "none (pure PyTorch)"


REFERENCE = ReferenceFamily()
_ORDER: tuple[Family, ...] = (_HOPPER, _PORTABLE, REFERENCE)
FAMILIES: dict[str, Family] = {f.name: f for f in _ORDER}


def family(name: str) -> Family:
    """The registered family called ``name`` (or an alias such as "triton")."""
    fam = FAMILIES.get(ALIASES.get(name, name))
    if fam is None:
        raise ValueError(f"backend must be 'auto' or one of {sorted(FAMILIES) + sorted(ALIASES)}, got {name!r}")
    return fam


# Decisions already taken, keyed on everything ``FamilySupport.check`` and the families'
# ``check_extra`` read: the spec (by identity: ``AttnSpec.build`` and ``from_key`` hand out one
# object per distinct call description; the value keeps it alive and is compared with ``is``, so
# hashing the nested config is not a per-call cost), device, dtype, head dim and GQA. Support is
# data and does not change while the process runs.
_CHOICES: dict[tuple, tuple] = {}


def select(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask) -> Family:
    """The family that runs this forward: the named one (``spec.backend``), or the first that
    supports the call. A named family that cannot run it raises ``NotImplementedError``."""
    dev = q.device
    key = (id(spec), dev.type, dev.index, q.dtype, q.shape[-1], q.shape[1] == k.shape[1])
    hit = _CHOICES.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    fam = _select(spec, q, k, v, attn_mask)
    if len(_CHOICES) >= 4096:
        _CHOICES.clear()
    _CHOICES[key] = (spec, fam)
    return fam


def _select(spec, q, k, v, attn_mask) -> Family:
    if spec.backend != "auto":
        fam = family(spec.backend)
        ok, why = fam.supports(spec, q, k, v, attn_mask, explicit=True)
        if not ok:
            raise NotImplementedError(f"qflash kernel family {fam.name!r} cannot run this call: {why}")
        return fam
    for fam in _ORDER:
        if fam.supports(spec, q, k, v, attn_mask)[0]:
            return fam
    return REFERENCE  # unreachable: the reference supports everything


def forward(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask):
    """Run the forward on the selected family: ``(out, lse | None)`` (contract: ``family``)."""
    return select(spec, q, k, v, attn_mask).forward(spec, q, k, v, attn_mask)


# --- pre-quantised K/V (``qflash.quant.kv.QuantizedKV``) -----------------------------------------
# A family that reads them has ``supports_kv(spec, q, qkv, attn_mask, *, explicit) -> (ok, why)``,
# ``forward_kv(spec, q, qkv, attn_mask) -> (out, lse)`` (the ``forward`` contract with K/V given as
# codes) and ``kv_order(cfg, device, dtype, head_dim) -> "keys" | "hopper" | None`` (the Vᵀ order it
# reads without a gather; None: it would not run that call). Optional: families without them are
# skipped. Not cached: ``supports_kv`` is a few attribute reads.


def select_kv(spec, q: torch.Tensor, qkv, attn_mask) -> Family:
    """The family that runs attention on a ``QuantizedKV``: the named one, or the first that can."""
    if spec.backend != "auto":
        fam = family(spec.backend)
        if not hasattr(fam, "forward_kv"):
            raise NotImplementedError(f"qflash kernel family {fam.name!r} does not take pre-quantised K/V")
        ok, why = fam.supports_kv(spec, q, qkv, attn_mask, explicit=True)
        if not ok:
            raise NotImplementedError(f"qflash kernel family {fam.name!r} cannot run this call on a QuantizedKV: {why}")
        return fam
    for fam in _ORDER:
        if hasattr(fam, "supports_kv") and fam.supports_kv(spec, q, qkv, attn_mask)[0]:
            return fam
    return REFERENCE


def forward_kv(spec, q: torch.Tensor, qkv, attn_mask):
    """``forward`` with pre-quantised keys and values: ``(out, lse | None)``."""
    return select_kv(spec, q, qkv, attn_mask).forward_kv(spec, q, qkv, attn_mask)


def preferred_kv_order(cfg, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The Vᵀ order of the first family that would run ``cfg`` on this device ("keys" if none says)."""
    for fam in _ORDER:
        order = fam.kv_order(cfg, device, dtype, head_dim) if hasattr(fam, "kv_order") else None
        if order is not None:
            return order
    return "keys"


def backward_family(spec, q: torch.Tensor, k: torch.Tensor, attn_mask) -> Family:
    """The family that computes the straight-through gradients: the named family if it has a
    backward, else the first family with ``support.backward`` whose declared support (device,
    dtype, head dim, masks, ...; not the quant config: the gradients are exact attention's)
    covers the call."""
    explicit = spec.backend != "auto"
    if explicit:
        fam = family(spec.backend)
        if fam.support.backward and fam.support.check(spec, q, k, attn_mask, True) is None:
            return fam
    for fam in _ORDER:
        if fam.support.backward and fam.support.check(spec, q, k, attn_mask, explicit) is None:
            return fam
    return REFERENCE


def explain(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None) -> list[tuple[str, bool, str]]:
    """[(family, supported, reason)] in registry order, for ``qflash info`` and debugging."""
    return [(f.name, *f.supports(spec, q, k, v, attn_mask)) for f in _ORDER]
