"""Backward kernels (issue 7) against torch.autograd through the fp64 exact reference.

Runs on CUDA when there is a GPU and through Triton's CPU interpreter otherwise (small shapes;
``gpu`` tests add large ones). Every gradient buffer is poisoned with NaN before the kernels
write it; inputs and upstream gradients are fresh N(0, 1) samples, never zeros.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import rel_l2

from qflash.config import PRESETS
from qflash.kernels.common import triton_usable as kernels_usable
from qflash.reference import exact_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not kernels_usable(torch.device(DEVICE))[0]:
    pytest.skip("Triton kernels cannot run here (no CUDA, interpreter off)", allow_module_level=True)

from qflash.autograd import saved_bytes
from qflash.kernels.portable.bwd_launch import (
    BwdConfig,
    attention_bwd,
    quantize_for_backward,
    ste_backward,
)
from qflash.kernels.portable.launch import attention_fwd
from qflash.kernels.portable.tuning import KernelConfig

SMALL_BWD = BwdConfig(32, 32, 32, 32, 4, 1, 4, 1)  # interpreter: small tiles keep programs cheap
SMALL_FWD = KernelConfig(32, 32, 4, 1)
# gradient relL2 vs fp64 autograd, bf16/fp16 inputs rounded the same way for both sides
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# check_grads' bound for dq/dk/dv: on the CPU interpreter ~1.7x the max measured over its 39 fp32,
# 15 fp16 and 6 bf16 cases (3.4e-7, 7.1e-4, 2.8e-3; TOL is 7-60x that); on a GPU TOL (not re-measured)
GRAD_TOL = TOL if torch.cuda.is_available() else {torch.float32: 6e-7, torch.float16: 1.2e-3, torch.bfloat16: 5e-3}
LOWBIT_TOL = 4e-2  # INT8 backward (measured ~1.5% on N(0,1) inputs)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, layout, gen, k_offset=0.0):
    """Fresh q, k, v (HND views of ``layout`` buffers) and an upstream gradient dO."""
    def one(H, S):
        shape = (B, H, S, D) if layout == "HND" else (B, S, H, D)
        x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        return x if layout == "HND" else x.transpose(1, 2)
    q, k, v = one(Hq, Sq), one(Hkv, Sk), one(Hkv, Sk)
    if k_offset:
        k = (k.float() + k_offset * torch.randn(1, 1, 1, D, generator=gen).to(DEVICE)).to(dtype)
    do = one(Hq, Sq)
    return q, k, v, do


def reference_grads(q, k, v, do, dlse=None, **kw):
    """dq, dk, dv (and d mask for a float mask) by torch.autograd through exact fp64 attention."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = kw.pop("attn_mask", None)
    md = None
    if mask is not None and mask.is_floating_point():
        md = mask.detach().double().requires_grad_()
        mask = md
    out, lse = exact_attention(qd, kd, vd, attn_mask=mask, return_lse=True, **kw)
    loss = (out * do.double()).sum()
    if dlse is not None:
        fin = torch.isfinite(lse)
        loss = loss + (torch.where(fin, lse.double(), 0.0) * dlse.double()).sum()
    inputs = [qd, kd, vd] + ([md] if md is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return grads


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def run_bwd(q, k, v, do, *, dlse=None, lowbit="none", kc=SMALL_BWD, mask_grad=False, **kw):
    """Kernel forward (preset none, for O and lse), then the backward into NaN-poisoned buffers."""
    out, lse = attention_fwd(q, k, v, PRESETS["none"], return_lse=True, kernel_config=SMALL_FWD, **kw)
    dq, dk, dv = poisoned(q), poisoned(k), poisoned(v)
    res = attention_bwd(q, k, v, out, lse, do, dlse, lowbit=lowbit, kernel_config=kc, mask_grad=mask_grad,
                        dq=dq, dk=dk, dv=dv, **kw)
    assert res[0] is dq and res[1] is dk and res[2] is dv
    for name, g in zip("qkv", res[:3]):
        assert not torch.isnan(g).any(), f"d{name}: NaN (unwritten or computed)"
    return res


def check_grads(got, want, tol):
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.shape == w.shape
        err = rel_l2(g, w)
        assert err <= tol, f"{name} relL2 {err:.2e} > {tol:.0e}"


# (B, Hq, Hkv, Sq, Sk, D), causal, layout, dtype
CASES = [
    pytest.param((1, 2, 2, 64, 64, 64), False, "HND", torch.float32, id="S64-full-fp32"),
    pytest.param((2, 2, 1, 40, 75, 64), True, "NHD", torch.float32, id="Sq40-Sk75-causal-MQA-NHD-fp32"),
    pytest.param((1, 4, 2, 75, 40, 64), True, "HND", torch.float16, id="Sq75-Sk40-causal-GQA-fp16"),
    pytest.param((1, 2, 2, 33, 47, 128), False, "NHD", torch.bfloat16, id="Sq33-Sk47-D128-NHD-bf16"),
    pytest.param((1, 2, 1, 50, 20, 96), False, "HND", torch.float32, id="Sq50-Sk20-D96-fp32"),
    pytest.param((1, 2, 2, 1, 37, 64), True, "HND", torch.float16, id="Sq1-Sk37-causal-fp16"),
]


@pytest.mark.parametrize("shape,causal,layout,dtype", CASES)
def test_grads_match_fp64_autograd(shape, causal, layout, dtype):
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v, do = make_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, layout, _gen(shape, causal, layout, dtype))
    dq, dk, dv, dmask = run_bwd(q, k, v, do, causal=causal)
    assert dmask is None
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()
    assert dq.dtype == dtype
    check_grads((dq, dk, dv), reference_grads(q, k, v, do, causal=causal), GRAD_TOL[dtype])


def test_scale_and_grad_lse():
    """A custom softmax scale, and an upstream gradient on the lse output (folded into delta)."""
    gen = _gen("lse")
    q, k, v, do = make_inputs(1, 2, 2, 48, 56, 64, torch.float32, "HND", gen)
    dlse = torch.randn(1, 2, 48, generator=gen).to(DEVICE)
    dq, dk, dv, _ = run_bwd(q, k, v, do, dlse=dlse, scale=0.3, causal=True)
    check_grads((dq, dk, dv), reference_grads(q, k, v, do, dlse=dlse, scale=0.3, causal=True), GRAD_TOL[torch.float32])


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", ["B1QK", "1HQK", "QK", "B11K"])
def test_masks(mask_kind, mask_shape):
    B, Hq, Hkv, Sq, Sk, D = 2, 2, 1, 37, 70, 64
    gen = _gen(mask_kind, mask_shape)
    q, k, v, do = make_inputs(B, Hq, Hkv, Sq, Sk, D, torch.float32, "HND", gen)
    shape = {"B1QK": (B, 1, Sq, Sk), "1HQK": (1, Hq, Sq, Sk), "QK": (Sq, Sk), "B11K": (B, 1, 1, Sk)}[mask_shape]
    if mask_kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.3
        if len(shape) == 4 and shape[2] == Sq:
            mask[..., 3, :] = False  # a fully masked row: zero gradient, never NaN
    else:
        mask = torch.randn(shape, generator=gen) * 2
        mask[..., 5] = float("-inf")
    mask = mask.to(DEVICE)
    dq, dk, dv, dmask = run_bwd(q, k, v, do, attn_mask=mask, mask_grad=True)
    want = reference_grads(q, k, v, do, attn_mask=mask)
    check_grads((dq, dk, dv), want[:3], GRAD_TOL[torch.float32])
    if mask_kind == "bool":
        assert dmask is None
        if len(shape) == 4 and shape[2] == Sq:
            assert (dq[:, :, 3] == 0).all()
    else:
        assert dmask is not None and dmask.shape == mask.shape and dmask.dtype == mask.dtype
        fin = torch.isfinite(mask)
        assert rel_l2(dmask[fin.expand_as(dmask)], want[3][fin.expand_as(dmask)]) <= TOL[torch.float32]
        assert torch.isfinite(dmask).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fully_masked_rows_give_zero_grads(dtype):
    """Causal with Sq > Sk (the first Sq - Sk rows see no key) plus a bool mask blanking a row
    and a whole key column: those rows' dq are exactly 0, the unseen key's dk/dv are exactly 0."""
    B, Hq, Hkv, Sq, Sk, D = 1, 2, 2, 50, 20, 64
    gen = _gen("fully-masked", dtype)
    q, k, v, do = make_inputs(B, Hq, Hkv, Sq, Sk, D, dtype, "HND", gen)
    mask = torch.rand(1, 1, Sq, Sk, generator=gen) > 0.2
    mask[..., 40, :] = False
    mask[..., 7] = False
    mask = mask.to(DEVICE)
    dq, dk, dv, _ = run_bwd(q, k, v, do, causal=True, attn_mask=mask)
    assert (dq[:, :, : Sq - Sk] == 0).all() and (dq[:, :, 40] == 0).all()
    assert (dk[:, :, 7] == 0).all() and (dv[:, :, 7] == 0).all()
    check_grads((dq, dk, dv), reference_grads(q, k, v, do, causal=True, attn_mask=mask), GRAD_TOL[dtype])


def test_empty_keys():
    q, k, v, do = make_inputs(1, 2, 2, 5, 0, 64, torch.float32, "HND", _gen("empty"))
    out = torch.zeros_like(q)
    lse = torch.full((1, 2, 5), float("-inf"), device=DEVICE)
    dq, dk, dv, _ = attention_bwd(q, k, v, out, lse, do, dq=poisoned(q), dk=poisoned(k), dv=poisoned(v))
    assert (dq == 0).all() and dk.numel() == 0 and dv.numel() == 0


def test_tile_configs_agree():
    """Different tile shapes (incl. blocks larger than the sequence) give the same gradients."""
    q, k, v, do = make_inputs(1, 2, 1, 70, 45, 64, torch.float32, "HND", _gen("tiles"))
    a = run_bwd(q, k, v, do, causal=True, kc=SMALL_BWD)
    b = run_bwd(q, k, v, do, causal=True, kc=BwdConfig(16, 64, 64, 16, 4, 1, 4, 1))
    for x, y in zip(a[:3], b[:3]):
        assert rel_l2(x, y) <= 1e-6


@pytest.mark.parametrize("preset", ["int8", "int4", "int8-fp8"])
def test_ste_quantised_forward(preset):
    """STE: the gradient of a quantised forward is exact attention's. With the recompute (the
    default) it is as accurate as preset none's; the forward's own O and lse are worse."""
    gen = _gen("ste", preset)
    q, k, v, do = make_inputs(1, 2, 2, 64, 64, 64, torch.float16, "HND", gen, k_offset=2.0)
    cfg = PRESETS[preset]
    out_q, lse_q = attention_fwd(q, k, v, cfg, return_lse=True, kernel_config=SMALL_FWD)
    want = reference_grads(q, k, v, do)
    rec = ste_backward(q, k, v, do, None, cfg, out=out_q, lse=lse_q, kernel_config=SMALL_BWD)
    check_grads(rec[:3], want, GRAD_TOL[torch.float16])
    no_rec = ste_backward(q, k, v, do, None, cfg, out=out_q, lse=lse_q, recompute=False, kernel_config=SMALL_BWD)
    assert rel_l2(no_rec[0], want[0]) > 2 * rel_l2(rec[0], want[0])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_lowbit_int8(causal, layout):
    """INT8 backward: within its budget of the exact gradient, and reading only codes works."""
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 2, 64, 80, 64
    gen = _gen("lowbit", causal, layout)
    q, k, v, do = make_inputs(B, Hq, Hkv, Sq, Sk, D, torch.bfloat16, layout, gen, k_offset=2.0)
    want = reference_grads(q, k, v, do, causal=causal)
    got = run_bwd(q, k, v, do, causal=causal, lowbit="int8")
    errs = [rel_l2(g, w) for g, w in zip(got[:3], want)]
    assert max(errs) <= LOWBIT_TOL, errs
    exact = run_bwd(q, k, v, do, causal=causal)
    assert max(rel_l2(g, w) for g, w in zip(exact[:3], want)) < min(errs)  # it is lower precision
    # codes computed up front (e.g. at forward time), q and k dropped: identical gradients
    codes = quantize_for_backward(q, k)
    out, lse = attention_fwd(q, k, v, PRESETS["none"], causal=causal, return_lse=True, kernel_config=SMALL_FWD)
    dq, dk, dv = (torch.full(t.shape, float("nan"), dtype=t.dtype, device=DEVICE) for t in (q, k, v))
    res = attention_bwd(None, None, v, out, lse, do, causal=causal, lowbit="int8", codes=codes,
                        kernel_config=SMALL_BWD, dq=dq, dk=dk, dv=dv)
    for a, b in zip(res[:3], got[:3]):
        assert torch.equal(a.contiguous(), b.contiguous())


def test_lowbit_grad_lse():
    """grad_lse with the INT8 backward (the smoothed-K correction of dQ uses it)."""
    gen = _gen("lowbit-lse")
    q, k, v, do = make_inputs(1, 2, 2, 64, 64, 64, torch.float32, "HND", gen, k_offset=2.0)
    dlse = torch.randn(1, 2, 64, generator=gen).to(DEVICE)
    got = run_bwd(q, k, v, do, dlse=dlse, lowbit="int8")
    want = reference_grads(q, k, v, do, dlse=dlse)
    assert max(rel_l2(g, w) for g, w in zip(got[:3], want)) <= LOWBIT_TOL


def test_bad_arguments():
    q, k, v, do = make_inputs(1, 2, 2, 16, 16, 64, torch.float32, "HND", _gen("bad"))
    out, lse = torch.zeros_like(q), torch.zeros(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="lowbit"):
        attention_bwd(q, k, v, out, lse, do, lowbit="int4")
    with pytest.raises(ValueError, match="lse"):
        attention_bwd(q, k, v, out, lse[:, :, :3], do)
    with pytest.raises(ValueError, match="codes"):
        attention_bwd(None, k, v, out, lse, do, lowbit="int8")
    with pytest.raises(ValueError, match="dq"):
        attention_bwd(q, k, v, out, lse, do, dq=torch.empty(3, device=DEVICE))


def test_saved_bytes():
    B, H, S, D = 1, 24, 4608, 128
    qkv = 3 * B * H * S * D * 2
    out_lse = B * H * S * D * 2 + B * H * S * 4
    none = saved_bytes(B, H, H, S, S, D, quant="none")
    assert none["total"] == qkv + out_lse
    # int8 reuses its forward's O and lse by default; recompute keeps q, k, v only
    assert saved_bytes(B, H, H, S, S, D, quant="int8")["total"] == qkv + out_lse
    rec = saved_bytes(B, H, H, S, S, D, quant="int8", recompute=True)
    assert set(rec) == {"q", "k", "v", "total"} and rec["total"] == qkv
    assert saved_bytes(B, H, H, S, S, D, quant="int4")["total"] == qkv
    assert saved_bytes(B, H, H, S, S, D, quant="int8-fp8")["total"] == qkv
    assert saved_bytes(B, H, H, S, S, D, quant="int8-fp8", lowbit="int8")["total"] == qkv
    # reuse is the default for bf16 only: fp16 int8 recomputes
    assert saved_bytes(B, H, H, S, S, D, quant="int8", dtype=torch.float16)["total"] == qkv * 1
    assert saved_bytes(B, H, H, S, S, D, quant="none", return_lse=False)["total"] == qkv
    # the op keeps q and k for the INT8 backward (it quantises them itself) ...
    assert saved_bytes(B, H, H, S, S, D, quant="none", lowbit="int8") == none
    # ... a caller that keeps only codes (examples/train_tiny.py) saves less
    low = saved_bytes(B, H, H, S, S, D, quant="none", lowbit="int8", codes=True)
    assert low["total"] < none["total"]
    with pytest.raises(ValueError, match="codes"):
        saved_bytes(B, H, H, S, S, D, codes=True)
    # the codes really are that size
    q, k, _, _ = make_inputs(1, 4, 2, 16, 24, 64, torch.bfloat16, "HND", _gen("bytes"))
    codes = quantize_for_backward(q, k)
    sb = saved_bytes(1, 4, 2, 16, 24, 64, lowbit="int8", codes=True)
    assert codes.nbytes() == sb["q_codes+scales+row_bias"] + sb["k_codes+scales+mean"]


# ------------------------------------------------------------------------------------------------
# quantised forwards: reuse the forward's O and lse, or recompute the exact ones
# ------------------------------------------------------------------------------------------------

# Gradient relL2 budgets when the backward reuses a quantised forward's O and lse (bf16, N(0,1),
# the shape below, non-causal). Measured (max of dq/dk/dv, 3 seeds): bwd "none" int8 0.32-0.35%,
# int8-fp8 0.69-0.80%, fp8 1.37-1.46%, int4 4.1-5.5%; bwd "int8" 1.61-1.71%, 1.71-1.86%,
# 2.05-2.18%, 4.2-5.5% (recompute: 0.24% and 1.65-1.78%).
REUSE_TOL = {"none": {"int8": 1e-2, "int8-fp8": 1.5e-2, "fp8": 2.5e-2, "int4": 8e-2},
             "int8": {"int8": LOWBIT_TOL, "int8-fp8": LOWBIT_TOL, "fp8": LOWBIT_TOL, "int4": 8e-2}}
REUSE_SHAPE = (1, 2, 1, 96, 128, 64)  # MQA, Sq != Sk


def _reuse_and_recompute(preset, lowbit, causal, square=False):
    """(max relL2 reusing the forward's O/lse, max relL2 recomputing them) vs fp64 exact."""
    B, Hq, Hkv, Sq, Sk, D = REUSE_SHAPE
    if square:
        Sq = Sk
    q, k, v, do = make_inputs(B, Hq, Hkv, Sq, Sk, D, torch.bfloat16, "HND", _gen("reuse", preset, lowbit, causal))
    cfg = PRESETS[preset]
    out_q, lse_q = attention_fwd(q, k, v, cfg, causal=causal, return_lse=True)
    want = reference_grads(q, k, v, do, causal=causal)
    errs = []
    for recompute in (False, True):
        got = ste_backward(q, k, v, do, None, cfg, out=out_q, lse=lse_q, causal=causal, recompute=recompute,
                           lowbit=lowbit, grad_buffers=(poisoned(q), poisoned(k), poisoned(v)))
        assert not any(torch.isnan(g).any() for g in got[:3])
        errs.append(max(rel_l2(g, w) for g, w in zip(got[:3], want)))
    return errs


@pytest.mark.parametrize("lowbit", ["none", "int8"])
@pytest.mark.parametrize("preset", ["int8", "int8-fp8", "fp8", "int4"])
def test_ste_reuse_forward_stats(preset, lowbit):
    """Reusing the quantised forward's O and lse: within the preset's budget; where the ops'
    default reuses, within 1% or 1.5x of the recompute mode's error (the rule behind the default)."""
    from qflash.autograd import bwd_recompute_default

    reuse, recompute = _reuse_and_recompute(preset, lowbit, causal=False)
    assert recompute <= (TOL[torch.bfloat16] if lowbit == "none" else LOWBIT_TOL)
    assert reuse <= REUSE_TOL[lowbit][preset], (reuse, recompute)
    if not bwd_recompute_default(preset, lowbit):
        assert reuse <= max(1e-2, 1.5 * recompute), (reuse, recompute)


@pytest.mark.parametrize("square", [False, True], ids=["Sq<Sk", "square"])
@pytest.mark.parametrize("preset,lowbit", [("int8", "none"), ("int8", "int8")])
def test_ste_reuse_default_rule_causal(preset, lowbit, square):
    """The default-reuse pairs keep the rule under causal masking (rows with few keys: larger error;
    a square causal shape has rows that see a single key)."""
    from qflash.autograd import bwd_recompute_default

    assert not bwd_recompute_default(preset, lowbit)
    reuse, recompute = _reuse_and_recompute(preset, lowbit, causal=True, square=square)
    assert reuse <= max(1e-2, 1.5 * recompute), (reuse, recompute)


def test_bwd_recompute_default_table():
    from qflash.autograd import bwd_recompute_default
    from qflash.kernels.portable.bwd_launch import LOWBIT_MODES
    from qflash.spec import BWD_LOWBIT_MODES

    assert BWD_LOWBIT_MODES == LOWBIT_MODES
    reuse = {(p, lb) for p in PRESETS for lb in LOWBIT_MODES if not bwd_recompute_default(p, lb)}
    assert reuse == {("none", "none"), ("none", "int8"), ("int8", "none"), ("int8", "int8")}
    assert not bwd_recompute_default(PRESETS["int8"])  # a QuantConfig equal to the preset
    assert bwd_recompute_default(PRESETS["int8"].with_(smooth_k=False))  # custom configs recompute
    # fp16 / fp32: recomputing is far more accurate than reusing (0.03% / 4e-7 vs 0.2-0.5%)
    assert bwd_recompute_default("int8", "none", torch.float16) and bwd_recompute_default("int8", "none", torch.float32)
    assert not bwd_recompute_default("none", "none", torch.float32)


# ------------------------------------------------------------------------------------------------
# GPU: larger shapes, bf16, the Flux shape; vs fp32 exact
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    pytest.param((2, 8, 8, 1000, 1000, 64), False, "HND", id="S1000-D64"),
    pytest.param((1, 8, 2, 777, 4097, 128), True, "NHD", id="Sq777-Sk4097-causal-GQA-NHD"),
    pytest.param((1, 4, 1, 4097, 333, 128), True, "HND", id="Sq4097-Sk333-causal-MQA"),
    pytest.param((1, 4, 4, 300, 300, 96), False, "HND", id="S300-D96"),
    pytest.param((1, 24, 24, 4608, 4608, 128), False, "NHD", id="flux-1024"),
]


def _fp32_grads(q, k, v, do, **kw):
    """fp32 exact gradients (TF32 off) on the GPU; fully masked rows get zeros, not NaN."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = exact_attention(qf, kf, vf, compute_dtype=torch.float32, **kw)
    return torch.autograd.grad(out, (qf, kf, vf), do.float())


@pytest.mark.gpu
@pytest.mark.parametrize("lowbit", ["none", "int8"])
@pytest.mark.parametrize("shape,causal,layout", GPU_CASES)
def test_gpu_grads_vs_fp32(shape, causal, layout, lowbit):
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v, do = make_inputs(B, Hq, Hkv, Sq, Sk, D, torch.bfloat16, layout, _gen("gpu", shape, causal))
    out, lse = attention_fwd(q, k, v, PRESETS["none"], causal=causal, return_lse=True)
    dq, dk, dv = poisoned(q), poisoned(k), poisoned(v)
    attention_bwd(q, k, v, out, lse, do, causal=causal, lowbit=lowbit, dq=dq, dk=dk, dv=dv)
    want = _fp32_grads(q, k, v, do, causal=causal)
    budget = 1e-2 if lowbit == "none" else LOWBIT_TOL
    for name, g, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert not torch.isnan(g).any()
        assert rel_l2(g, w) <= budget, f"{name}: {rel_l2(g, w):.2e}"


# ------------------------------------------------------------------------------------------------
# through the op: torch.ops.qflash.attention_fwd's autograd calls qflash::attention_bwd
# ------------------------------------------------------------------------------------------------

OP_CASES = [
    pytest.param("none", True, "HND", id="none-lse-HND"),
    pytest.param("none", True, "NHD", id="none-lse-NHD"),
    pytest.param("none", False, "NHD", id="none-nolse-NHD"),
    pytest.param("int8", True, "HND", id="int8-lse"),
    pytest.param("int4", False, "NHD", id="int4-NHD"),
]


@pytest.mark.parametrize("quant,return_lse,out_layout", OP_CASES)
def test_op_autograd_uses_kernels(quant, return_lse, out_layout, monkeypatch):
    from qflash import ops, reference

    calls = []
    real = reference.reference_backward
    monkeypatch.setattr(reference, "reference_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = _gen("op", quant, return_lse, out_layout)
    q, k, v, _ = make_inputs(1, 4, 2, 40, 56, 64, torch.float32, "HND", gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = (torch.randn(1, 4, 40, 56, generator=gen) * 2).to(DEVICE).requires_grad_()
    out, lse = ops.call_attention_fwd(q, k, v, quant, causal=True, attn_mask=mask, return_lse=return_lse,
                                      out_layout=out_layout, backend="triton", bwd_recompute=True)
    do = torch.randn(out.shape, generator=gen).to(DEVICE)
    loss = (out * do).sum()
    dlse = None
    if return_lse:
        dlse = torch.randn(lse.shape, generator=gen).to(DEVICE)
        loss = loss + (lse * dlse).sum()
    got = torch.autograd.grad(loss, (q, k, v, mask))
    assert not calls, "the reference backward ran instead of the kernels"
    want = reference_grads(q, k, v, do, dlse=dlse, causal=True, attn_mask=mask)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, want):
        assert rel_l2(g, w) <= 1e-5, f"{name}: {rel_l2(g, w):.2e}"


SAVED_CASES = [  # quant, bwd_lowbit, bwd_recompute, tensors saved besides the mask
    pytest.param("none", "none", None, 5, id="none"),
    pytest.param("none", "int8", None, 5, id="none-int8bwd"),
    pytest.param("int8", "none", None, 3, id="int8-fp32-recompute-default"),  # reuse is a bf16 default
    pytest.param("int8", "none", False, 5, id="int8-reuse"),
    pytest.param("int8", "none", True, 3, id="int8-recompute"),
    pytest.param("int8-fp8", "none", None, 3, id="int8fp8-recompute-default"),
    pytest.param("int8-fp8", "int8", None, 3, id="int8fp8-int8bwd-recompute-default"),
    pytest.param("fp8", "none", False, 5, id="fp8-reuse"),
]


@pytest.mark.parametrize("quant,lowbit,recompute,n_saved", SAVED_CASES)
def test_op_saved_tensors_match_saved_bytes(quant, lowbit, recompute, n_saved):
    """What the op keeps for the backward is what ``saved_bytes`` says; a bool mask gets no
    gradient; recompute gives exact gradients, reuse those of the forward's own O and lse."""
    from qflash import ops

    gen = _gen("op-saved", quant, lowbit, recompute)
    B, H, S, D = 1, 2, 32, 64
    q, k, v, do = make_inputs(B, H, H, S, S, D, torch.float32, "HND", gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = (torch.rand(S, S, generator=gen) > 0.2).to(DEVICE)
    out, _ = ops.call_attention_fwd(q, k, v, quant, attn_mask=mask, backend="triton", bwd_lowbit=lowbit,
                                    bwd_recompute=recompute)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None and t is not mask]
    assert len(saved) == n_saved, [tuple(t.shape) for t in saved]
    sb = saved_bytes(B, H, H, S, S, D, quant=quant, dtype=torch.float32, lowbit=lowbit, recompute=recompute)
    assert sum(t.numel() * t.element_size() for t in saved) == sb["total"]
    got = torch.autograd.grad(out, (q, k, v), do)
    want = reference_grads(q, k, v, do, attn_mask=mask)
    if lowbit == "int8":
        check_grads(got, want, LOWBIT_TOL)
    elif n_saved == 3 or quant == "none":
        check_grads(got, want, 1e-5)  # exact O and lse
    else:  # the same kernels fed the forward's O and lse by hand
        out_q, lse_q = attention_fwd(q.detach(), k.detach(), v.detach(), PRESETS[quant], attn_mask=mask,
                                     return_lse=True)
        by_hand = ste_backward(q.detach(), k.detach(), v.detach(), do, None, PRESETS[quant], out=out_q, lse=lse_q,
                               attn_mask=mask, recompute=False)
        check_grads(got, by_hand[:3], 1e-6)
        assert max(rel_l2(g, w) for g, w in zip(got, want)) > 1e-4  # not the exact gradient


def test_api_bwd_lowbit_reaches_int8_kernels(monkeypatch):
    """``qflash.attention`` / ``qflash.sdpa`` pass ``bwd_lowbit`` to the Triton backward (forced
    on here: on CPU the public functions otherwise run the exact PyTorch backward)."""
    import qflash
    from qflash.kernels.portable import bwd_launch

    lowbits = []
    real = bwd_launch.attention_bwd
    monkeypatch.setattr(bwd_launch, "attention_bwd", lambda *a, **kw: lowbits.append(kw["lowbit"]) or real(*a, **kw))
    from qflash.kernels import dispatch
    from qflash.kernels.portable import FAMILY as PORTABLE

    monkeypatch.setattr(dispatch, "backward_family", lambda spec, q, k, attn_mask: PORTABLE)
    gen = _gen("api-lowbit")
    q, k, v, do = make_inputs(1, 2, 2, 64, 64, 64, torch.float32, "NHD", gen)
    want = reference_grads(q, k, v, do, causal=True)

    def grads(fn, **kw):
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(fn(qg, kg, vg, **kw), (qg, kg, vg), do)

    def attention(q, k, v, **kw):  # NHD in, NHD out
        return qflash.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="NHD", causal=True,
                                **kw).transpose(1, 2)

    def sdpa(q, k, v, **kw):
        return qflash.sdpa(q, k, v, is_causal=True, fallback=False, **kw)

    for fn in (attention, sdpa):
        lowbits.clear()
        exact = grads(fn, quant="int8", bwd_recompute=True)
        low = grads(fn, quant="int8", bwd_lowbit="int8", bwd_recompute=True)
        assert lowbits == ["none", "int8"]
        check_grads(exact, want, 1e-5)
        check_grads(low, want, LOWBIT_TOL)
        assert min(rel_l2(a, b) for a, b in zip(low, exact)) > 3e-3  # really the INT8 products


def test_bad_bwd_arguments():
    import qflash
    from qflash import ops

    q, k, v, _ = make_inputs(1, 2, 2, 16, 16, 64, torch.float32, "HND", _gen("bad-bwd"))
    with pytest.raises(ValueError, match="bwd_lowbit"):
        qflash.attention(q, k, v, bwd_lowbit="int4")
    with pytest.raises(ValueError, match="bwd_lowbit"):
        qflash.sdpa(q, k, v, bwd_lowbit="bf16")  # the caller's error, never a fallback
    with pytest.raises(TypeError, match="bwd_recompute"):
        qflash.attention(q, k, v, bwd_recompute="yes")
    with pytest.raises(ValueError, match="bwd_lowbit"):
        ops.call_attention_fwd(q, k, v, "int8", bwd_lowbit="fp8")
    with pytest.raises(ValueError, match="bwd_lowbit"):
        torch.ops.qflash.attention_fwd(q, k, v, None, "int8|none|none|None|HND|0|auto|int4|None")


def test_opcheck_attention_bwd():
    from qflash import ops  # noqa: F401  (registers the ops)

    gen = _gen("opcheck")
    q, k, v, do = make_inputs(1, 2, 1, 17, 23, 64, torch.float32, "NHD", gen)
    mask = torch.randn(1, 2, 17, 23, generator=gen).to(DEVICE)
    from qflash.spec import AttnSpec

    spec = AttnSpec.build("int8", causal=True, attn_mask=mask, backend="portable")
    args = (q, k, v, None, None, do, None, mask, spec.key(), True)
    res = torch.library.opcheck(torch.ops.qflash.attention_bwd.default, args)
    assert all(v == "SUCCESS" for v in res.values()), res
    # the forward's own O and lse (reuse) and the INT8 backward
    out, lse = attention_fwd(q, k, v, PRESETS["int8"], causal=True, attn_mask=mask, return_lse=True)
    args = (q, k, v, out, lse, do, None, mask, spec.replace(bwd_lowbit="int8").key(), True)
    res = torch.library.opcheck(torch.ops.qflash.attention_bwd.default, args)
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("quant,lowbit", [("none", "none"), ("int8", "int8")], ids=["none", "int8-int8bwd"])
def test_compile_fullgraph_backward_graph_has_bwd_op(quant, lowbit):
    from qflash import ops

    graphs = []

    def capture(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def bw(g, _):
            graphs.append(g)
            return make_boxed_func(g)
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g), bw_compiler=bw)(gm, example_inputs)

    def f(q, k, v):
        return ops.call_attention_fwd(q, k, v, quant, causal=True, backend="triton", bwd_lowbit=lowbit,
                                      bwd_recompute=False if quant != "none" else None)[0]

    gen = _gen("compile", quant)
    q, k, v, do = make_inputs(1, 2, 2, 24, 24, 64, torch.float32, "HND", gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = torch.compile(f, fullgraph=True, backend=capture)(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), do)
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"
             and n.target is torch.ops.qflash.attention_bwd.default]
    assert len(nodes) == 1, [n.target for n in graphs[0].graph.nodes]
    args = nodes[0].args
    from qflash.spec import AttnSpec

    spec = AttnSpec.from_key(args[8])
    assert spec.bwd_lowbit == lowbit and args[3] is not None and args[4] is not None  # O, lse saved (exact / reused)
    check_grads(got, reference_grads(q, k, v, do, causal=True), 1e-5 if lowbit == "none" else LOWBIT_TOL)


def test_mask_only_grad_keeps_forward_stats():
    """Only an additive mask needs a gradient: the forward still hands its O and lse to the backward
    (found in review: the lse was requested only when q, k or v needed grads, so the backward
    recomputed the forward and ignored bwd_recompute=False)."""
    from qflash import ops

    gen = _gen("mask-only")
    q, k, v, do = make_inputs(1, 2, 2, 32, 48, 64, torch.bfloat16, "HND", gen)
    mask = (torch.randn(1, 2, 32, 48, generator=gen) * 2).to(DEVICE).requires_grad_()
    out, _ = ops.call_attention_fwd(q, k, v, "none", attn_mask=mask, backend="triton")
    saved = [t for t in out.grad_fn.saved_tensors if t is not None and t is not mask]
    assert len(saved) == 5, [tuple(t.shape) for t in saved]  # q, k, v, out, lse
    (dmask,) = torch.autograd.grad(out, (mask,), do)
    want = reference_grads(q, k, v, do, attn_mask=mask)[3]
    assert rel_l2(dmask, want) <= TOL[torch.bfloat16]
