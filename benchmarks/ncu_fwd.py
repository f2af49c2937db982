"""One forward launch at a given shape, for Nsight Compute (the kernel name is attn_fwd_kernel).

    ncu --kernel-name attn_fwd_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section InstructionStats python3 benchmarks/ncu_fwd.py int8-fp8
(the first launch compiles and warms up; the profiled one is the second.)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402
from qflash.kernels.portable.launch import attention_fwd  # noqa: E402

preset = sys.argv[1] if len(sys.argv) > 1 else "int8-fp8"
B, H, S, D = (int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1x24x4608x128").split("x"))
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
cfg = qflash.resolve_quant(preset)
for _ in range(2):
    attention_fwd(q, k, v, cfg)
torch.cuda.synchronize()
