"""Bit-exact golden outputs of qflash on the CPU (Triton interpreter and reference path).

    python benchmarks/golden_outputs.py --write tests/data/golden_cpu.json   # record (at a known-good commit)
    python benchmarks/golden_outputs.py --check tests/data/golden_cpu.json   # compare bit for bit

``.json`` files hold one SHA-256 of each tensor's bytes (with dtype and shape; small enough to
commit) and float64 aggregates that decide where the bits differ (``FINGERPRINT_RTOL``: the CPU's
SIMD width changes NumPy's summation order, so some reductions differ in their last bits between
machines); ``.pt`` files hold the tensors themselves (``torch.save``), whose check also reports the
largest difference.

A fixed seed grid of presets x shapes x (causal, bool/float mask, GQA, NHD, lse), forward and
backward, through the public API on the reference path (``qflash.attention`` on CPU) and through
the Triton kernels under ``TRITON_INTERPRET=1`` (the op with the kernel backend forced), plus the
SDPA drop-in with PyTorch's top-left causal at Sq != Sk. Refactors must leave every tensor
bit-identical (``torch.equal`` with NaNs compared as equal). ``tests/test_bitexact_golden.py``
runs the check in the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash  # noqa: E402

# The test suite runs the interpreter with tests/triton_interpreter_shim.py applied (exact fp8/bf16
# conversions, as on the GPU); so does this script, so its numbers do not depend on test order.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
try:
    import triton_interpreter_shim  # noqa: E402

    triton_interpreter_shim.apply()
except ImportError:  # the script copied elsewhere without the tests
    pass

PRESETS = ("none", "int8", "int8-fp8", "int4", "fp8")
# (name, B, Hq, Hkv, Sq, Sk, D)
SHAPES = (
    ("sq", 1, 2, 2, 40, 40, 32),
    ("rect_gqa", 1, 4, 2, 24, 56, 32),
    ("tall", 1, 2, 1, 48, 20, 16),
)


def _kernel_backend_name() -> str:
    """The backend name that forces the Triton kernels (old: "triton"; after issue 12: "portable")."""
    try:
        from qflash.kernels import dispatch  # noqa: F401

        return "portable"
    except ImportError:
        return "triton"


def _kernels(q, k, v, quant, *, causal=False, attn_mask=None, scale=None, return_lse=False, layout="HND"):
    """qflash.attention through the Triton kernels (interpreter on CPU)."""
    if "backend" in inspect.signature(qflash.attention).parameters:
        return qflash.attention(q, k, v, quant=quant, causal=causal, attn_mask=attn_mask, scale=scale,
                                layout=layout, return_lse=return_lse, backend=_kernel_backend_name())
    from qflash.ops import call_attention_fwd

    qq, kk, vv = (t.transpose(1, 2) for t in (q, k, v)) if layout == "NHD" else (q, k, v)
    out, lse = call_attention_fwd(qq, kk, vv, quant, causal=causal, attn_mask=attn_mask, scale=scale,
                                  return_lse=return_lse, out_layout=layout, backend="triton")
    if layout == "NHD":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _sdpa_kernels(q, k, v, *, is_causal, quant):
    """qflash.sdpa through the kernels (the drop-in has no backend argument: patch the device check)."""
    if "backend" in inspect.signature(qflash.sdpa).parameters:
        return qflash.sdpa(q, k, v, is_causal=is_causal, quant=quant, backend=_kernel_backend_name())
    import qflash.dropin as dropin
    from qflash import ops

    real = ops.call_attention_fwd

    def forced(*a, **kw):
        kw["backend"] = "triton"
        return real(*a, **kw)

    dropin.call_attention_fwd = forced
    try:
        return qflash.sdpa(q, k, v, is_causal=is_causal, quant=quant)
    finally:
        dropin.call_attention_fwd = real


def _inputs(seed, B, Hq, Hkv, Sq, Sk, D, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, Sk, D, generator=g) + 0.5).to(dtype)  # K offset: smoothing matters
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return q, k, v


def compute() -> dict[str, torch.Tensor]:
    res: dict[str, torch.Tensor] = {}
    seed = 0
    for sname, B, Hq, Hkv, Sq, Sk, D in SHAPES:
        for preset in PRESETS:
            seed += 1
            q, k, v = _inputs(seed, B, Hq, Hkv, Sq, Sk, D)
            g = torch.Generator().manual_seed(1000 + seed)
            bmask = torch.rand(Sq, Sk, generator=g) > 0.3
            bmask[:, 0] = True
            fmask = torch.randn(1, Hq, Sq, Sk, generator=g).to(torch.bfloat16)
            cases = {
                "plain": dict(),
                "causal_lse": dict(causal=True, return_lse=True),
                "bool": dict(attn_mask=bmask),
                "float_lse": dict(attn_mask=fmask, return_lse=True),
                "causal_bool_scale": dict(causal=True, attn_mask=bmask, scale=0.3),
            }
            for cname, kw in cases.items():
                for path, fn in (("ref", qflash.attention), ("ker", _kernels)):
                    out = fn(q, k, v, quant=preset, **kw)
                    out, lse = out if isinstance(out, tuple) else (out, None)
                    res[f"{sname}/{preset}/{cname}/{path}/out"] = out
                    if lse is not None:
                        res[f"{sname}/{preset}/{cname}/{path}/lse"] = lse
            # NHD layout through the kernels
            qn, kn, vn = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            res[f"{sname}/{preset}/nhd/ker/out"] = _kernels(qn, kn, vn, preset, layout="NHD")
            # the SDPA drop-in: PyTorch's top-left causal (Sq != Sk for two of the shapes)
            if Hq == Hkv:
                res[f"{sname}/{preset}/sdpa_causal/ref/out"] = qflash.sdpa(q, k, v, is_causal=True, quant=preset)
                res[f"{sname}/{preset}/sdpa_causal/ker/out"] = _sdpa_kernels(q, k, v, is_causal=True, quant=preset)
    # backward: straight-through gradients, reference and kernels, causal and float mask
    for preset, bwd_lowbit in (("none", "none"), ("int8", "none"), ("int8-fp8", "int8")):
        for sname, B, Hq, Hkv, Sq, Sk, D in SHAPES[:2]:
            seed += 1
            q, k, v = _inputs(seed, B, Hq, Hkv, Sq, Sk, D)
            g = torch.Generator().manual_seed(2000 + seed)
            fmask = torch.randn(1, 1, Sq, Sk, generator=g)
            go = torch.randn(B, Hq, Sq, D, generator=g).to(torch.bfloat16)
            for path in ("ref", "ker"):
                for cname, kw in (("causal", dict(causal=True)), ("fmask", dict(attn_mask=fmask))):
                    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
                    mask = None
                    if "attn_mask" in kw:
                        mask = kw["attn_mask"].clone().requires_grad_(True)
                        kw = dict(attn_mask=mask)
                    fn = qflash.attention if path == "ref" else _kernels
                    if path == "ref":
                        out = fn(*leaves, quant=preset, bwd_lowbit=bwd_lowbit, **kw)
                    else:
                        out = _kernels_bwd(*leaves, quant=preset, bwd_lowbit=bwd_lowbit, **kw)
                    out.backward(go)
                    key = f"bwd/{sname}/{preset}/{bwd_lowbit}/{cname}/{path}"
                    res[key + "/out"] = out.detach()
                    for n, t in zip("qkv", leaves):
                        res[f"{key}/d{n}"] = t.grad
                    if mask is not None:
                        res[f"{key}/dmask"] = mask.grad
    # the SDPA drop-in's backward with PyTorch's top-left causal at Sq != Sk (a bool mask before
    # issue 12, the kernels' diagonal offset after it)
    seed += 1
    q, k, v = _inputs(seed, 1, 2, 2, 24, 40, 32)
    go = torch.randn(1, 2, 24, 32, generator=torch.Generator().manual_seed(3000)).to(torch.bfloat16)
    for preset in ("none", "int8"):
        for path in ("ref", "ker"):
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            if path == "ref":
                out = qflash.sdpa(*leaves, is_causal=True, quant=preset)
            else:
                out = _sdpa_kernels(*leaves, is_causal=True, quant=preset)
            out.backward(go)
            key = f"bwd/sdpa_causal/{preset}/{path}"
            res[key + "/out"] = out.detach()
            for n, t in zip("qkv", leaves):
                res[f"{key}/d{n}"] = t.grad
    return res


def _kernels_bwd(q, k, v, *, quant, bwd_lowbit, causal=False, attn_mask=None):
    if "backend" in inspect.signature(qflash.attention).parameters:
        return qflash.attention(q, k, v, quant=quant, causal=causal, attn_mask=attn_mask, bwd_lowbit=bwd_lowbit,
                                backend=_kernel_backend_name())
    from qflash.ops import call_attention_fwd

    out, _ = call_attention_fwd(q, k, v, quant, causal=causal, attn_mask=attn_mask, backend="triton",
                                bwd_lowbit=bwd_lowbit)
    return out


def _fingerprint(t: torch.Tensor) -> str:
    """Aggregates of the finite values in float64: sum, a weighted sum (fixed pseudo-random weights
    in [0.5, 1.5), so a permutation shows), sum of |x|, the L2 norm, and the NaN / Inf counts."""
    x = t.detach().double().flatten()
    w = torch.rand(x.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    xf = torch.where(x.isfinite(), x, 0.0)
    nan, inf = int(x.isnan().sum()), int(x.isinf().sum())
    sums = (xf.sum(), (xf * w).sum(), xf.abs().sum(), xf.norm())
    return "fp=" + ",".join(f"{v.item():.12e}" for v in sums) + f",{nan},{inf}"


def digest(t: torch.Tensor) -> str:
    """"dtype shape sha256 fp=..." of a tensor: the SHA-256 of its bytes (bit-exact: -0.0 and 0.0
    differ, as do NaN payloads) and ``_fingerprint``'s aggregates."""
    t = t.detach().contiguous()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return (f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} {hashlib.sha256(raw).hexdigest()} "
            f"{_fingerprint(t)}")


# Bits are the check; where they differ the aggregates decide. The Triton interpreter's float32
# reductions run in NumPy, whose summation order follows the CPU's SIMD width: the recording
# machine and an AVX-512 one differ in the last bits of 11 of the 359 tensors (mask gradients, one
# dq), which moves the aggregates by <= ~1e-5 relative; a 1 % change of any tensor moves them by ~1e-2.
FINGERPRINT_RTOL = 1e-4


def _close_fingerprints(a: str, b: str) -> bool:
    fa, fb = a.split("fp=")[1].split(","), b.split("fp=")[1].split(",")
    if fa[4:] != fb[4:]:  # NaN and Inf counts
        return False
    (s1, w1, a1, n1), (s2, w2, a2, n2) = ([float(v) for v in f[:4]] for f in (fa, fb))
    scale = FINGERPRINT_RTOL * max(a1, a2)  # sums move by at most rtol · sum|x|
    return (abs(s1 - s2) <= scale and abs(w1 - w2) <= 1.5 * scale and abs(a1 - a2) <= scale
            and abs(n1 - n2) <= FINGERPRINT_RTOL * max(n1, n2))


def compare_digests(golden: dict, now: dict) -> list[str]:
    bad = []
    for key in sorted(set(golden) | set(now)):
        if key not in golden or key not in now:
            bad.append(f"{key}: only in {'golden' if key in golden else 'now'}")
            continue
        want, got = golden[key], digest(now[key])
        if want.split(" fp=")[0] == got.split(" fp=")[0]:
            continue  # bit-identical
        same_kind = want.rsplit(" ", 2)[0] == got.rsplit(" ", 2)[0]  # dtype and shape
        if same_kind and "fp=" in want and _close_fingerprints(want, got):
            continue  # last-bit differences of a reduction order (see FINGERPRINT_RTOL)
        bad.append(f"{key}: {want} != {got}")
    return bad


def compare(golden: dict, now: dict) -> list[str]:
    bad = []
    for key in sorted(set(golden) | set(now)):
        if key not in golden or key not in now:
            bad.append(f"{key}: only in {'golden' if key in golden else 'now'}")
            continue
        a, b = golden[key], now[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"{key}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(torch.nan_to_num(a.float(), nan=7.0), torch.nan_to_num(b.float(), nan=7.0)) or \
                not torch.equal(a.float().isnan(), b.float().isnan()):
            diff = (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item()
            bad.append(f"{key}: differs (max abs {diff:.3g})")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="PATH")
    g.add_argument("--check", metavar="PATH")
    args = ap.parse_args(argv)
    now = compute()
    path = args.write or args.check
    as_json = path.endswith(".json")
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if as_json:
            with open(path, "w") as f:
                json.dump({k: digest(v) for k, v in sorted(now.items())}, f, indent=0)
                f.write("\n")
        else:
            torch.save({k: v.detach().clone().contiguous() for k, v in now.items()}, path)
        print(f"wrote {len(now)} tensors to {path}")
        return 0
    if as_json:
        with open(path) as f:
            golden = json.load(f)
        bad = compare_digests(golden, now)
    else:
        golden = torch.load(path)
        bad = compare(golden, now)
    for line in bad:
        print(line)
    print(f"{len(golden)} golden tensors, {len(bad)} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
