"""Attention shapes for the harness and their command-line spelling.

A shape is written ``BxHxSxD`` (batch, heads, sequence length, head dim; queries and keys share
S) with an optional ``c`` suffix for causal: ``1x24x4608x128``, ``1x32x8192x128c``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*(\d+)x(\d+)x(\d+)x(\d+)(c?)\s*$")


@dataclass(frozen=True)
class Shape:
    """One attention problem: q, k, v of shape (batch, heads, seq, head_dim) in HND layout."""

    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool = False
    label: str = ""

    @property
    def spec(self) -> str:
        """The ``BxHxSxD[c]`` spelling."""
        return f"{self.batch}x{self.heads}x{self.seq}x{self.head_dim}" + ("c" if self.causal else "")

    @property
    def name(self) -> str:
        return f"{self.label} ({self.spec})" if self.label else self.spec

    @property
    def ops(self) -> float:
        """Multiply-add work counted as 4·B·H·Sq·Sk·D (two matmuls), halved for causal."""
        n = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        return n / 2 if self.causal else n

    def as_dict(self) -> dict:
        return {"name": self.name, "batch": self.batch, "heads": self.heads, "seq_q": self.seq,
                "seq_k": self.seq, "head_dim": self.head_dim, "causal": self.causal, "ops": self.ops}


def parse_shape(text: str) -> Shape:
    """Parse ``BxHxSxD[c]``; raises ValueError with the expected spelling."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"bad shape {text!r}: expected BxHxSxD with an optional 'c' for causal, e.g. 1x24x4608x128c")
    b, h, s, d = (int(g) for g in m.groups()[:4])
    if min(b, h, s, d) < 1:
        raise ValueError(f"bad shape {text!r}: every dimension must be >= 1")
    if d > 256:
        raise ValueError(f"bad shape {text!r}: head dim must be <= 256")
    return Shape(b, h, s, d, causal=bool(m.group(5)))


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
