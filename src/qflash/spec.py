"""``AttnSpec``: the one description of an attention call that every layer below the API takes.

Built once by ``qflash.attention`` / ``qflash.sdpa`` / ``qflash.sageattn`` after validation, and
never re-derived below: the op, the gradient policy, the dispatcher and every kernel family read
their options from it. The ``torch.library`` op takes it as one string, ``AttnSpec.key()``, and
turns it back with ``AttnSpec.from_key`` (cached): the only serialisation in the package.

Causal alignment (``causal``):

- ``"none"``: no causal mask;
- ``"bottom_right"`` (FlashAttention's, ``qflash.attention``'s): query i sees key j iff
  ``j <= i + Sk - Sq``;
- ``"top_left"`` (PyTorch SDPA's): query i sees key j iff ``j <= i``.

They agree when Sq == Sk. The kernels take the diagonal offset (``kernels.common.causal_offset``),
so neither alignment builds a mask tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import PRESETS, Granularity, OperandQuant, QuantConfig, resolve_quant

__all__ = [
    "AttnSpec",
    "BACKENDS",
    "BWD_LOWBIT_MODES",
    "CAUSAL_ALIGNS",
    "LAYOUTS",
    "MASK_KINDS",
    "config_from_key",
    "config_key",
    "mask_kind",
]

CAUSAL_ALIGNS = ("none", "bottom_right", "top_left")
MASK_KINDS = ("none", "bool", "additive")
LAYOUTS = ("HND", "NHD")
BWD_LOWBIT_MODES = ("none", "int8")
#: "auto" (the dispatcher picks), a family name ("hopper", "portable", "reference"), or "triton",
#: the pre-families name of "portable" (kept as an alias).
BACKENDS = ("auto", "hopper", "portable", "reference", "triton")


def mask_kind(attn_mask) -> str:
    """"none", "bool" or "additive" for an attn_mask tensor (or None)."""
    if attn_mask is None:
        return "none"
    return "bool" if not attn_mask.is_floating_point() else "additive"


@dataclass(frozen=True)
class AttnSpec:
    """Everything about one attention call except its tensors (validated; hashable).

    quant: the resolved ``QuantConfig``.
    causal: "none" | "bottom_right" | "top_left" (module docstring).
    mask: kind of ``attn_mask``: "none" | "bool" (True = attend) | "additive" (float).
    scale: softmax scale, or None for ``1 / sqrt(D)``.
    layout: memory layout of the caller's tensors and of the output, "HND" or "NHD" (below the
        API the tensors are always HND views; ``layout`` says how the output buffer is laid out).
    return_lse: whether the forward returns the log-sum-exp (the op may ask for it on its own
        when the backward reuses the forward's O and lse).
    backend: "auto" or a family name (``BACKENDS``).
    bwd_lowbit: the backward's matmuls, "none" | "int8".
    bwd_recompute: True / False / None (the gradient policy decides; ``qflash.autograd``).
    """

    quant: QuantConfig
    causal: str = "none"
    mask: str = "none"
    scale: float | None = None
    layout: str = "HND"
    return_lse: bool = False
    backend: str = "auto"
    bwd_lowbit: str = "none"
    bwd_recompute: bool | None = None

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def build(quant: str | QuantConfig = "int8", *, causal: bool | str = False, attn_mask=None,
              scale: float | None = None, layout: str = "HND", return_lse: bool = False, backend: str = "auto",
              bwd_lowbit: str = "none", bwd_recompute: bool | None = None) -> AttnSpec:
        """Checked construction from the public API's arguments; ``causal=True`` is bottom-right.

        Checks the options (not the tensors: that is ``qflash.api.validate_inputs``); raises a
        ValueError / TypeError naming the argument.
        """
        cfg = quant if isinstance(quant, QuantConfig) else resolve_quant(quant)
        check_bwd_args(bwd_lowbit, bwd_recompute)
        mask = mask_kind(attn_mask)
        # specs are immutable: a call with the same options gets the same object (the config by
        # identity, kept alive by the spec), so hot paths skip the construction and the
        # dispatcher can key its cache on the spec's identity
        # (not while torch.compile traces: it would guard on the cache's contents)
        hit = key = None
        if not torch.compiler.is_compiling():
            key = (id(cfg), causal, mask, scale, layout, return_lse, backend, bwd_lowbit, bwd_recompute)
            try:
                hit = _BUILT.get(key)
            except TypeError:  # an unhashable option: validated (and rejected) below
                key = None
        if hit is not None and hit.quant is cfg:
            return hit
        if causal is True:
            causal = "bottom_right"
        elif causal is False:
            causal = "none"
        elif causal not in CAUSAL_ALIGNS:
            raise ValueError(f"causal must be a bool or one of {CAUSAL_ALIGNS}, got {causal!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        spec = AttnSpec(cfg, causal, mask, None if scale is None else float(scale), layout, bool(return_lse), backend,
                        bwd_lowbit, bwd_recompute)
        if key is not None:
            if len(_BUILT) >= 4096:
                _BUILT.clear()
            _BUILT[key] = spec
        return spec

    # -- derived ------------------------------------------------------------------------------

    @property
    def is_causal(self) -> bool:
        return self.causal != "none"

    @property
    def top_left(self) -> bool:
        return self.causal == "top_left"

    @property
    def quantized(self) -> bool:
        return self.quant.quantizes_qk or self.quant.quantizes_pv

    def replace(self, **changes) -> AttnSpec:
        return dataclasses.replace(self, **changes)

    # -- the op's string form -----------------------------------------------------------------

    def key(self, return_lse: bool | None = None) -> str:
        """Lossless text form for the op (``from_key`` inverts it); ``return_lse`` overrides the
        field. f-strings and attribute reads only: ``torch.compile`` folds it to a constant."""
        lse = self.return_lse if return_lse is None else return_lse
        q = self.quant
        qkey = q.name if PRESETS.get(q.name) is q else config_key(q)
        return (f"{qkey}|{self.causal}|{self.mask}|{self.scale!r}|{self.layout}|"
                f"{int(lse)}|{self.backend}|{self.bwd_lowbit}|{self.bwd_recompute!r}")

    @staticmethod
    def from_key(key: str) -> AttnSpec:
        spec = _SPECS.get(key)
        if spec is None:
            spec = _parse_spec(key)
            if len(_SPECS) >= 1024:
                _SPECS.clear()
            _SPECS[key] = spec
        return spec


_SPECS: dict[str, AttnSpec] = {}
_BUILT: dict[tuple, AttnSpec] = {}
_BOOL_OR_NONE = {"None": None, "True": True, "False": False}


def _parse_spec(key: str) -> AttnSpec:
    if not isinstance(key, str):
        raise TypeError(f"spec key must be a str, got {type(key).__name__}")
    # the quant key may hold '|' only in a custom config's name (last field of "cfg:...")
    parts = key.rsplit("|", 8)
    if len(parts) != 9:
        raise ValueError(f"spec key {key[:120]!r} is not a serialised AttnSpec")
    qkey, causal, mask, scale, layout, lse, backend, lowbit, recompute = parts
    if causal not in CAUSAL_ALIGNS or mask not in MASK_KINDS or lse not in ("0", "1") \
            or recompute not in _BOOL_OR_NONE:
        raise ValueError(f"spec key {key[:120]!r} is not a serialised AttnSpec")
    return AttnSpec.build(config_from_key(qkey), causal=causal, scale=None if scale == "None" else float(scale),
                          layout=layout, return_lse=lse == "1", backend=backend, bwd_lowbit=lowbit,
                          bwd_recompute=_BOOL_OR_NONE[recompute]).replace(mask=mask)


def check_bwd_args(bwd_lowbit, bwd_recompute) -> None:
    """ValueError/TypeError naming the argument unless ``bwd_lowbit`` is one of
    ``BWD_LOWBIT_MODES`` and ``bwd_recompute`` is a bool or None."""
    if not isinstance(bwd_lowbit, str) or bwd_lowbit not in BWD_LOWBIT_MODES:
        raise ValueError(f"bwd_lowbit must be one of {BWD_LOWBIT_MODES}, got {bwd_lowbit!r}")
    if bwd_recompute is not None and not isinstance(bwd_recompute, bool):
        raise TypeError(f"bwd_recompute must be a bool or None, got {type(bwd_recompute).__name__}")


# --------------------------------------------------------------------------------------------
# QuantConfig <-> text (part of the spec key)
# --------------------------------------------------------------------------------------------

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
    """The string that stands for ``quant`` in a spec key.

    A preset name stays itself (``"int8"``). A ``QuantConfig`` becomes a lossless text form, ``"cfg:q=int8/token/0/symmetric;k=...;smooth_k=1;...;name=<name>"``,
    that ``config_from_key`` parses back in this process or another (e.g. a cached compiled graph).
    """
    if isinstance(quant, str):
        resolve_quant(quant)  # a ValueError listing the presets if it is not one
        return quant
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be a preset name (str) or a QuantConfig, got {type(quant).__name__}")
    if not _KNOWN_FIELDS:
        raise NotImplementedError("qflash.spec.config_key does not know QuantConfig's current fields; update it")
    parts = [f"{name}={_encode_operand(getattr(quant, name))}" for name in _OPERANDS]
    parts += [f"{name}={'1' if getattr(quant, name) else '0'}" for name in _FLAGS]
    parts += [f"{name}={int(getattr(quant, name))}" for name in _INTS]
    return _KEY_PREFIX + ";".join(parts) + ";name=" + quant.name  # name last: it may hold any character


def _decode_operand(text: str) -> OperandQuant:
    precision, kind, size, strategy = text.split("/")
    return OperandQuant(precision=precision, granularity=Granularity(kind, int(size)), strategy=strategy)


_PARSED: dict[str, QuantConfig] = {}


def _parse_key(key: str) -> QuantConfig:
    cfg = _PARSED.get(key)
    if cfg is not None:
        return cfg
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
        cfg = QuantConfig(**kw)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"quant key {key[:100]!r} is not a valid serialised QuantConfig: {exc}") from exc
    if len(_PARSED) >= 256:
        _PARSED.clear()
    _PARSED[key] = cfg
    return cfg


def config_from_key(key: str) -> QuantConfig:
    """Inverse of ``config_key``: a preset name or a ``"cfg:..."`` serialisation -> QuantConfig."""
    if not isinstance(key, str):
        raise TypeError(f"quant key must be a str, got {type(key).__name__}")
    if key.startswith(_KEY_PREFIX):
        return _parse_key(key)
    return resolve_quant(key)  # preset name, or a ValueError listing the presets
