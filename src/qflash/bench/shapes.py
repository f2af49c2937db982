"""Attention shapes for the harness and their command-line spelling.

A shape is written ``BxHxSxD`` (batch, heads, sequence length, head dim; queries and keys share
S) with an optional ``c`` suffix for causal: ``1x24x4608x128``, ``1x32x8192x128c``. Queries and
keys of different lengths are written ``BxHxSq:SkxD``: ``1x8x1:4096x128`` is one query over 4096
keys (causal rows then align bottom-right, as ``qflash.attention`` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*(\d+)x(\d+)x(\d+)(?::(\d+))?x(\d+)(c?)\s*$")


@dataclass(frozen=True)
class Shape:
    """One attention problem: q (batch, heads, seq, head_dim) and k, v (batch, heads, seq_k,
    head_dim) in HND layout; ``seq_k`` None means ``seq``."""

    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool = False
    label: str = ""
    seq_k: int | None = None

    @property
    def keys(self) -> int:
        """Number of keys (``seq_k``, or ``seq`` when queries and keys share the length)."""
        return self.seq if self.seq_k is None else self.seq_k

    @property
    def spec(self) -> str:
        """The ``BxHxS[:Sk]xD[c]`` spelling."""
        sk = "" if self.seq_k is None else f":{self.seq_k}"
        return f"{self.batch}x{self.heads}x{self.seq}{sk}x{self.head_dim}" + ("c" if self.causal else "")

    @property
    def name(self) -> str:
        return f"{self.label} ({self.spec})" if self.label else self.spec

    @property
    def ops(self) -> float:
        """Multiply-add work counted as 4·B·H·Sq·Sk·D (two matmuls); causal counts the pairs a
        bottom-right-aligned mask keeps (half of them when Sq == Sk)."""
        sq, sk = self.seq, self.keys
        if not self.causal:
            pairs = sq * sk
        elif sk >= sq:  # the first sk - sq keys are seen by every query, the last sq by a triangle
            pairs = sq * (sk - sq) + sq * sq / 2
        else:  # only the last sk queries see any key
            pairs = sk * sk / 2
        return 4.0 * self.batch * self.heads * pairs * self.head_dim

    def as_dict(self) -> dict:
        return {"name": self.name, "batch": self.batch, "heads": self.heads, "seq_q": self.seq,
                "seq_k": self.keys, "head_dim": self.head_dim, "causal": self.causal, "ops": self.ops}


def parse_shape(text: str) -> Shape:
    """Parse ``BxHxS[:Sk]xD[c]``; raises ValueError with the expected spelling."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"bad shape {text!r}: expected BxHxSxD (or BxHxSq:SkxD) with an optional 'c' for "
                         "causal, e.g. 1x24x4608x128c or 1x8x1:4096x128")
    b, h, s, sk, d = (None if g is None else int(g) for g in m.groups()[:5])
    if min(b, h, s, d, s if sk is None else sk) < 1:
        raise ValueError(f"bad shape {text!r}: every dimension must be >= 1")
    if d > 256:
        raise ValueError(f"bad shape {text!r}: head dim must be <= 256")
    return Shape(b, h, s, d, causal=bool(m.group(6)), seq_k=sk)


def parse_shapes(text: str) -> list[Shape]:
    """Parse a comma-separated list of shapes (at least one)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--shapes needs at least one shape, e.g. 1x24x4608x128,1x32x8192x128c")
    return [parse_shape(p) for p in parts]


#: The seed's micro-benchmark (batch 1, one head), Flux 1024px / 2048px, and a long causal case.
GPU_DEFAULT = [
    Shape(1, 1, 64, 64, label="seed 64x64 h64"),
    Shape(1, 1, 512, 64, label="seed 512x512 h64"),
    Shape(1, 1, 1024, 128, label="seed 1024x1024 h128"),
    Shape(1, 24, 4608, 128, label="Flux 1024px"),
    Shape(1, 24, 16896, 128, label="Flux 2048px"),
    Shape(1, 32, 8192, 128, causal=True, label="long causal"),
    Shape(4, 32, 4096, 64, label="batch 4 h64"),
    Shape(1, 24, 256, 128, label="short multi-head"),
    Shape(8, 16, 77, 64, label="text encoder"),
    Shape(1, 8, 1, 128, seq_k=4096, label="one query, 4096 keys"),
]
#: ``--quick`` on a GPU: one small seed shape, Flux 1024px and the causal case.
GPU_QUICK = [GPU_DEFAULT[0], GPU_DEFAULT[3], GPU_DEFAULT[5]]
#: Without a GPU: the seed's micro-benchmark plus small multi-head and causal cases.
CPU_DEFAULT = GPU_DEFAULT[:3] + [
    Shape(1, 4, 512, 64, label="small multi-head"),
    Shape(1, 4, 512, 64, causal=True, label="small causal"),
]
#: ``--quick`` without a GPU: tiny shapes, seconds in all.
CPU_QUICK = [GPU_DEFAULT[0], Shape(1, 2, 256, 64, label="small multi-head"),
             Shape(1, 2, 256, 64, causal=True, label="small causal")]


def default_shapes(device_type: str, quick: bool) -> list[Shape]:
    if device_type == "cuda":
        return list(GPU_QUICK if quick else GPU_DEFAULT)
    return list(CPU_QUICK if quick else CPU_DEFAULT)
