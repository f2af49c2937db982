"""Compile the prologue kernels (``qkv_prologue``) for sm_90a on any machine, no GPU needed, and
count what matters before a GPU run: spill instructions, registers, shared memory.

    python -m qflash.fused.compile_check          # run WITHOUT TRITON_INTERPRET; one JSON line per kernel

The launches are recorded from ``rmsnorm_rope_quantize_triton`` / ``quantize_kv_triton`` with CPU
tensors (the kernels are swapped for recorders, nothing runs), then compiled with their real
arguments and constexprs. Needs Triton's bundled ``cuobjdump`` for the SASS counts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import torch

from . import qkv_prologue as P

__all__ = ["record", "compile_sm90", "variants", "main"]


class _Recorder:
    def __init__(self, kern):
        self.kern, self.calls = kern, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
        return run


def record(fn):
    """[(kernel, args, kwargs)] of the launches ``fn()`` makes (nothing is launched)."""
    names = ("prologue_token_stats_kernel", "prologue_reduce_kernel", "prologue_quant_kernel")
    recs = [_Recorder(getattr(P, n)) for n in names]
    for n, r in zip(names, recs):
        setattr(P, n, r)
    try:
        fn()
    finally:
        for n, r in zip(names, recs):
            setattr(P, n, r.kern)
    return [(r.kern, a, k) for r in recs for _, a, k in r.calls]


def compile_sm90(kern, args, kwargs) -> dict:
    """Compile one recorded launch for sm_90a: {"spills", "registers", "shared"}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    sig, consts = {}, {}
    for i, name in enumerate(kern.arg_names):
        if kern.params[i].is_constexpr:
            sig[name] = "constexpr"
            consts[(i,)] = kwargs[name]
        else:
            sig[name] = mangle_type(args[i] if i < len(args) else kwargs[name])
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    ck = triton.compile(ASTSource(kern, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = res = ""
    if os.path.exists(tool):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True).stdout
            res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", res)
    return {"spills": len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)) if sass else None,
            "registers": int(m.group(1)) if m else None, "shared": ck.metadata.shared}


def variants(D: int = 128):
    """(name, fn) of the launches worth compiling: Flux's (norm, RoPE, text prefix) and plain K/V."""
    B, S, H, St = 1, 300, 4, 40

    def x(s):
        return torch.randn(B, s, H * D).to(torch.bfloat16).unflatten(-1, (H, D))

    w, cos = torch.ones(D), torch.ones(S + St, D)
    for preset in ("int8-fp8", "int8"):
        order = "hopper" if preset != "int8" else "keys"
        yield f"flux-{preset}-D{D}", lambda p=preset, o=order: P.rmsnorm_rope_quantize_triton(
            x(S), x(S), x(S), p, norm_q=w, norm_k=w, cos=cos, sin=cos, q_prefix=x(St), k_prefix=x(St),
            v_prefix=x(St), norm_q_prefix=w, norm_k_prefix=w, v_order=o)
        yield f"plain-{preset}-D{D}", lambda p=preset, o=order: P.quantize_kv_triton(
            x(S).transpose(1, 2), x(S).transpose(1, 2), p, o)


def main(names=None) -> int:
    for D in (128, 64):
        for name, fn in variants(D):
            if names and name not in names:
                continue
            for kern, args, kwargs in record(fn):
                print(json.dumps({"variant": name, "kernel": kern.fn.__name__, **compile_sm90(kern, args, kwargs)}),
                      flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:] or None))
