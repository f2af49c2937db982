"""Quantisation configuration: what each attention operand is stored as, and how.

Everything here is a frozen dataclass or an Enum, so a config can be hashed, compared and used
as a cache key, and nothing about it can change after it is built. A config describes *numbers*,
not kernels: the Triton kernels and the fake-quant reference both read the same config and must
agree on it.

Operands: ``q`` and ``k`` feed the score product Q·Kᵀ, ``p`` (the softmax probabilities) and
``v`` feed P·V. Score operands share one precision class (both integer, or both FP8, or both
float); P and V likewise.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

__all__ = [
    "Precision",
    "GranularityKind",
    "Granularity",
    "Strategy",
    "OperandQuant",
    "QuantConfig",
    "PRESETS",
    "resolve_quant",
]


class Precision(str, enum.Enum):
    """Storage precision of one operand."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"
    INT8 = "int8"
    INT4 = "int4"
    FP8_E4M3 = "fp8_e4m3"

    @property
    def is_float(self) -> bool:
        """True for the unquantised floating-point precisions (fp16, bf16, fp32)."""
        return self in (Precision.FP16, Precision.BF16, Precision.FP32)

    @property
    def is_integer(self) -> bool:
        return self in (Precision.INT8, Precision.INT4)

    @property
    def qmax(self) -> float:
        """Largest magnitude of the symmetric code range (127 for INT8, 7 for INT4, 448 for FP8)."""
        return {Precision.INT8: 127.0, Precision.INT4: 7.0, Precision.FP8_E4M3: 448.0}[self]

    @property
    def code_range(self) -> tuple[int, int]:
        """(lowest, highest) integer code of the asymmetric strategy."""
        return {Precision.INT8: (-128, 127), Precision.INT4: (-8, 7)}[self]


class Strategy(str, enum.Enum):
    """Symmetric: ``x ≈ code * scale``. Asymmetric: ``x ≈ (code - zero_point) * scale``."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


class GranularityKind(str, enum.Enum):
    TENSOR = "tensor"  # one scale for the whole tensor
    TOKEN = "token"  # one scale per token (row)
    BLOCK = "block"  # one scale per block of `size` consecutive tokens
    GROUP = "group"  # one scale per token and group of `size` consecutive channels
    CHANNEL = "channel"  # one scale per channel, within blocks of `size` tokens (0: all tokens)


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale.

    Scale tensor shapes for an input of shape ``(*lead, S, D)`` (``lead`` is usually (B, H)):

    ========  ==========================  ==========================================
    kind      scale shape                 elements sharing a scale
    ========  ==========================  ==========================================
    tensor    ``(*ones, 1)``              all of them
    token     ``(*lead, S)``              one row
    block N   ``(*lead, ceil(S/N))``      N consecutive rows (the last block may be short)
    group G   ``(*lead, S, D/G)``         G consecutive channels of one row
    channel N ``(*lead, ceil(S/N), D)``   one channel of N consecutive rows (N=0: all rows)
    ========  ==========================  ==========================================
    """

    kind: GranularityKind
    size: int = 0

    def __post_init__(self) -> None:
        kind = GranularityKind(self.kind)
        object.__setattr__(self, "kind", kind)
        if kind in (GranularityKind.BLOCK, GranularityKind.GROUP) and self.size < 1:
            raise ValueError(f"Granularity.{kind.value} needs size >= 1, got size={self.size}")
        if kind in (GranularityKind.TENSOR, GranularityKind.TOKEN) and self.size != 0:
            raise ValueError(f"Granularity.{kind.value} takes no size, got size={self.size}")
        if kind is GranularityKind.CHANNEL and self.size < 0:
            raise ValueError(f"Granularity.channel needs size >= 0 (0 = all tokens), got {self.size}")

    @classmethod
    def tensor(cls) -> Granularity:
        return cls(GranularityKind.TENSOR)

    @classmethod
    def token(cls) -> Granularity:
        return cls(GranularityKind.TOKEN)

    @classmethod
    def block(cls, tokens: int) -> Granularity:
        return cls(GranularityKind.BLOCK, tokens)

    @classmethod
    def group(cls, channels: int) -> Granularity:
        return cls(GranularityKind.GROUP, channels)

    @classmethod
    def channel(cls, tokens: int = 0) -> Granularity:
        return cls(GranularityKind.CHANNEL, tokens)

    @property
    def token_block(self) -> int | None:
        """Rows sharing a scale for the row-wise kinds (token=1, block=N); None otherwise."""
        if self.kind is GranularityKind.TOKEN:
            return 1
        if self.kind is GranularityKind.BLOCK:
            return self.size
        return None

    def __str__(self) -> str:
        return self.kind.value + (f"({self.size})" if self.size else "")


@dataclass(frozen=True)
class OperandQuant:
    """How one operand is stored: precision, scale granularity and strategy.

    A float precision means "not quantised": granularity and strategy are ignored.
    """

    precision: Precision
    granularity: Granularity = field(default_factory=Granularity.token)
    strategy: Strategy = Strategy.SYMMETRIC

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision(self.precision))
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        if self.strategy is Strategy.ASYMMETRIC and not self.precision.is_integer:
            raise ValueError(
                f"strategy=asymmetric needs an integer precision (int8, int4), got {self.precision.value}"
            )
        if self.precision is Precision.INT4 and self.granularity.kind is GranularityKind.CHANNEL:
            raise ValueError("int4 packs pairs of channels; use tensor, token, block or group granularity")

    @property
    def quantized(self) -> bool:
        return not self.precision.is_float


_FLOAT = OperandQuant(Precision.FP32)  # placeholder meaning "the input dtype, unquantised"


def _is_row_wise(g: Granularity) -> bool:
    return g.kind in (GranularityKind.TENSOR, GranularityKind.TOKEN, GranularityKind.BLOCK, GranularityKind.GROUP)


@dataclass(frozen=True)
class QuantConfig:
    """Quantisation of the four attention operands, plus smoothing.

    - ``smooth_k``: subtract K's mean over tokens (per batch, head, channel) before quantising.
      Softmax is invariant to it; the log-sum-exp is corrected by ``scale * q·mean(k)``.
    - ``smooth_q``: subtract Q's mean over blocks of ``q_mean_block`` tokens and restore it as a
      score bias ``scale * mean_q(block) · (k - mean(k))ᵀ`` computed in fp32 from unquantised K
      ("block bias restoration").
    - ``smooth_v``: subtract V's mean over tokens and add it back to each output row.

    Allowed combinations (checked in ``__post_init__``):
    Q and K share a precision class: both float, both integer (int8/int4, same one), or both fp8.
    P and V: both float (P is cast to the input dtype), or both fp8 (P is scaled by 448).
    Q and K use row-wise granularities (tensor, token, block, group); V uses tensor or channel;
    P uses tensor (its scale is fixed).
    """

    q: OperandQuant = _FLOAT
    k: OperandQuant = _FLOAT
    v: OperandQuant = _FLOAT
    p: OperandQuant = _FLOAT
    smooth_k: bool = False
    smooth_q: bool = False
    smooth_v: bool = False
    q_mean_block: int = 128
    name: str = "custom"

    def __post_init__(self) -> None:
        q, k, v, p = self.q.precision, self.k.precision, self.v.precision, self.p.precision
        if q.is_float != k.is_float or (not q.is_float and q is not k):
            raise ValueError(
                f"q and k must share a precision (both float, both int8, both int4 or both fp8_e4m3); "
                f"got q={q.value}, k={k.value}"
            )
        if v.is_float != p.is_float:
            raise ValueError(
                f"p and v must both be float or both fp8_e4m3; got p={p.value}, v={v.value}"
            )
        if not v.is_float and (v is not Precision.FP8_E4M3 or p is not Precision.FP8_E4M3):
            raise ValueError(f"quantised P·V supports fp8_e4m3 only; got p={p.value}, v={v.value}")
        for name, op in (("q", self.q), ("k", self.k)):
            if op.quantized and not _is_row_wise(op.granularity):
                raise ValueError(
                    f"{name} granularity must be tensor, token, block or group, got {op.granularity}"
                )
        if self.v.quantized and self.v.granularity.kind not in (GranularityKind.TENSOR, GranularityKind.CHANNEL):
            raise ValueError(f"v granularity must be tensor or channel, got {self.v.granularity}")
        if self.p.quantized and self.p.granularity.kind is not GranularityKind.TENSOR:
            raise ValueError(f"p granularity must be tensor (its scale is fixed), got {self.p.granularity}")
        if self.q_mean_block < 1:
            raise ValueError(f"q_mean_block must be >= 1, got {self.q_mean_block}")
        if (self.smooth_q or self.smooth_k) and not self.q.quantized:
            raise ValueError("smooth_q / smooth_k only make sense when q and k are quantised")
        if self.smooth_v and not self.v.quantized:
            raise ValueError("smooth_v only makes sense when v is quantised")

    @property
    def quantizes_qk(self) -> bool:
        return self.q.quantized

    @property
    def quantizes_pv(self) -> bool:
        return self.v.quantized

    def with_(self, **changes) -> QuantConfig:
        """A copy with some fields changed (``name`` becomes "custom" unless given)."""
        changes.setdefault("name", "custom")
        return replace(self, **changes)


def _preset(name: str, **kw) -> QuantConfig:
    return QuantConfig(name=name, **kw)


_I8 = OperandQuant(Precision.INT8, Granularity.token())
_I4 = OperandQuant(Precision.INT4, Granularity.token())
_I8_KBLOCK = OperandQuant(Precision.INT8, Granularity.block(128))
_F8_Q = OperandQuant(Precision.FP8_E4M3, Granularity.token())
_F8_KBLOCK = OperandQuant(Precision.FP8_E4M3, Granularity.block(128))
_F8_V = OperandQuant(Precision.FP8_E4M3, Granularity.channel(0))  # one scale per channel, all keys
_F8_P = OperandQuant(Precision.FP8_E4M3, Granularity.tensor())

#: Named presets. Every ``quant=`` argument takes one of these names or a ``QuantConfig``.
PRESETS: dict[str, QuantConfig] = {
    # full-precision flash attention (inputs' dtype, fp32 softmax)
    "none": _preset("none"),
    # INT8 Q/K per token, K smoothed; P·V in the input dtype. The accurate one.
    "int8": _preset("int8", q=_I8, k=_I8, smooth_k=True),
    # (Small calls in the portable one-launch mode scale K per token instead, for every preset:
    # ``kernels.portable.launch.one_launch_quant``; on sm_90 small calls of the FP8 P·V presets
    # keep P·V in the input dtype: ``launch.call_quant``.)
    # INT8 Q per token, K per 128-key block (one scale per kernel tile: a scalar in the softmax
    # FMA), K smoothed; P and V in FP8 e4m3, V scaled per channel over all keys (P·V accumulates in
    # place; per-block V scales measured +0.02 pp more accurate, 22 % slower on Hopper). The fast one.
    "int8-fp8": _preset("int8-fp8", q=_I8, k=_I8_KBLOCK, v=_F8_V, p=_F8_P, smooth_k=True),
    # packed INT4 Q/K per token, K smoothed, Q smoothed per 128-token block with bias restoration.
    "int4": _preset("int4", q=_I4, k=_I4, smooth_k=True, smooth_q=True),
    # FP8 e4m3 Q per token, K per 128-key block, K smoothed; FP8 P and V.
    "fp8": _preset("fp8", q=_F8_Q, k=_F8_KBLOCK, v=_F8_V, p=_F8_P, smooth_k=True),
}


def resolve_quant(quant: str | QuantConfig) -> QuantConfig:
    """Turn a preset name or a config into a config; raises ValueError/TypeError otherwise."""
    if isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, str):
        try:
            return PRESETS[quant]
        except KeyError:
            raise ValueError(f"quant={quant!r} is not a preset; expected one of {sorted(PRESETS)} "
                             "or a qflash.QuantConfig") from None
    raise TypeError(f"quant must be a preset name (str) or a QuantConfig, got {type(quant).__name__}")
