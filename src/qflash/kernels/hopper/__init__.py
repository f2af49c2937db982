"""The Hopper (sm_90, Gluon) kernel family: FlashAttention-3's schedule for the 8-bit presets.

``fwd_kernel.py`` the Gluon kernel (TMA producer warp, two ping-pong consumer warpgroups, FP8 P·V
from registers), ``launch.py`` descriptors / grid / launch record, ``tuning.py`` tiles per head
dim, ``compile.py`` the sm_90a compile-only check, ``family.py`` what the dispatcher sees
(declared support, the recipe check, ``forward``). K/V are quantised by ``kernels/kv_quant.py``;
Q inside the kernel.
"""

from __future__ import annotations

from .family import SUPPORT, HopperFamily

__all__ = ["FAMILY", "SUPPORT"]

FAMILY = HopperFamily()
