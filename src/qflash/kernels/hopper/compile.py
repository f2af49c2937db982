"""Compile a Hopper-family launch for sm_90a without a GPU, and read what the compiler made of it.

Used by the CI compile-only tests (no GPU there: Gluon kernels cannot run in Triton's
interpreter). The SASS is read with the ``cuobjdump`` that Triton's wheel ships, and its
``ptxas`` is rerun on the PTX to catch C7512 (wgmma serialised: every MMA waited for, no overlap).

``python -m qflash.kernels.hopper.compile`` compiles every variant the family launches
(``variants()``) and prints one JSON line per variant. It must run without
``TRITON_INTERPRET=1``: under the interpreter ``gluon.jit`` functions are not compilable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

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
    serialized: bool  # ptxas C7512: wgmma serialised
    sass: str
    ptx: str

    def summary(self) -> str:
        return (f"shared={self.shared} regs={self.registers} gmma={self.gmma} utmaldg={self.tma_loads} "
                f"setmaxnreg={len(self.setmaxnreg)} spills={self.spill_ops} serialized={self.serialized}")


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
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
    sass, regs, serialized = "", None, False
    cuobjdump, ptxas = _tool("cuobjdump"), _tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        if cuobjdump:
            sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout
            res = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+)", res)
            regs = int(m.group(1)) if m else None
        if ptxas:
            ptx_path = os.path.join(tmp, "k.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", os.path.join(tmp, "re.cubin")],
                               capture_output=True, text=True)
            serialized = "C7512" in r.stderr
    return Sm90Build(
        shared=ck.metadata.shared,
        registers=regs,
        spill_ops=len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)),
        gmma=len(re.findall(r"\b[HQI]GMMA\b", sass)),
        tma_loads=len(re.findall(r"\bUTMALDG\b", sass)),
        setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+\d+", ptx))),
        serialized=serialized,
        sass=sass,
        ptx=ptx,
    )


def variants():
    """Every variant the family launches: {name: keyword arguments of ``example_launch``}."""
    from .tuning import _TILES

    out = {}
    for d in sorted(_TILES):
        for qk in ("int8", "fp8"):
            out[f"{qk}-d{d}"] = dict(head_dim=d, qk=qk)
            out[f"{qk}-d{d}-causal-lse-tail"] = dict(head_dim=d, qk=qk, causal=True, lse=True, sk=500)
    out["int8-d128-tail-gqa"] = dict(head_dim=128, qk="int8", sk=777, hkv=1)
    return out


def example_launch(head_dim: int, qk: str, causal: bool = False, lse: bool = False, sk: int = 512, hkv: int = 2):
    """A ``Launch`` on CPU tensors (never dereferenced: compiled, not run) for one variant."""
    import torch

    from .launch import build_launch
    from .tuning import _TILES

    tiles = _TILES[head_dim]
    B, Hq, Sq, D = 1, 2, 512, head_dim
    nb = -(-sk // tiles.block_n)
    code = torch.int8 if qk == "int8" else torch.float8_e4m3fn
    q = torch.empty(B, Hq, Sq, D, dtype=torch.bfloat16)
    kc = torch.empty(B, hkv, sk, D, dtype=code)
    ks = torch.empty(B, hkv, nb)
    vt = torch.empty(B, hkv, D, nb * tiles.block_n, dtype=torch.float8_e4m3fn)
    vs = torch.empty(B, hkv, D)
    out = torch.empty(B, Hq, Sq, D, dtype=torch.bfloat16)
    lse_t = torch.empty(B, Hq, Sq) if lse else None
    return build_launch(q, kc, ks, vt, vs, out, lse_t, D ** -0.5, tiles, 0 if causal else None)


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(variants())
    table = variants()
    for name in names:
        try:
            b = compile_sm90(example_launch(**table[name]))
            rec = {k: v for k, v in asdict(b).items() if k not in ("sass", "ptx")}
            rec["setmaxnreg"] = len(b.setmaxnreg)
        except Exception as exc:  # report per variant; the tests fail on it
            rec = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        print(json.dumps({"variant": name, **rec}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
