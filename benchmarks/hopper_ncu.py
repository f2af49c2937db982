"""One Hopper-family forward at a benchmark shape, for Nsight Compute.

    ncu --clock-control none -k regex:attn_fwd_fa3 -c 1 --section SpeedOfLight \\
        --section WarpStateStats --section InstructionStats python benchmarks/hopper_ncu.py [--shape flux-1024]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from qflash.config import resolve_quant  # noqa: E402
from qflash.kernels.hopper.launch import attention_fwd_hopper  # noqa: E402
from qflash.kernels.hopper.tuning import HopperTiles  # noqa: E402

SHAPES = {"flux-1024": (1, 24, 4608, 128), "flux-2048": (1, 24, 16896, 128), "b4-4k-d64": (4, 32, 4096, 64)}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="flux-1024", choices=sorted(SHAPES))
    ap.add_argument("--preset", default="int8-fp8")
    a = ap.parse_args()
    B, H, S, D = SHAPES[a.shape]
    cfg = resolve_quant(a.preset)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tiles = HopperTiles(v_permuted=True, int_cvt=2)
    for _ in range(3):
        attention_fwd_hopper(q, k, v, cfg, tiles=tiles)
    torch.cuda.synchronize()
