"""The seam between the dispatcher and a kernel family: what a family declares, and what it implements.

A family is a package under ``qflash/kernels/`` (``portable/``, ``hopper/``) whose ``__init__.py``
exposes ``FAMILY``, an object with:

- ``name: str`` — the ``backend=`` name that selects it explicitly;
- ``support: FamilySupport`` — what it runs, as data (below); ``qflash info`` prints it;
- ``supports(spec, q, k, v, attn_mask) -> (bool, str)`` — whether it runs this call, and the reason
  when not. ``Family.supports`` checks ``support`` and then calls ``check_extra`` for whatever a
  table cannot say (e.g. a granularity the kernels do not implement). Must never raise for a call
  that passed validation. It may read only the spec, the device, the dtype, the head dim and
  whether Hq != Hkv: ``dispatch.select`` caches its decision on exactly those (sequence lengths,
  strides or alignment would need the key in ``dispatch.select`` extended first);
- ``forward(spec, q, k, v, attn_mask) -> (out, lse | None)`` — the attention forward (contract below);
- ``backward(spec, q, k, v, out, lse, grad_out, grad_lse, attn_mask, *, mask_grad, grad_buffers)
  -> (dq, dk, dv, dmask | None)`` — only if ``support.backward``; straight-through gradients
  (``qflash.autograd`` decides ``out``/``lse`` reuse and passes None to ask for a recompute);
- ``tuning(device) -> str`` — one line for ``qflash info``: which tuning table it would use.

Tensor contract (both directions): q (B, Hq, Sq, D), k / v (B, Hkv, Sk, D) HND views (possibly
strided views of NHD buffers; the channel dim may be non-contiguous only if the family copies),
validated by ``qflash.api.validate_inputs``; ``attn_mask`` None or broadcastable to (B, Hq, Sq, Sk),
its kind in ``spec.mask``. ``forward`` returns ``out`` (B, Hq, Sq, D) in q's dtype (for
``spec.layout == "NHD"`` the HND view of a contiguous (B, Sq, Hq, D) buffer) and, when
``spec.return_lse``, lse fp32 (B, Hq, Sq), natural log, -inf for rows with no visible key (else None).
Causal alignment is ``spec.causal`` ("bottom_right" / "top_left"; ``common.causal_offset``).

Registering: add the package's ``FAMILY`` to ``dispatch._ORDER`` (first = preferred); nothing above
the dispatcher changes. ``backend="auto"`` walks the order and takes the first family whose
``supports`` says yes (``reference`` last: it supports everything), so auto never raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ALL_DTYPES", "Family", "FamilySupport"]

ALL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


@dataclass(frozen=True)
class FamilySupport:
    """What a kernel family runs, as data. Every field is checked by ``check``.

    devices: device types it runs on ("cuda"; the reference family: "cpu", "cuda", "mps", ...;
        empty = any). A family with ``interpreter`` also runs on "cpu" under ``TRITON_INTERPRET=1``
        when named explicitly with ``backend=`` (tests), never under ``backend="auto"``.
    min_cc / max_cc: CUDA compute capability range, inclusive ((9, 0) = sm_90); None = unbounded.
    dtypes: input dtypes. head_dims: (min, max) inclusive; head_dim_multiple: D % it == 0.
    presets: preset names whose ``QuantConfig`` it runs (compared by identity or equality), or
        None for "any config ``check_extra`` accepts".
    masks: ``spec.mask`` kinds ("none", "bool", "additive"). causal: ``spec.causal`` values.
    lse: can return the log-sum-exp. layouts: output layouts ("HND", "NHD"). gqa: Hq != Hkv.
    backward: implements ``backward`` (straight-through gradients).
    """

    devices: frozenset = frozenset({"cuda"})
    interpreter: bool = False
    min_cc: tuple[int, int] | None = None
    max_cc: tuple[int, int] | None = None
    dtypes: frozenset = ALL_DTYPES
    head_dims: tuple[int, int] = (1, 256)
    head_dim_multiple: int = 1
    presets: frozenset | None = None
    masks: frozenset = frozenset({"none", "bool", "additive"})
    causal: frozenset = frozenset({"none", "bottom_right", "top_left"})
    lse: bool = True
    layouts: frozenset = frozenset({"HND", "NHD"})
    gqa: bool = True
    backward: bool = False
    notes: str = field(default="", compare=False)

    def device_ok(self, device: torch.device, explicit: bool) -> str | None:
        """None if the family can run on ``device``, else the reason."""
        if device.type == "cuda" and "cuda" in self.devices:
            if self.min_cc is not None or self.max_cc is not None:
                cc = _capability(device)
                if self.min_cc is not None and cc < self.min_cc:
                    return f"needs compute capability >= {self.min_cc}, this GPU is {cc}"
                if self.max_cc is not None and cc > self.max_cc:
                    return f"needs compute capability <= {self.max_cc}, this GPU is {cc}"
            return None
        if not self.devices or device.type in self.devices:
            return None
        if self.interpreter and explicit and device.type == "cpu":
            from .common import triton_usable

            ok, why = triton_usable(device)
            return None if ok else why
        return f"runs on {sorted(self.devices)}, not {device.type}"

    def check(self, spec, q: torch.Tensor, k: torch.Tensor, attn_mask, explicit: bool = False) -> str | None:
        """None if the declared support covers this call, else the first reason it does not."""
        why = self.device_ok(q.device, explicit)
        if why is not None:
            return why
        if q.dtype not in self.dtypes:
            return f"dtype {q.dtype}"
        D = q.shape[-1]
        if not self.head_dims[0] <= D <= self.head_dims[1] or D % self.head_dim_multiple:
            return f"head dim {D} (supports {self.head_dims[0]}..{self.head_dims[1]}, multiple of {self.head_dim_multiple})"
        if spec.mask not in self.masks:
            return f"mask kind {spec.mask}"
        if spec.causal not in self.causal:
            return f"causal alignment {spec.causal}"
        if spec.return_lse and not self.lse:
            return "return_lse"
        if spec.layout not in self.layouts:
            return f"layout {spec.layout}"
        if not self.gqa and q.shape[1] != k.shape[1]:
            return "GQA (Hq != Hkv)"
        if self.presets is not None:
            cfg = spec.quant
            from ..config import PRESETS

            if not any(PRESETS[p] is cfg or PRESETS[p] == cfg for p in self.presets):
                return f"quant config {cfg.name!r} (supports presets {sorted(self.presets)})"
        return None


_CC: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cc = _CC.get(idx)
    if cc is None:
        cc = _CC[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cc


class Family:
    """Base class of a kernel family (see the module docstring for the protocol)."""

    name: str = "?"
    support: FamilySupport = FamilySupport()

    def supports(self, spec, q, k, v, attn_mask, *, explicit: bool = False) -> tuple[bool, str]:
        why = self.support.check(spec, q, k, attn_mask, explicit)
        if why is None:
            why = self.check_extra(spec, q, k, v, attn_mask)
        return (why is None), (why or "")

    def check_extra(self, spec, q, k, v, attn_mask) -> str | None:
        """What ``support`` cannot express; None = supported."""
        return None

    def forward(self, spec, q, k, v, attn_mask):
        raise NotImplementedError(f"kernel family {self.name!r} has no forward")

    def backward(self, spec, q, k, v, out, lse, grad_out, grad_lse, attn_mask, *, mask_grad, grad_buffers=None):
        raise NotImplementedError(f"kernel family {self.name!r} has no backward")

    def tuning(self, device: torch.device) -> str:
        return "no tuning table"

    def __repr__(self) -> str:
        return f"<qflash kernel family {self.name!r}>"
