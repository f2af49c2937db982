"""Programmatic dependent launch (PDL, sm_90+): a kernel of a call is scheduled while the one
before it on the stream is still finishing, and waits for it on the GPU instead of in the queue.

A small quantised call is a chain of two or three dependent launches (statistics, quantiser,
attention, merge) of a few µs each; without PDL each boundary costs the GPU the gap between one
grid's end and the next grid's start. With ``launch_pdl=True`` (a Triton compile option: the
launch carries ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``) the next grid may be
launched as the running grid's CTAs exit, and its launch overlaps the running grid's tail.

The contract every kernel with ``USE_PDL`` keeps: ``grid_dependency(USE_PDL)`` is its first
statement, before any load or store of global memory. ``griddepcontrol.wait`` returns once the
previous grid on the stream has completed and its memory is visible, so a kernel reads nothing
(its inputs may come from the kernel before it, ours or the caller's) and writes nothing (a
buffer the kernel before it still reads) early. No kernel here triggers its dependents early
(``griddepcontrol.launch_dependents``): measured on an H200 (session 11, docs/perf/NOTES.md),
an early trigger let the next grid's waiting CTAs take SMs the running grid still needed
(1024²x128 int8 17.6 → 33.6 µs), while waiting only saved 0.1–0.9 µs per call everywhere.
The instruction is a no-op in a launch without the attribute.

``pdl_enabled(device)``: CUDA devices of compute capability 9.0 or newer, not under the
interpreter (it cannot run inline PTX), unless ``QFLASH_PDL=0``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import interpreter_enabled

try:
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_wait = None

__all__ = ["grid_dependency", "pdl_enabled"]

_ENABLED: dict[int, bool] = {}


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use PDL (cached per device)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    on = _ENABLED.get(index)
    if on is None:
        on = _ENABLED[index] = (os.environ.get("QFLASH_PDL", "1") != "0" and gdc_wait is not None
                                and not interpreter_enabled() and torch.cuda.get_device_capability(index) >= (9, 0))
    return on


@triton.jit
def grid_dependency(USE_PDL: tl.constexpr):
    """Wait for the previous grid on the stream (PDL; see the module docstring). Must come before
    the kernel's first global memory access."""
    if USE_PDL:
        gdc_wait()
