"""qflash.sdpa against torch.nn.functional.scaled_dot_product_attention, fallbacks, patching,
and the SageAttention-compatible call."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import cosine, reference_args_of_call, rel_l2

import qflash
import qflash.dropin as qsdpa

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean_state():
    """Every test starts unpatched and with fresh once-only warnings, and must end unpatched."""
    assert F.scaled_dot_product_attention is TORCH_SDPA, "a previous test left SDPA patched"
    qsdpa.reset_fallback_warnings()
    yield
    while qsdpa.sdpa_patch_active():
        qsdpa.disable_sdpa_patch()
    F.scaled_dot_product_attention = TORCH_SDPA
    qsdpa.reset_fallback_warnings()


def rnd(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def make(gen, qshape, kshape, vshape=None, dtype=torch.float32):
    return rnd(gen, *qshape, dtype=dtype), rnd(gen, *kshape, dtype=dtype), rnd(gen, *(vshape or kshape), dtype=dtype)


def make_mask(gen, shape, kind):
    """A random mask: bool (about 70% kept, every row keeps key 0) or float (additive, N(0,1))."""
    if kind == "bool":
        m = torch.rand(*shape, generator=gen) < 0.7
        if shape and shape[-1] > 1:
            m[..., 0] = True  # no fully-masked rows in the semantics matrix (tested separately)
        return m
    return rnd(gen, *shape)


def no_qflash_warning():
    return warnings.catch_warnings(record=True)


# ---- the semantics matrix ---------------------------------------------------------------------

# (id, q shape, k shape, sdpa kwargs) — small, awkward sizes
SHAPES = [
    ("4d-square", (2, 3, 17, 32), (2, 3, 17, 32), {}),
    ("4d-Sq<Sk", (2, 3, 13, 32), (2, 3, 29, 32), {}),
    ("4d-Sq>Sk", (1, 2, 31, 64), (1, 2, 9, 64), {}),
    ("4d-S1", (2, 2, 1, 64), (2, 2, 7, 64), {}),
    ("3d", (3, 13, 32), (3, 21, 32), {}),
    ("2d", (13, 32), (21, 32), {}),
    ("scale", (2, 2, 11, 48), (2, 2, 19, 48), {"scale": 0.31}),
    ("gqa", (2, 4, 15, 32), (2, 2, 23, 32), {"enable_gqa": True}),
    ("gqa-8:1", (1, 8, 9, 32), (1, 1, 12, 32), {"enable_gqa": True}),
    ("mqa-broadcast", (2, 4, 15, 32), (2, 1, 23, 32), {}),
    ("causal-square", (2, 2, 19, 32), (2, 2, 19, 32), {"is_causal": True}),
    ("causal-Sq<Sk", (2, 2, 11, 32), (2, 2, 27, 32), {"is_causal": True}),
    ("causal-Sq>Sk", (2, 2, 27, 32), (2, 2, 11, 32), {"is_causal": True}),
    ("causal-3d", (2, 9, 32), (2, 14, 32), {"is_causal": True}),
    ("causal-gqa", (1, 4, 10, 32), (1, 2, 16, 32), {"is_causal": True, "enable_gqa": True}),
]


@pytest.mark.parametrize("qs,ks,kw", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_none_matches_torch_fp32(gen, qs, ks, kw):
    q, k, v = make(gen, qs, ks)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    with no_qflash_warning() as w:
        warnings.simplefilter("always")
        out = qflash.sdpa(q, k, v, quant="none", **kw)
    assert not [x for x in w if issubclass(x.category, qflash.QFlashFallbackWarning)], "unexpected fallback"
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


# masks of every broadcast shape, for 4-D (B=2, H=3, L=13, S=21) and 3-D (N=2, L=13, S=21) inputs
MASKS_4D = [(13, 21), (1, 21), (13, 1), (1, 1), (3, 13, 21), (1, 13, 21), (2, 1, 13, 21),
            (1, 3, 13, 21), (2, 3, 13, 21), (2, 1, 1, 21), (1, 3, 1, 21), (1, 1, 13, 1), (2, 3, 1, 1)]
MASKS_3D = [(13, 21), (1, 21), (2, 13, 21), (1, 13, 21), (2, 1, 21), (2, 13, 1), (1, 1, 1)]


def _mask_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mshape", MASKS_4D, ids=_mask_id)
def test_mask_broadcast_4d(gen, mshape, kind):
    q, k, v = make(gen, (2, 3, 13, 32), (2, 3, 21, 32))
    m = make_mask(gen, mshape, kind)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    out = qflash.sdpa(q, k, v, attn_mask=m, quant="none", fallback=False)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mshape", MASKS_3D, ids=_mask_id)
def test_mask_broadcast_3d(gen, mshape, kind):
    q, k, v = make(gen, (2, 13, 32), (2, 21, 32))
    m = make_mask(gen, mshape, kind)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    out = qflash.sdpa(q, k, v, attn_mask=m, quant="none", fallback=False)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


def test_mask_with_gqa_and_scale(gen):
    q, k, v = make(gen, (2, 4, 13, 32), (2, 2, 21, 32))
    m = make_mask(gen, (2, 4, 13, 21), "float")
    kw = {"attn_mask": m, "scale": 0.2, "enable_gqa": True}
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(qflash.sdpa(q, k, v, quant="none", fallback=False, **kw), ref, rtol=2e-5, atol=2e-6)


def test_fully_masked_rows_are_zero_like_torch(gen):
    q, k, v = make(gen, (1, 2, 6, 32), (1, 2, 9, 32))
    m = make_mask(gen, (6, 9), "bool")
    m[2] = False
    fm = torch.where(m, 0.0, float("-inf"))
    for mask in (m, fm):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = qflash.sdpa(q, k, v, attn_mask=mask, quant="none", fallback=False)
        assert torch.isfinite(out).all()
        assert (out[:, :, 2] == 0).all()
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_none_half_precision(gen, dtype):
    q, k, v = make(gen, (2, 2, 37, 64), (2, 2, 45, 64), dtype=dtype)
    m = make_mask(gen, (37, 45), "bool")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m)
    out = qflash.sdpa(q, k, v, attn_mask=m, quant="none", fallback=False)
    assert out.dtype == dtype
    torch_half = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    # qflash (fp32 softmax) is at least as close to the fp32 result as PyTorch's own half path
    assert rel_l2(out, ref) <= max(2 * rel_l2(torch_half, ref), 1e-3)


def test_nhd_strided_inputs_keep_their_memory_order(gen):
    qn, kn, vn = make(gen, (2, 17, 4, 32), (2, 23, 4, 32))  # (B, S, H, D) buffers
    q, k, v = (t.transpose(1, 2) for t in (qn, kn, vn))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = qflash.sdpa(q, k, v, quant="none")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    assert out.transpose(1, 2).is_contiguous()


# ---- quantised presets within budget ---------------------------------------------------------

BUDGET = {"int8": 0.02, "int8-fp8": 0.05}
QCASES = [
    ("plain", (2, 4, 70, 64), (2, 4, 70, 64), {}),
    ("causal-Sq<Sk", (1, 4, 40, 64), (1, 4, 130, 64), {"is_causal": True}),
    ("gqa-mask", (1, 4, 50, 64), (1, 2, 90, 64), {"enable_gqa": True, "mask": ((1, 4, 50, 90), "bool")}),
    ("3d-floatmask", (3, 45, 128), (3, 80, 128), {"mask": ((45, 80), "float")}),
]


@pytest.mark.parametrize("quant", list(BUDGET))
@pytest.mark.parametrize("qs,ks,kw", [c[1:] for c in QCASES], ids=[c[0] for c in QCASES])
def test_quantised_within_budget(gen, quant, qs, ks, kw):
    kw = dict(kw)
    q, k, v = make(gen, qs, ks)
    if "mask" in kw:
        kw["attn_mask"] = make_mask(gen, *kw.pop("mask"))
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    out = qflash.sdpa(q, k, v, quant=quant, fallback=False, **kw)
    err = rel_l2(out, ref)
    assert err < BUDGET[quant], f"{quant}: relL2 {err:.4f} over budget {BUDGET[quant]}"
    assert err > 1e-5, "suspiciously exact: was the call quantised at all?"
    assert cosine(out, ref) > 0.995


def test_quant_config_object(gen):
    q, k, v = make(gen, (1, 2, 40, 64), (1, 2, 40, 64))
    cfg = qflash.PRESETS["int8"].with_(smooth_k=False)
    out = qflash.sdpa(q, k, v, quant=cfg)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) < 0.03


# ---- fallbacks -----------------------------------------------------------------------------------

FALLBACKS = [
    ("dropout", (2, 2, 8, 32), (2, 2, 8, 32), None, {"dropout_p": 0.3}, "dropout_p"),
    ("float64", (2, 2, 8, 32), (2, 2, 8, 32), None, {"dtype": torch.float64}, "float64"),
    ("value-head-dim", (2, 2, 8, 32), (2, 2, 8, 32), (2, 2, 8, 16), {}, "head dims differ"),
    ("head-dim-512", (1, 1, 8, 512), (1, 1, 8, 512), None, {}, "head dim"),
    ("causal+mask", (1, 2, 6, 32), (1, 2, 9, 32), None, {"is_causal": True, "mask": (6, 9)}, "is_causal"),
    ("5d", (2, 2, 2, 8, 32), (2, 2, 2, 8, 32), None, {}, "rank 5"),
    ("batch-broadcast", (3, 2, 8, 32), (1, 2, 8, 32), None, {}, "batch dims"),
    ("1d-mask-3d-input", (2, 8, 32), (2, 9, 32), None, {"mask": (9,)}, "attn_mask of shape"),
]


@pytest.mark.parametrize("qs,ks,vs,kw,words", [c[1:] for c in FALLBACKS], ids=[c[0] for c in FALLBACKS])
def test_fallback_warns_once_and_matches_torch(gen, qs, ks, vs, kw, words):
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.float32)
    q, k, v = make(gen, qs, ks, vs, dtype=dtype)
    if "mask" in kw:
        kw["attn_mask"] = make_mask(gen, kw.pop("mask"), "bool")
    torch.manual_seed(1234)  # dropout draws from the global generator: same seed, same result
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(1234)
    with pytest.warns(qflash.QFlashFallbackWarning, match=words):
        out = qflash.sdpa(q, k, v, quant="int8", **kw)
    assert torch.equal(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qflash.QFlashFallbackWarning)  # once per reason: silent now
        qflash.sdpa(q, k, v, quant="int8", **kw)
    with pytest.raises(ValueError, match=words):
        qflash.sdpa(q, k, v, quant="int8", fallback=False, **kw)


def test_fallback_warns_again_after_reset(gen):
    q, k, v = make(gen, (1, 1, 4, 16), (1, 1, 4, 16), dtype=torch.float64)
    with pytest.warns(qflash.QFlashFallbackWarning):
        qflash.sdpa(q, k, v)
    qsdpa.reset_fallback_warnings()
    with pytest.warns(qflash.QFlashFallbackWarning):
        qflash.sdpa(q, k, v)


def test_fallback_passes_torch_errors_through(gen):
    q, k, v = make(gen, (1, 4, 8, 32), (1, 2, 8, 32))  # 4 vs 2 heads without enable_gqa: PyTorch's error
    with pytest.warns(qflash.QFlashFallbackWarning, match="enable_gqa"), pytest.raises(RuntimeError):
        qflash.sdpa(q, k, v)
    with pytest.raises(ValueError, match="4 heads"):
        qflash.sdpa(q, k, v, fallback=False)


def test_bad_arguments_raise_whatever_fallback(gen):
    q, k, v = make(gen, (1, 2, 8, 32), (1, 2, 8, 32))
    with pytest.raises(ValueError, match="not a preset"):
        qflash.sdpa(q, k, v, quant="int9")
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        qflash.sdpa(q, k.tolist(), v)


# ---- patching ------------------------------------------------------------------------------------


def test_patch_routes_and_restores_exact_object(gen):
    q, k, v = make(gen, (2, 2, 40, 64), (2, 2, 50, 64))
    original = F.scaled_dot_product_attention
    with qflash.patch_sdpa(quant="int8") as handle:
        assert F.scaled_dot_product_attention is handle.installed
        assert F.scaled_dot_product_attention is not original
        patched = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert F.scaled_dot_product_attention is original
    assert torch.equal(patched, qflash.sdpa(q, k, v, is_causal=True, quant="int8"))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert 1e-5 < rel_l2(patched, exact) < 0.02


def test_patch_nests(gen):
    q, k, v = make(gen, (1, 2, 30, 64), (1, 2, 30, 64))
    original = F.scaled_dot_product_attention
    with qflash.patch_sdpa(quant="int8") as outer:
        with qflash.patch_sdpa(quant="int8-fp8") as inner:
            assert F.scaled_dot_product_attention is inner.installed
            inner_out = F.scaled_dot_product_attention(q, k, v)
        assert F.scaled_dot_product_attention is outer.installed
        outer_out = F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention is original
    assert torch.equal(inner_out, qflash.sdpa(q, k, v, quant="int8-fp8"))
    assert torch.equal(outer_out, qflash.sdpa(q, k, v, quant="int8"))
    assert not torch.equal(inner_out, outer_out)


def test_patch_is_exception_safe():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError, match="boom"), qflash.patch_sdpa(), qflash.patch_sdpa(quant="none"):
        raise KeyError("boom")
    assert F.scaled_dot_product_attention is original
    assert not qsdpa.sdpa_patch_active()


def test_enable_disable_functions():
    original = F.scaled_dot_product_attention
    assert qflash.disable_sdpa_patch() is False  # nothing to undo
    h1 = qflash.enable_sdpa_patch(quant="int8")
    h2 = qflash.enable_sdpa_patch(quant="none")
    with pytest.raises(RuntimeError, match="innermost"):
        qflash.disable_sdpa_patch(h1)
    assert qflash.disable_sdpa_patch(h2) is True
    assert F.scaled_dot_product_attention is h1.installed
    assert qflash.disable_sdpa_patch(h2) is False  # already undone
    assert qflash.disable_sdpa_patch() is True
    assert F.scaled_dot_product_attention is original
    with pytest.raises(ValueError, match="not a preset"):
        qflash.enable_sdpa_patch(quant="int9")
    assert F.scaled_dot_product_attention is original


def test_patched_fallback_calls_saved_original_without_recursion(gen):
    """A function someone installed before qflash is what fallbacks call — once, and it comes back."""
    calls = []

    def other_library_sdpa(*args, **kwargs):
        calls.append(1)
        return TORCH_SDPA(*args, **kwargs)

    F.scaled_dot_product_attention = other_library_sdpa
    q, k, v = make(gen, (1, 2, 8, 32), (1, 2, 8, 32), dtype=torch.float64)  # float64: a fallback
    with qflash.patch_sdpa(), qflash.patch_sdpa(quant="none"):
        with pytest.warns(qflash.QFlashFallbackWarning):
            out = F.scaled_dot_product_attention(q, k, v)
        assert qsdpa.original_sdpa() is other_library_sdpa
    assert calls == [1]
    assert F.scaled_dot_product_attention is other_library_sdpa
    assert torch.equal(out, TORCH_SDPA(q, k, v))


def test_unpatched_fallback_uses_torch(gen):
    assert qsdpa.original_sdpa() is TORCH_SDPA


# ---- SageAttention-compatible call ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_sageattn_layouts_and_lse(gen, layout):
    q, k, v = make(gen, (2, 3, 33, 64), (2, 3, 33, 64))
    args = [t.transpose(1, 2).contiguous() for t in (q, k, v)] if layout == "NHD" else [q, k, v]
    out, lse = qflash.sageattn(*args, tensor_layout=layout, is_causal=True, sm_scale=0.2, return_lse=True)
    out_hnd = out.transpose(1, 2) if layout == "NHD" else out
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    assert out.shape == args[0].shape
    assert rel_l2(out_hnd, ref) < 0.02
    scores = (q @ k.transpose(-1, -2) * 0.2).masked_fill(~torch.ones(33, 33, dtype=torch.bool).tril(), float("-inf"))
    assert lse.shape == (2, 3, 33) and lse.dtype == torch.float32
    assert (lse - torch.logsumexp(scores, -1)).abs().max() < 0.05  # int8 score error, not a bug
    plain = qflash.sageattn(*args, tensor_layout=layout, qk_quant_gran="per_warp", pv_accum_dtype="fp32")
    assert isinstance(plain, torch.Tensor)


def test_sageattn_rejects_unknown_kwargs(gen):
    q, k, v = make(gen, (1, 2, 8, 64), (1, 2, 8, 64))
    with pytest.raises(TypeError, match="attn_bias"):
        qflash.sageattn(q, k, v, attn_bias=None)
    with pytest.raises(ValueError, match="tensor_layout"):
        qflash.sageattn(q, k, v, tensor_layout="BHSD")


# ---- the same semantics through the Triton kernels (GPU, or the CPU interpreter) --------------

KERNEL_DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter runs the same kernels at a smaller NHD case (the GPU keeps its 576-token one, with
# 16 heads: enough query tiles that the split-key mode stays off, whose per-split P rounding and
# merge the fake-quant reference does not model; tests/test_small_calls.py checks that mode)
_NHD = ((1, 576, 16, 128), (1, 576, 16, 128)) if KERNEL_DEV == "cuda" else ((1, 40, 3, 64), (1, 40, 3, 64))
KERNEL_CASES = SHAPES + [
    ("mask-bool-4d", (2, 3, 13, 32), (2, 3, 21, 32), {"mask": ((2, 1, 13, 21), "bool")}),
    ("mask-float-bcast", (2, 3, 13, 64), (2, 3, 21, 64), {"mask": ((1, 3, 1, 21), "float")}),
    ("mask-3d", (2, 13, 64), (2, 21, 64), {"mask": ((2, 1, 21), "bool")}),
    ("nhd-strided", *_NHD, {"nhd": True}),
]


def _fake_quant_sdpa(q, k, v, quant, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, kernel=False):
    """What ``qflash.sdpa(...)`` computes: the fake-quant reference on 4-D views (PyTorch's
    top-left causal; a K/V head broadcast by SDPA is one shared head); ``kernel``: as the portable
    kernel call on q's device does (``helpers.reference_args_of_call``), else as the device's default path."""
    from qflash.dropin import _to_4d
    from qflash.reference import fake_quant_attention

    q4, k4, v4, m4 = _to_4d(q, k, v, attn_mask)
    out = fake_quant_attention(q4, k4, v4, causal=is_causal, top_left=True, attn_mask=m4, scale=scale,
                               **reference_args_of_call(q4, k4, quant, kernel=kernel))
    return out.reshape(q.shape)


@pytest.mark.interpreter
@pytest.mark.parametrize("quant", ["none", "int8", "int8-fp8"])
@pytest.mark.parametrize("qs,ks,kw", [c[1:] for c in KERNEL_CASES], ids=[c[0] for c in KERNEL_CASES])
def test_kernel_semantics(gen, quant, qs, ks, kw):
    """qflash.sdpa through the portable Triton kernels (``backend="portable"``; the CPU interpreter
    without a GPU) against fp32 SDPA within the preset's budget, and against the fake-quant
    reference tightly (what catches a 1 % error in the kernel path)."""
    kw = dict(kw)
    q, k, v = (t.to(KERNEL_DEV).to(torch.bfloat16) for t in make(gen, qs, ks))
    if kw.pop("nhd", False):  # (B, S, H, D) buffers seen as (B, H, S, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if "mask" in kw:
        kw["attn_mask"] = make_mask(gen, *kw.pop("mask")).to(KERNEL_DEV)
        if kw["attn_mask"].is_floating_point():
            kw["attn_mask"] = kw["attn_mask"].to(torch.bfloat16)
    ref_kw = dict(kw)
    if ref_kw.get("attn_mask") is not None and ref_kw["attn_mask"].is_floating_point():
        ref_kw["attn_mask"] = ref_kw["attn_mask"].float()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **ref_kw)  # fp32 ground truth
    out = qflash.sdpa(q, k, v, quant=quant, fallback=False, backend="portable", **kw)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16 and out.device == q.device
    assert rel_l2(out, ref) < SDPA_BUDGET[quant]
    fq = _fake_quant_sdpa(q, k, v, quant, kernel=True, **kw)
    assert rel_l2(out, fq) < KERNEL_VS_FQ[quant]


# max over the cases on the interpreter: vs fp32 SDPA none 2.2e-3, int8 1.05e-2, int8-fp8 3.5e-2;
# vs the fake-quant none 1.7e-5, int8 8.5e-4, int8-fp8 4.7e-3 (fp8 P rounded per 64-key tile in the
# reference). The GPU keeps its earlier budgets (its tiles differ from the reference's; not re-measured).
if KERNEL_DEV == "cuda":
    SDPA_BUDGET = {"none": 0.01, "int8": 0.02, "int8-fp8": 0.05}
    KERNEL_VS_FQ = {"none": 1e-3, "int8": 5e-3, "int8-fp8": 2e-2}
else:
    SDPA_BUDGET = {"none": 3.5e-3, "int8": 1.6e-2, "int8-fp8": 5e-2}
    KERNEL_VS_FQ = {"none": 3e-5, "int8": 1.3e-3, "int8-fp8": 7e-3}


@pytest.mark.parametrize("quant", ["none", "int8", "int8-fp8", "int4", "fp8"])
def test_every_preset_through_sdpa(gen, quant):
    """Every preset reaches qflash.sdpa's result (the mutation check found int4 / fp8 never ran
    through the drop-in): equal to the fake-quant reference on this device's default path."""
    q, k, v = make(gen, (2, 3, 17, 32), (2, 3, 23, 32))
    out = qflash.sdpa(q, k, v, quant=quant, fallback=False, is_causal=True)
    fq = _fake_quant_sdpa(q, k, v, quant, is_causal=True)
    assert rel_l2(out, fq) < (1e-5 if KERNEL_DEV == "cpu" else 2e-2)  # CPU: the reference path, measured 0
