"""Compile a Hopper-family launch for sm_90a without a GPU, and read what the compiler made of it.

Used by the CI compile-only tests (no GPU there: Gluon kernels cannot run in Triton's
interpreter) and by ``benchmarks/hopper_compile_check.py``. The SASS is read with the
``cuobjdump`` that Triton's wheel ships.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

__all__ = ["Sm90Build", "compile_sm90"]


@dataclass
class Sm90Build:
    """What one compiled launch holds: shared memory (bytes), registers per thread at entry,
    counts of the SASS instructions that matter, and the setmaxnreg values."""

    shared: int
    registers: int | None
    spill_ops: int  # LDL/STL in the SASS: local-memory traffic
    gmma: int  # HGMMA + QGMMA + IGMMA
    tma_loads: int  # UTMALDG
    setmaxnreg: list
    sass: str
    ptx: str

    def summary(self) -> str:
        return (f"shared={self.shared} regs={self.registers} gmma={self.gmma} utmaldg={self.tma_loads} "
                f"setmaxnreg={self.setmaxnreg} spills={self.spill_ops}")


def _cuobjdump() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def compile_sm90(launch) -> Sm90Build:
    """Compile ``launch`` (a ``hopper.launch.Launch``) for sm_90a; CPU tensors are fine."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kern = launch.kernel
    sig, constexprs = {}, {}
    for i, name in enumerate(kern.arg_names):
        p = kern.params[i]
        if p.is_constexpr:
            value = launch.kwargs.get(name, launch.options.get(name))
            sig[name] = "constexpr"
            constexprs[(i, )] = value
        else:
            sig[name] = mangle_type(launch.kwargs[name])
    if "num_warps" in kern.arg_names:  # a kernel that names num_warps as a constexpr
        constexprs[(kern.arg_names.index("num_warps"), )] = launch.options["num_warps"]
    src = GluonASTSource(kern, sig, constexprs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(launch.options))
    ptx = ck.asm["ptx"]
    sass, regs = "", None
    tool = _cuobjdump()
    if tool:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(ck.asm["cubin"])
            sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True).stdout
            res = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+)", res)
            regs = int(m.group(1)) if m else None
    return Sm90Build(
        shared=ck.metadata.shared,
        registers=regs,
        spill_ops=len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)),
        gmma=len(re.findall(r"\b[HQI]GMMA\b", sass)),
        tma_loads=len(re.findall(r"\bUTMALDG\b", sass)),
        setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+\d+", ptx))),
        sass=sass,
        ptx=ptx,
    )
