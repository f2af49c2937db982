"""Tuning data of the Hopper family: tile shapes, pipeline depth and register split per head dim."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import QuantConfig

__all__ = ["HopperTiles", "SMALL_PROBLEM", "tiles_for"]

# Small problems go to the portable family: at or below ``max_work`` multiply-adds per matmul
# (B·Hq·Sq·Sk·D) the Hopper path's three host-side launches (plain ``kernel[grid]``, TMA
# descriptors) and its one CTA per 128 queries lose to the portable launcher's recorded plans,
# split-key grid and one-launch mode. H200 (call 1, 2026-12-01, CUDA-graph GPU µs, Hopper vs
# portable's closest preset int8): 1x1x1024x128 32.5 vs 30.0, 1x24x256x128 32.3 vs 17.1,
# 8x16x77x64 19.1 vs 14.5; host cost 361/65/226 µs per call. Crossover above 2^31 not measured.
SMALL_PROBLEM = {"max_work": 2**31}


@dataclass(frozen=True)
class HopperTiles:
    """qm: query rows per consumer warpgroup (the CTA owns 2·qm); block_n: keys per tile (the
    K/V scale block); stages: K/V ring depth; registers per thread after ``setmaxnreg``."""

    qm: int = 64
    block_n: int = 128
    stages: int = 3
    consumer_regs: int = 240
    producer_regs: int = 24
    maxnreg: int = 168  # register cap at entry: 12 warps · 32 · 168 ≤ 64K
    v_permuted: bool = True  # Vᵀ keys stored in the P-operand order (fwd_kernel._p_operand)
    int_cvt: int = 2  # INT8 scores to fp32: 0 I2F, 1 magic add (exact), 2 magic folded into the FMA

    def __post_init__(self):
        if 2 * 4 * 32 * self.consumer_regs + 4 * 32 * self.producer_regs > 65536:
            raise ValueError(f"register split {self.consumer_regs}/{self.producer_regs} exceeds 64K per SM")


# head dim -> tiles (8-bit presets); measured on an H200 (docs/perf/NOTES.md, "Hopper family"):
# permuted Vᵀ and the folded INT8 conversion won (int8-fp8 Flux 1024px kernel 0.401 -> 0.373 ms);
# 2/3/4 stages measured within noise at D128
_TILES: dict[int, HopperTiles] = {
    64: HopperTiles(stages=4),
    128: HopperTiles(stages=3),
}


def tiles_for(cfg: QuantConfig, head_dim: int) -> HopperTiles:
    return _TILES[head_dim]
