"""Tuning data of the Hopper family: tile shapes, pipeline depth and register split per head dim."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import QuantConfig

__all__ = ["HopperTiles", "SMALL_PROBLEM", "tiles_for"]

# Problems the portable family's one-launch mode covers (its FUSED_QUANT limits for sm90: 132
# programs of 64 rows, 512 keys) go there: on an H200 the Hopper path took 0.19-0.35 ms at the
# seed's 64/512-token shapes (three launches, host-bound; run 7), the one-launch mode 0.07 ms
# (run 2). Crossover not measured yet.
SMALL_PROBLEM = {"max_ctas": 66, "max_sk": 512}


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
