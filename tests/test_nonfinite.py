"""Non-finite inputs, Hugging Face finfo.min masks and huge logits, on every path (issue 14 items 1-4).

The rule is PyTorch SDPA's (math backend, fp32): a NaN or +Inf score makes its row NaN, a NaN/Inf
in v the output columns it feeds; the quantisers never turn a NaN into finite codes (a NaN group
gets a NaN scale). Fully masked rows (bool / -inf) stay zeros with lse -inf. Documented
deviations, asserted here so that they stay what the README says:

- ``int4`` smooths Q per 128-token block: a NaN/Inf in one q row reaches every row of its block;
- ``int8-fp8`` / ``fp8`` quantise v per channel: an Inf in v gives NaN (not Inf) in its column.

The kernels run through Triton's CPU interpreter without a GPU (``backend="portable"``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import PRESET_NAMES, reference_args_of_call, rel_l2
from torch.nn.attention import SDPBackend, sdpa_kernel

import qflash
from qflash.reference import fake_quant_attention

BACKENDS = ["reference", pytest.param("portable", marks=pytest.mark.interpreter)]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _quiet():
    # NaN/Inf arithmetic in the interpreter (numpy) and in torch warns; the values are the point here
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _reference_args(q, k, quant, backend) -> dict:
    """``fake_quant_attention`` keywords that model ``_attn(q, k, ..., backend=backend)``."""
    if backend != "portable":  # the reference path on the inputs' device: the preset as it is
        return {"quant": quant}
    return reference_args_of_call(q.to(DEV), k.to(DEV), quant, kernel=True)


def _attn(q, k, v, *, backend, attn_mask=None, **kw):
    """qflash.attention; ``backend="portable"`` runs on the kernels' device (the GPU when there is
    one: inputs are made on the CPU), results and gradients come back to the inputs' device."""
    if backend == "portable" and DEV != q.device.type:
        res = qflash.attention(q.to(DEV), k.to(DEV), v.to(DEV), backend=backend,
                               attn_mask=None if attn_mask is None else attn_mask.to(DEV), **kw)
        return tuple(r.to(q.device) for r in res) if isinstance(res, tuple) else res.to(q.device)
    return qflash.attention(q, k, v, backend=backend, attn_mask=attn_mask, **kw)


def _sdpa_math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _inject(gen, case, B=1, H=2, S=40, D=32):
    """(q, k, v) fp32 with one non-finite element placed as ``case`` says."""
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    t, val = {"nan_k": (k, math.nan), "nan_q": (q, math.nan), "inf_q": (q, math.inf),
              "inf_v": (v, math.inf), "nan_v": (v, math.nan)}[case]
    t[0, 0, 2, 3] = val
    return q, k, v


CASES = ["nan_k", "nan_q", "inf_q", "inf_v", "nan_v"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", PRESET_NAMES)
@pytest.mark.parametrize("case", CASES)
def test_nonfinite_inputs_propagate_like_sdpa(gen, case, quant, backend):
    q, k, v = _inject(gen, case)
    ref = _sdpa_math(q, k, v)
    out = _attn(q, k, v, quant=quant, backend=backend)
    bad, ref_bad = ~out.isfinite(), ~ref.isfinite()
    assert ref_bad.any()
    if quant == "int4" and case in ("nan_q", "inf_q"):
        # Q's block mean (smooth_q, 128-token blocks) spreads the row's NaN over its block: head 0
        assert bad[0, 0].all() and not bad[0, 1].any()
        return
    assert torch.equal(bad, ref_bad), f"non-finite at {bad.nonzero().tolist()[:5]}, SDPA at {ref_bad.nonzero().tolist()[:5]}"
    if quant in ("int8-fp8", "fp8") and case == "inf_v":
        # v's channel scale is Inf: 0·Inf codes give NaN (documented) on the CPU paths; the GPU's
        # fp32 arithmetic may keep SDPA's +Inf there (H200: SDPA's values exactly)
        got, want = out[ref_bad], ref[ref_bad]
        assert (got.isnan() | ((got == want) & (DEV == "cuda" and backend == "portable"))).all()
    else:
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isposinf(), ref.isposinf())
    # the finite part is still attention (none: the exact values)
    if quant == "none":
        assert rel_l2(out[~ref_bad], ref[~ref_bad]) < 1e-5  # measured 3e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("case", CASES)
def test_nonfinite_gradients_like_sdpa(gen, case, quant, backend):
    q, k, v = _inject(gen, case)
    do = torch.randn(q.shape, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(_sdpa_math(*leaves), leaves, do)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(_attn(*leaves, quant=quant, backend=backend), leaves, do)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.equal(g.isnan(), r.isnan()), name
        assert torch.equal(g.isinf(), r.isinf()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_stay_zero_next_to_nan(gen, backend):
    """A bool-masked row is zeros with lse -inf, even with a NaN in another row's query."""
    q, k, v = _inject(gen, "nan_q")
    keep = torch.ones(40, 40, dtype=torch.bool)
    keep[7] = False
    out, lse = _attn(q, k, v, quant="none", attn_mask=keep, return_lse=True, backend=backend)
    assert (out[:, :, 7] == 0).all() and (lse[:, :, 7] == -math.inf).all()
    assert out[0, 0, 2].isnan().all() and lse[0, 0, 2].isnan()
    assert out[:, 1].isfinite().all()


# ---- quantisers: a NaN never becomes finite codes ---------------------------------------------


def test_reference_quantiser_keeps_nan_and_inf():
    from qflash.quant import quantize

    x = torch.randn(2, 6, 8)
    x[0, 1, 2] = math.nan
    x[1, 4, 0] = math.inf
    for prec in ("int8", "int4", "fp8_e4m3"):
        s = quantize(x, prec).scale  # per token: (2, 6)
        assert s[0, 1].isnan() and s[1, 4].isposinf(), prec
        assert s[0, [0, 2, 3, 4, 5]].isfinite().all() and s[1, [0, 1, 2, 3, 5]].isfinite().all(), prec


@pytest.mark.interpreter
def test_kernel_quantisers_keep_nan():
    from qflash.config import PRESETS
    from qflash.kernels.kv_quant import quantize_kv
    from qflash.kernels.portable.launch import quantize_qkv

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=g).to(DEV) for _ in range(3))
    q[0, 1, 5, 3] = math.nan
    v[0, 0, 9, 7] = math.nan
    codes = quantize_qkv(q, k, v, PRESETS["int8"])
    assert codes.q_scale[0, 1, 5].isnan() and codes.q_scale.isnan().sum() == 1
    k[0, 1, 30, 0] = math.nan  # K smoothing: the mean's channel 0 is NaN, so every key of head 1 is
    codes = quantize_qkv(q, k, v, PRESETS["int8"])
    assert codes.k_scale[0, 1].isnan().all() and codes.k_scale[0, 0].isfinite().all()
    _, _, vt, vs, _ = quantize_kv(k, v, PRESETS["int8-fp8"], 64)
    assert vs[0, 0, 7].isnan() and vs.isnan().sum() == 1  # one scale per channel over all keys
    kc, ks, _, _, _ = quantize_kv(k, v, PRESETS["int8-fp8"], 64)
    assert ks[0, 1].isnan().all() and ks[0, 0].isfinite().all()


# ---- item 2: Hugging Face's finfo(dtype).min masks ----------------------------------------------

def _hf_mask(B, Sq, Sk, dtype):
    """Additive mask in ``dtype``: row 3 fully masked, row 5 half, the last 6 keys padding."""
    lo = torch.finfo(dtype).min
    m = torch.zeros(B, 1, Sq, Sk, dtype=dtype)
    m[..., 3, :] = lo
    m[..., 5, Sk // 2:] = lo
    m[..., Sk - 6:] = lo
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_finfo_min_masks_match_sdpa(gen, dtype, causal, backend):
    """Forward and backward as SDPA computes them in fp32 (row 3: the mean of v, uniform gradients)."""
    B, H, Sq, Sk, D = 1, 2, 20, 37, 32
    q, k, v = (torch.randn(B, H, s, D, generator=gen).to(dtype) for s in (Sq, Sk, Sk))
    do = torch.randn(B, H, Sq, D, generator=gen).to(dtype)
    mask = _hf_mask(B, Sq, Sk, dtype)
    ref_mask = mask.float()
    if causal:  # qflash.attention's causal is bottom-right
        vis = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + Sk - Sq
        ref_mask = ref_mask.masked_fill(~vis, -math.inf)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref = _sdpa_math(*leaves, attn_mask=ref_mask)
    ref_grads = torch.autograd.grad(ref, leaves, do.float())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _attn(*leaves, quant="none", attn_mask=mask, causal=causal, return_lse=True,
                                backend=backend)
    grads = torch.autograd.grad(out, leaves, do)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2  # measured fp32 3e-7, fp16 1.1e-3, bf16 8e-3
    assert out.isfinite().all() and rel_l2(out, ref) < tol
    assert rel_l2(out[:, :, 3], ref[:, :, 3]) < tol
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.isfinite().all() and rel_l2(g, r) < tol, name
    if dtype != torch.float16:  # the fully masked row's lse is finfo.min + log(n): -FLT_MAX in fp32
        assert (lse[:, :, 3] < -1e38).all() and lse[:, :, 3].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", ["int8", "int8-fp8"])
def test_finfo_min_masks_quantised(gen, quant, backend):
    """Quantised presets under an HF mask: finite, the fully masked row is the mean of v."""
    B, H, S, D = 1, 2, 40, 32
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    mask = _hf_mask(B, S, S, torch.float32)
    out = _attn(q, k, v, quant=quant, attn_mask=mask, backend=backend)
    fq = fake_quant_attention(q, k, v, attn_mask=mask, **_reference_args(q, k, quant, backend))
    assert out.isfinite().all()
    assert rel_l2(out[:, :, 3], v.mean(dim=2)) < 0.035  # fp8 V codes: measured int8 3e-8, int8-fp8 2.1e-2
    assert rel_l2(out, fq) < 0.02  # kernel vs fake-quant: measured int8 4e-7, int8-fp8 4e-3


# ---- items 3 and 4: huge logits ----------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("logit", [1e6, 1e7, 1e9])
@pytest.mark.parametrize("quant", ["int8-fp8", "fp8"])
def test_fp8_pv_keeps_its_scale_at_huge_logits(gen, quant, logit):
    """P lands in [0, 448] however large the row max: the kernel stays on its fake-quant reference
    (before: 0.4 % at 1e5, 1.2 % at 1e6, 12.5 % at 1e7, from ``m - log2(448)`` rounding)."""
    a = math.sqrt(logit)  # scores ~ a² (scale 1/sqrt(D))
    q, k, v = (torch.randn(1, 1, 80, 64, generator=gen) for _ in range(3))
    q, k = q * a, k * a
    out = _attn(q, k, v, quant=quant, backend="portable")
    ref = fake_quant_attention(q, k, v, **_reference_args(q, k, quant, "portable"))
    assert out.isfinite().all() and rel_l2(out, ref) < 2e-6  # measured <= 4.9e-8


def _fp16_large(gen, D, mag=1e4):
    shape = (1, 4, 512, D) if DEV == "cuda" else (1, 2, 40, D)  # the interpreter: small
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    return (q * mag).half(), (k * mag).half(), v.half()


@pytest.mark.interpreter
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("quant", PRESET_NAMES)
def test_fp16_huge_inputs_stay_finite(gen, quant, D):
    """fp16 |q|, |k| ~ 1e4 (logits ~1e8): finite as SDPA's fp16 output is, and on the fake-quant.

    On the GPU the exp2 argument ``fma(x, c, -m)`` of the row's max was ``+ulp(m)/2`` (up to 2^16):
    P overflowed fp16 (Inf, then NaN). The kernel now subtracts that residual (the interpreter's fma
    is the GPU's single rounding: ``qflash.kernels.portable.interpreter``)."""
    q, k, v = _fp16_large(gen, D)
    out = _attn(q, k, v, quant=quant, backend="portable")
    assert out.isfinite().all()
    ref = fake_quant_attention(q, k, v, **_reference_args(q, k, quant, "portable"))
    # measured <= 1.3e-3 (fp16 rounding of near-one-hot rows); fp8 on an H200 4.7e-2: the FP8 MMA's
    # reduced-precision accumulation (not modelled by the reference) decides near-ties of one-hot rows
    assert rel_l2(out, ref) < (0.07 if quant == "fp8" and DEV == "cuda" else 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("quant", PRESET_NAMES)
def test_gpu_fp16_huge_inputs_stay_finite(gen, quant, D):
    """Issue 14 item 4 on the GPU (1x4x512xD, randn x 1e4 in fp16): no Inf/NaN, SDPA fp16 finite too."""
    q, k, v = (t.cuda() for t in _fp16_large(gen, D))
    out = qflash.attention(q, k, v, quant=quant)
    assert F.scaled_dot_product_attention(q, k, v).isfinite().all()
    assert out.isfinite().all(), int((~out.isfinite()).sum())
    ref = fake_quant_attention(q, k, v, **reference_args_of_call(q, k, quant))
    # H200 (session 9, one-launch mode with per-split statistics): D64 within 2e-2; D128 int8
    # 3.0e-2, fp8 3.3e-2. Presumably near-tied top keys of one-hot rows (logits ~1e8) that flip with
    # one K code step (the kernel sums its fp32 K mean in another order); not analysed further.
    # The interpreter, which sums like torch: <= 4e-4.
    assert rel_l2(out, ref) < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("S", [256, 1024])  # 1024 keys: the Hopper family on sm_90 (int8-fp8, fp8)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("quant", PRESET_NAMES)
def test_gpu_nonfinite_inputs_propagate_like_sdpa(gen, case, quant, S):
    """The GPU's max/min drop NaNs: the kernels' NaN-propagating amax must still see them."""
    q, k, v = (t.cuda().half() for t in _inject(gen, case, S=S, D=64))
    ref = _sdpa_math(q.float(), k.float(), v.float())
    out = qflash.attention(q, k, v, quant=quant)
    bad, ref_bad = ~out.isfinite(), ~ref.isfinite()
    if quant == "int4" and case in ("nan_q", "inf_q"):
        assert bad[0, 0, :128].all() and not bad[0, 1].any()
    else:
        assert torch.equal(bad, ref_bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", PRESET_NAMES)
def test_nan_row_that_sees_no_key_is_zero(gen, quant, backend):
    """Causal bottom-right with Sq > Sk: rows that see no key are zeros / lse -inf even when their
    q holds a NaN (a NaN row multiplier once leaked through -inf·NaN into m and alpha); rows that
    see keys and hold a NaN are NaN (found by tests/test_fuzz_kernels.py)."""
    q = torch.randn(1, 1, 35, 18, generator=gen) * 10
    k, v = torch.randn(1, 1, 9, 18, generator=gen) * 10, torch.randn(1, 1, 9, 18, generator=gen)
    q[0, 0, 17, 8] = math.nan  # row 17 sees key j iff j <= 17 - 26: none
    q[0, 0, 30, 8] = math.nan  # row 30 sees keys 0..4
    out, lse = _attn(q, k, v, quant=quant, causal=True, scale=0.05, return_lse=True, backend=backend)
    assert (out[0, 0, 17] == 0).all() and lse[0, 0, 17] == -math.inf
    if quant != "int4":  # int4: Q's block mean spreads row 30's NaN over its block (rows 0..34)
        assert out[0, 0, 30].isnan().all() and lse[0, 0, 30].isnan()
        assert torch.equal((~out[0, 0].isfinite()).any(-1), torch.arange(35) == 30)
