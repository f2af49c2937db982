"""Triton kernels against the reference: fake-quant (tight) and exact (the preset's budget).

Runs on CUDA when there is a GPU and through Triton's CPU interpreter otherwise (small shapes
there; the interpreter executes every program in Python). Outputs are poisoned with NaN before
each launch so an unwritten element fails the test.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from helpers import rel_l2

from qflash.config import Granularity, OperandQuant, Precision, resolve_quant
from qflash.kernels.common import triton_usable as kernels_usable
from qflash.reference import exact_attention, fake_quant_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not kernels_usable(torch.device(DEVICE))[0]:
    pytest.skip("Triton kernels cannot run here (no CUDA, interpreter off)", allow_module_level=True)

from qflash.kernels.portable.launch import attention_fwd, kernel_support, quantize_qkv, reference_args  # noqa: E402
from qflash.kernels.portable.tuning import KernelConfig  # noqa: E402
from qflash.quant import quantize  # noqa: E402

# Kernel vs fake-quant reference: the same math up to fp32 evaluation order, exp2 vs exp, and a
# rare rounding tie resolved differently (the interpreter evaluates some fp32 steps in fp64).
# FP8 P: exp2 in the kernel vs exp in the reference moves a few P values across an e4m3 rounding
# boundary (one step is 6 %). FP8 Q·K on Hopper also accumulates with ~22-bit partial sums
# (Triton's default for fp8 dots on sm_90), which the fake-quant reference does not model: the
# fp8 preset's lse differed by up to 1.6e-2 on an H100 (run 11 in docs/perf/NOTES.md). Those GPU
# runs compared against a reference tiled differently from the kernel (fixed since), so the GPU
# bounds here are not yet confirmed on a card. The exact-reference budgets bound the total error.
TIGHT = {"none": 2e-3, "int8": 3e-3, "int8-fp8": 1.2e-2, "int4": 3e-3, "fp8": 2e-2 if torch.cuda.is_available() else 3e-2}
# Kernel vs exact fp64 attention on N(0,1) inputs: the preset's error budget (issue 2's table).
BUDGET = {"none": 0.005, "int8": 0.02, "int8-fp8": 0.05, "int4": 0.22, "fp8": 0.07}
PRESETS = list(TIGHT)
# lse: fp8 Q·K — rounding ties the interpreter resolves in fp64 (one fp8 step), and on Hopper the
# FP8 MMA's reduced-precision accumulation (measured up to 1.6e-2)
LSE_TOL = {p: (3e-2 if p == "fp8" else 5e-3) for p in TIGHT}
SMALL_CFG = KernelConfig(32, 32, 4, 1)  # interpreter: small tiles keep programs cheap


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, layout, gen, amplitude=1.0):
    """Fresh N(0,1) inputs in the requested memory layout; returns HND views."""
    def one(H, S):
        shape = (B, H, S, D) if layout == "HND" else (B, S, H, D)
        x = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(amplitude).to(DEVICE, dtype)
        return x if layout == "HND" else x.transpose(1, 2)
    return one(Hq, Sq), one(Hkv, Sk), one(Hkv, Sk)


def run_kernel(q, k, v, cfg, *, layout="HND", kc=SMALL_CFG, **kw):
    """The two-launch path unless the test asks for ``fused_quant=True`` (its own test), unsplit
    unless it asks for ``split_keys`` (with FP8 P each split rounds P against its own running max,
    which the fake-quant reference does not model; tests/test_small_calls.py checks the split mode).

    ``kc=None`` lets the library pick its tuned config (``_picked`` tells the reference which).
    """
    kw.setdefault("fused_quant", False)
    kw.setdefault("split_keys", 0)
    B, Hq, Sq, D = q.shape
    if layout == "NHD":
        out = torch.full((B, Sq, Hq, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.full((B, Hq, Sq, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("nan"), device=q.device)
    o, l = attention_fwd(q, k, v, cfg, out=out, lse=lse, return_lse=True, kernel_config=kc, **kw)
    assert o.data_ptr() == out.data_ptr()
    return o, l


def _v_block(cfg) -> int:
    """Keys per V scale as the kernels tile them: the V block, or 128 when V has one scale per
    channel over all keys (the launcher repeats it per 128-key block)."""
    return cfg.v.granularity.size or 128


def _as_called(q, k, cfg) -> dict:
    """``check`` keywords for an automatic ``attention_fwd(q, k, v, cfg)`` call (the one-launch
    mode's K granularity, tiles and per-split statistics: ``launch.reference_args``)."""
    ref = reference_args(q, k, cfg)
    return {"cfg": ref["quant"], "block_n": ref["block_n"], "stat_block": ref["stat_block"]}


def check(o, l, q, k, v, preset, *, block_n, cfg=None, stat_block=None, **kw):
    """Kernel output against both references; tolerances are the preset's, ``cfg`` (default:
    the preset's) is what the kernel ran, ``stat_block`` its K/V statistics blocks."""
    cfg = resolve_quant(preset) if cfg is None else cfg
    assert not torch.isnan(o).any(), "unwritten (NaN-poisoned) or NaN output"
    # references run in plain PyTorch on the kernels' device (fp64 on the GPU is fast enough)
    ref, ref_lse = fake_quant_attention(q, k, v, cfg, return_lse=True, block_n=block_n, stat_block=stat_block, **kw)
    exact = exact_attention(q, k, v, **kw)
    if exact.abs().sum() == 0:
        assert o.abs().sum() == 0
        return
    assert rel_l2(o, ref) <= TIGHT[preset], f"kernel vs fake-quant {rel_l2(o, ref):.2e}"
    assert rel_l2(o, exact) <= BUDGET[preset], f"kernel vs exact {rel_l2(o, exact):.2e}"
    assert torch.equal(torch.isinf(l), torch.isinf(ref_lse)), "fully masked rows differ"
    fin = torch.isfinite(ref_lse)
    assert not torch.isnan(l).any()
    if fin.any():
        err = (l[fin] - ref_lse[fin]).abs().max().item()
        assert err <= LSE_TOL[preset], f"lse differs by {err:.2e}"


# (B, Hq, Hkv, Sq, Sk, D): awkward lengths, Sq != Sk, GQA, MQA, D 64 / 96 / 128
SHAPES_INTERP = [
    pytest.param((1, 2, 2, 63, 63, 64), id="S63-D64"),
    pytest.param((2, 2, 1, 40, 75, 64), id="Sq40-Sk75-MQA"),
    pytest.param((1, 4, 2, 1, 33, 128), id="Sq1-Sk33-GQA-D128"),
    pytest.param((1, 2, 2, 50, 20, 96), id="Sq50-Sk20-D96"),
]
SHAPES_GPU = [
    pytest.param((1, 2, 2, 1, 1, 64), id="S1"),
    pytest.param((2, 4, 4, 1000, 1000, 64), id="S1000-D64"),
    pytest.param((1, 8, 2, 777, 4097, 128), id="Sq777-Sk4097-GQA"),
    pytest.param((1, 4, 1, 4097, 333, 128), id="Sq4097-Sk333-MQA"),
    pytest.param((1, 2, 2, 300, 300, 96), id="S300-D96"),
    pytest.param((1, 2, 2, 256, 256, 256), id="S256-D256"),
]
SHAPES = SHAPES_GPU if CUDA else SHAPES_INTERP


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_kernel_matches_reference(preset, shape, causal, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((preset, shape, causal, layout)).encode()))
    B, Hq, Hkv, Sq, Sk, D = shape
    dtype = torch.bfloat16 if (Sq * Sk) % 2 else torch.float16
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, layout, gen)
    cfg = resolve_quant(preset)
    kc = SMALL_CFG if not CUDA else None  # on the GPU: the tuned config the library picks
    o, l = run_kernel(q, k, v, cfg, layout=layout, kc=kc, causal=causal)
    assert o.dtype == q.dtype
    block_n = (kc or _picked(q, k, cfg)).block_n
    if cfg.quantizes_pv:
        block_n = min(block_n, _v_block(cfg))
    check(o, l, q, k, v, preset, block_n=block_n, causal=causal)
    if CUDA:  # the library's own choice (split keys where the grid is small) within the preset's budget
        o_pol, _ = run_kernel(q, k, v, cfg, layout=layout, kc=None, causal=causal, split_keys=None)
        assert rel_l2(o_pol, exact_attention(q, k, v, causal=causal)) <= BUDGET[preset]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp32_inputs_keep_fp32_accuracy(shape, causal):
    """fp32 inputs, preset none: O and lse as accurate as fp32 arithmetic (relL2 ~1e-7), not
    TF32 (~1e-3, what Triton's dots default to on a GPU; run 20's gradient failures)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("fp32", shape, causal)).encode()))
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float32, "NHD", gen)
    o, l = run_kernel(q, k, v, resolve_quant("none"), layout="NHD", kc=SMALL_CFG if not CUDA else None,
                      causal=causal)
    ref, ref_lse = exact_attention(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
    assert o.dtype == torch.float32
    assert rel_l2(o, ref) <= 1e-5, f"O relL2 {rel_l2(o, ref):.2e}"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(l))
    if fin.any():
        assert (l[fin].double() - ref_lse[fin]).abs().max().item() <= 1e-5


def _picked(q, k, cfg):
    from qflash.kernels.portable.tuning import pick_config
    return pick_config(q.device, q.shape[-1], cfg.quantizes_pv, q.shape[2], k.shape[2], cfg.quantizes_qk)


@pytest.mark.parametrize("preset", ["none", "int8", "int8-fp8"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", ["B1QK", "1HQK", "QK", "B11K"])
def test_kernel_masks(preset, mask_kind, mask_shape):
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, Sq, Sk, D = (2, 2, 1, 37, 70, 64)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float16, "HND", gen)
    shape = {"B1QK": (B, 1, Sq, Sk), "1HQK": (1, Hq, Sq, Sk), "QK": (Sq, Sk), "B11K": (B, 1, 1, Sk)}[mask_shape]
    if mask_kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.3
        if len(shape) == 4 and shape[2] == Sq:
            mask[..., 3, :] = False  # a fully masked row must give zeros, not NaN
    else:
        mask = torch.randn(shape, generator=gen) * 2
        mask[..., 5] = float("-inf")
    mask = mask.to(DEVICE)
    cfg = resolve_quant(preset)
    o, l = run_kernel(q, k, v, cfg, kc=SMALL_CFG, attn_mask=mask, causal=False)
    check(o, l, q, k, v, preset, block_n=SMALL_CFG.block_n, attn_mask=mask)
    if mask_kind == "bool" and len(shape) == 4 and shape[2] == Sq:
        assert (o[:, :, 3] == 0).all()
        assert torch.isinf(l[:, :, 3]).all()


@pytest.mark.parametrize("preset", ["int8", "int8-fp8"])
def test_empty_and_fully_masked(preset):
    gen = torch.Generator().manual_seed(3)
    cfg = resolve_quant(preset)
    q, k, v = make_qkv(1, 2, 2, 5, 0, 64, torch.float16, "HND", gen)
    o, l = run_kernel(q, k, v, cfg)
    assert (o == 0).all() and torch.isinf(l).all() and (l < 0).all()
    # causal with Sq > Sk: the first Sq - Sk rows see no key
    q, k, v = make_qkv(1, 2, 2, 40, 8, 64, torch.float16, "HND", gen)
    o, l = run_kernel(q, k, v, cfg, causal=True)
    assert (o[:, :, :32] == 0).all() and not torch.isnan(o).any()
    check(o, l, q, k, v, preset, block_n=SMALL_CFG.block_n, causal=True)


LARGE_INPUT_BUDGET = {"none": 1e-6, "int8": 0.2, "int8-fp8": 0.23, "int4": 0.88, "fp8": 0.44}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_large_inputs_stay_finite(preset, dtype):
    """|x| up to 1e4: no NaN or Inf, the kernel matches its fake-quant reference, and the error vs
    the exact result stays where it was measured."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 2, 2, 48, 48, 64, dtype, "HND", gen, amplitude=1e4 / 4)
    q, k, v = (t.clamp(-1e4, 1e4) for t in (q, k, v))
    cfg = resolve_quant(preset)
    o, l = run_kernel(q, k, v, cfg)
    assert torch.isfinite(o).all() and torch.isfinite(l).all()
    exact = exact_attention(q, k, v)
    block_n = min(SMALL_CFG.block_n, _v_block(cfg)) if cfg.quantizes_pv else SMALL_CFG.block_n
    ref = fake_quant_attention(q, k, v, cfg, block_n=block_n)
    # Kernel vs fake-quant, measured on the CPU interpreter (fp16 and bf16 alike): 0 for none, int8
    # and int4; 5.75e-2 for the FP8 P·V presets (P's x448 scale rounds at logits ~1e7: issue 14 item 3).
    # On a GPU (not re-measured there) the non-FP8-P presets get TIGHT's bound instead of 1e-6.
    tol = 0.087 if cfg.quantizes_pv else (TIGHT[preset] if CUDA else 1e-6)
    assert rel_l2(o, ref) <= tol, f"kernel vs fake-quant {rel_l2(o, ref):.2e}"
    # Scores ~1e7: the softmax is nearly one-hot and quantisation may pick a different near-tie
    # (issue 14 item 5). ~1.5x the measured relL2 vs exact (max of fp16/bf16): none 0, int8 0.131,
    # int8-fp8 0.154, int4 0.586, fp8 0.289.
    assert rel_l2(o, exact) <= LARGE_INPUT_BUDGET[preset], f"kernel vs exact {rel_l2(o, exact):.2e}"


def test_outlier_k_smoothing():
    """A strong per-channel offset in K: smoothing keeps int8-fp8 accurate (issue 3 target)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 2, 2, 64, 96, 64, torch.float16, "HND", gen)
    k = k + 5 * torch.randn(1, 2, 1, 64, generator=gen).to(k)
    o, _ = run_kernel(q, k, v, resolve_quant("int8-fp8"))
    exact = exact_attention(q, k, v)
    cos = torch.nn.functional.cosine_similarity(o.double().flatten(), exact.double().flatten(), dim=0)
    assert cos >= 0.999


@pytest.mark.parametrize("preset", ["int8", "int4", "fp8", "int8-fp8"])
def test_fused_quantiser_matches_torch(preset):
    gen = torch.Generator().manual_seed(13)
    cfg = resolve_quant(preset)
    q, k, v = make_qkv(2, 4, 2, 70, 130, 64, torch.float16, "NHD", gen)
    c = quantize_qkv(q, k, v, cfg)
    qf, kf = q.float().cpu(), k.float().cpu()
    if cfg.smooth_q:
        from qflash.quant import block_mean
        qm = block_mean(qf, cfg.q_mean_block)
        assert torch.allclose(c.q_mean.cpu(), qm, atol=1e-5)
        qf = qf - qm.repeat_interleave(cfg.q_mean_block, dim=-2)[..., :qf.shape[2], :]
    if cfg.smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    for got, x, spec, scale in ((c.q, qf, cfg.q, c.q_scale), (c.k, kf, cfg.k, c.k_scale)):
        want = quantize(x, spec)
        assert torch.allclose(scale.cpu(), want.scale, rtol=1e-6)
        if spec.precision is Precision.INT4:
            from qflash.quant import unpack_int4
            g, w = unpack_int4(got.cpu()).float(), unpack_int4(want.data).float()
        else:
            g, w = got.cpu().float(), want.data.float()
        mismatch = (g != w).float().mean().item()
        assert mismatch <= 2e-3, f"{mismatch:.2%} of codes differ"  # only rounding ties may differ
        assert (g - w).abs().max().item() <= (1 if spec.precision is not Precision.FP8_E4M3 else 32)
    if cfg.quantizes_pv:
        Sk = v.shape[2]
        want = quantize(v.float().cpu(), cfg.v)
        got = c.v_t.cpu()[..., :Sk].transpose(-1, -2).float()
        assert (got != want.data.float()).float().mean().item() <= 2e-3
        assert torch.allclose(c.v_scale.cpu()[..., : want.scale.shape[2], :], want.scale, rtol=1e-6)
        assert (c.v_t.cpu()[..., Sk:].float() == 0).all(), "V padding must be zeros"


@pytest.mark.parametrize("case", ["gqa-causal", "mask-d80"])
def test_int4_unpacked_codes_match_packed(case, monkeypatch):
    """INT4 codes one per byte (``pack_int4=False``, the sm_90 default of the separate quantiser)
    hold exactly the packed codes' values, and the attention kernel, reading them as INT8, gives
    bit-identical output and lse to the packed path; ``attention_fwd`` follows
    ``tuning.int4_packed_codes``. Outputs poisoned; GQA + causal, and a boolean mask at D = 80."""
    from qflash.kernels.portable import launch
    from qflash.quant import unpack_int4

    cfg = resolve_quant("int4")
    gen = torch.Generator().manual_seed(23)
    D = 80 if case == "mask-d80" else 64
    q, k, v = make_qkv(1, 4, 2 if case == "gqa-causal" else 4, 45, 70, D, torch.bfloat16, "HND", gen)
    causal = case == "gqa-causal"
    mask = (torch.rand(1, 1, 45, 70, generator=gen) > 0.3).to(DEVICE) if case == "mask-d80" else None
    packed = quantize_qkv(q, k, v, cfg, pack_int4=True)
    flat = quantize_qkv(q, k, v, cfg, pack_int4=False)
    assert packed.int4_packed and not flat.int4_packed
    assert flat.q.dtype == torch.int8 and flat.q.shape == q.shape and flat.k.shape == k.shape
    assert torch.equal(flat.q.cpu(), unpack_int4(packed.q.cpu()))
    assert torch.equal(flat.k.cpu(), unpack_int4(packed.k.cpu()))
    assert int(flat.q.abs().max()) == 7
    outs = {}
    for name, codes in (("packed", packed), ("flat", flat)):
        out = torch.full_like(q, float("nan"))
        o, lse = attention_fwd(q, k, v, cfg, causal=causal, attn_mask=mask, return_lse=True, out=out,
                               codes=codes, kernel_config=SMALL_CFG, fused_quant=False, split_keys=0)
        outs[name] = (o.clone(), lse.clone())
    assert not outs["flat"][0].isnan().any()
    assert torch.equal(outs["flat"][0], outs["packed"][0]) and torch.equal(outs["flat"][1], outs["packed"][1])
    # the launcher's own quantiser follows the policy: unpacked there, the same bits again
    monkeypatch.setattr(launch, "int4_packed_codes", lambda device: False)
    o, lse = attention_fwd(q, k, v, cfg, causal=causal, attn_mask=mask, return_lse=True,
                           kernel_config=SMALL_CFG, fused_quant=False, split_keys=0)
    assert torch.equal(o, outs["packed"][0]) and torch.equal(lse, outs["packed"][1])
    fq = fake_quant_attention(q, k, v, causal=causal, attn_mask=mask, **reference_args(
        q, k, cfg, kernel_config=SMALL_CFG, fused_quant=False, split_keys=0))
    assert rel_l2(o, fq) < TIGHT["int4"]



def test_kernel_support_rejects_what_it_cannot_do():
    cfg = resolve_quant("int8")
    bad = cfg.with_(q=OperandQuant(Precision.INT8, Granularity.group(32)), k=OperandQuant(Precision.INT8, Granularity.group(32)))
    ok, why = kernel_support(bad, 64)
    assert not ok and "granularity" in why
    with pytest.raises(NotImplementedError, match="granularity"):
        attention_fwd(*(torch.randn(1, 1, 8, 64, device=DEVICE) for _ in range(3)), bad)
    ok, why = kernel_support(cfg.with_(q=OperandQuant(Precision.INT8, strategy="asymmetric"),
                                       k=OperandQuant(Precision.INT8, strategy="asymmetric")), 64)
    assert not ok and "symmetric" in why
    assert kernel_support(resolve_quant("int8-fp8"), 128)[0]


@pytest.mark.parametrize("k_block", [32, 64, 128], ids=lambda b: f"kblock{b}")
@pytest.mark.parametrize("base", ["int8", "int8-fp8", "fp8"])
def test_block_scales(base, k_block):
    """Q and K scaled per block of tokens (the per-tile scalar path when the block covers a tile)."""
    gen = torch.Generator().manual_seed(17)
    cfg0 = resolve_quant(base)
    cfg = cfg0.with_(q=OperandQuant(cfg0.q.precision, Granularity.block(64)),
                     k=OperandQuant(cfg0.k.precision, Granularity.block(k_block)))
    q, k, v = make_qkv(1, 2, 2, 70, 150, 64, torch.float16, "HND", gen)
    o, l = run_kernel(q, k, v, cfg, kc=SMALL_CFG, causal=True)
    ref, ref_lse = fake_quant_attention(q, k, v, cfg, return_lse=True, block_n=SMALL_CFG.block_n, causal=True)
    assert not torch.isnan(o).any()
    assert rel_l2(o, ref) <= TIGHT[base]
    assert rel_l2(o, exact_attention(q, k, v, causal=True)) <= BUDGET[base]


@pytest.mark.parametrize("preset", ["int8", "int8-fp8", "int4", "fp8"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 64, 64, 64), (1, 2, 1, 50, 200, 64), (2, 1, 1, 130, 90, 128)],
                         ids=["S64", "Sq50-Sk200-MQA", "Sq130-Sk90-D128"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_quant_mode(preset, shape, causal):
    """One-launch mode (the kernel quantises its own tiles) against the same references."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((preset, shape, causal)).encode()))
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float16, "NHD", gen)
    cfg = resolve_quant(preset)
    kc = KernelConfig(64, 64, 4, 1)
    o, l = run_kernel(q, k, v, cfg, kc=kc, causal=causal, fused_quant=True)
    # the one-launch mode quantises K per token where the preset scales it per 128-key block
    # (launch.one_launch_quant), with the given 64-key tiles (FP8 P rounds per tile)
    ref = reference_args(q, k, cfg, kernel_config=kc, fused_quant=True)
    assert ref["block_n"] == 64 and ref["quant"].k.granularity == Granularity.token()
    check(o, l, q, k, v, preset, block_n=64, cfg=ref["quant"], causal=causal)
    if cfg.quantizes_pv:  # and per-block V scales in the one-launch mode (V block 128 = the tile)
        cfg = dataclasses.replace(cfg, v=OperandQuant(Precision.FP8_E4M3, Granularity.channel(128)))
        o, l = run_kernel(q, k, v, cfg, kc=kc, causal=causal, fused_quant=True)
        ref = reference_args(q, k, cfg, kernel_config=kc, fused_quant=True)
        assert ref["block_n"] == 128
        check(o, l, q, k, v, preset, block_n=128, cfg=ref["quant"], causal=causal)


def test_fused_quant_refuses_what_it_cannot_tile():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.float16, "HND", torch.Generator().manual_seed(0))
    # V scaled per 256 keys: a V block must be one key tile in the one-launch mode, tiles hold <= 128
    cfg = dataclasses.replace(resolve_quant("int8-fp8"), v=OperandQuant(Precision.FP8_E4M3, Granularity.channel(256)))
    with pytest.raises(ValueError, match="fused_quant"):
        attention_fwd(q, k, v, cfg, fused_quant=True)


VARIANT_SHAPES = [(1, 4, 2, 130, 200, 64), (2, 2, 1, 96, 64, 128)] if not CUDA else [
    (1, 8, 2, 777, 4097, 128), (2, 4, 4, 1000, 1000, 64)]


@pytest.mark.parametrize("preset", ["none", "int8-fp8", "fp8"])
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=["GQA", "MQA"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("variant", [dict(tma=True), dict(rotate=True), dict(tma=True, rotate=True)],
                         ids=["tma", "rotate", "tma+rotate"])
def test_kernel_variants(preset, shape, causal, variant):
    """TMA descriptor loads and the rotated (Q·Kᵀ issued one tile ahead) loop: same references."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((preset, shape, causal, variant)).encode()))
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.bfloat16, "HND", gen)
    cfg = resolve_quant(preset)
    # on the GPU: the tuned long-sequence tiles (bf16 K/V tiles need 2 stages to fit shared memory)
    base = KernelConfig(32, 64, 4, 1) if not CUDA else KernelConfig(64, 128, 4, 2 if preset == "none" else 3)
    kc = KernelConfig(base.block_m, base.block_n, base.num_warps, base.num_stages, **variant)
    o, l = run_kernel(q, k, v, cfg, kc=kc, causal=causal)
    check(o, l, q, k, v, preset, block_n=kc.block_n, causal=causal)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fast_launcher_relaunch():
    """The second launch with equal shapes takes the cached fast path: same result, fresh outputs."""
    from qflash.kernels.portable import launch

    gen = torch.Generator().manual_seed(5)
    cfg = resolve_quant("int8-fp8")
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.bfloat16, "HND", gen)
    first, _ = run_kernel(q, k, v, cfg, kc=None, fused_quant=None)
    hits_before = len(launch._ATTN_FWD._cache)
    second, _ = run_kernel(q, k, v, cfg, kc=None, fused_quant=None)
    assert len(launch._ATTN_FWD._cache) == hits_before >= 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    q2, k2, v2 = make_qkv(1, 2, 2, 64, 64, 64, torch.bfloat16, "HND", gen)  # new data, same shapes
    third, l3 = run_kernel(q2, k2, v2, cfg, kc=None, fused_quant=None)
    check(third, l3, q2, k2, v2, "int8-fp8", **_as_called(q2, k2, cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["none", "int8-fp8", "fp8"])
@pytest.mark.parametrize("layout", ["HND", "NHD", "strided"])
def test_small_call_plans(preset, layout):
    """Repeated small calls replay a stored plan (the one-launch path): fresh data, right answers,
    and inputs the launcher had to copy (channel stride != 1) are never replayed from a plan."""
    from qflash.kernels.portable import launch

    cfg = resolve_quant(preset)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((preset, layout)).encode()))
    for i in range(3):
        if layout == "strided":  # channel dim not contiguous: the launcher copies
            q, k, v = (torch.randn(1, 2, 64, 128, generator=gen).to(DEVICE, torch.bfloat16)[..., ::2]
                       for _ in range(3))
        else:
            q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.bfloat16, layout, gen)
        before = len(launch._PLANS)
        o, l = launch.attention_fwd(q, k, v, cfg, return_lse=True, out_layout=layout if layout == "NHD" else "HND")
        if i > 0 and layout != "strided":
            assert len(launch._PLANS) == before  # replayed, nothing new stored
        check(o, l, q, k, v, preset, **_as_called(q, k, cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["none", "int8-fp8"])
def test_plan_not_shared_between_aliased_and_distinct_inputs(preset):
    """attention(x, x, x) stores a plan whose pointers all map to q; a later attention(q, k, v) of
    the same shape must not replay it (found in review: it computed attention(q, q, q))."""
    from qflash.kernels.portable import launch

    cfg = resolve_quant(preset)
    gen = torch.Generator().manual_seed(11)
    x, _, _ = make_qkv(1, 2, 2, 64, 64, 64, torch.bfloat16, "HND", gen)
    launch.attention_fwd(x, x, x, cfg)
    launch.attention_fwd(x, x, x, cfg)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, torch.bfloat16, "HND", gen)
    o, l = launch.attention_fwd(q, k, v, cfg, return_lse=True)
    check(o, l, q, k, v, preset, **_as_called(q, k, cfg))


@pytest.mark.parametrize("preset", ["none", "int8", "int8-fp8"])
def test_negative_scale(preset):
    """softmax(s·QKᵀ) with s < 0 (the kernel's FMA-form running max needs a positive multiplier;
    the launcher negates Q instead). Found in review: int8-fp8 gave relL2 1.0."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(1, 2, 2, 40, 70, 64, torch.bfloat16, "HND", gen)
    cfg = resolve_quant(preset)
    o, l = run_kernel(q, k, v, cfg, scale=-0.1, causal=True)
    exact = exact_attention(q, k, v, scale=-0.1, causal=True)
    assert rel_l2(o, exact) <= BUDGET[preset]


def test_empty_batch():
    q = torch.zeros(0, 2, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    out, lse = attention_fwd(q, q, q, resolve_quant("int8-fp8"), return_lse=True,
                             kernel_config=KernelConfig(64, 128, 4, 3, tma=True, rotate=True))
    assert out.shape == q.shape and lse.shape == (0, 2, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["int8", "int8-fp8"])
def test_flux_shape(preset):
    """The Flux 1024px shape with the tuned config the library picks, against both references."""
    gen = torch.Generator().manual_seed(23)
    q, k, v = make_qkv(1, 24, 24, 4608, 4608, 128, torch.bfloat16, "HND", gen)
    cfg = resolve_quant(preset)
    o, l = run_kernel(q, k, v, cfg, kc=None)
    block_n = min(_picked(q, k, cfg).block_n, _v_block(cfg)) if cfg.quantizes_pv else _picked(q, k, cfg).block_n
    check(o, l, q, k, v, preset, block_n=block_n)


def test_auto_backend_falls_back_for_configs_without_kernels():
    """backend="auto" runs an asymmetric config on the reference path instead of raising."""
    from qflash.kernels import dispatch
    from qflash.spec import AttnSpec

    gen = torch.Generator().manual_seed(29)
    cfg = resolve_quant("int8").with_(q=OperandQuant(Precision.INT8, strategy="asymmetric"),
                                      k=OperandQuant(Precision.INT8, strategy="asymmetric"))
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64, torch.float16, "HND", gen)
    out, _ = dispatch.forward(AttnSpec.build(cfg), q, k, v, None)
    assert rel_l2(out, fake_quant_attention(q, k, v, cfg)) <= 1e-3
    with pytest.raises(NotImplementedError, match="symmetric"):
        dispatch.forward(AttnSpec.build(cfg, backend="triton"), q, k, v, None)


def test_fp32_tiles_fit_shared_memory():
    """fp32 doubles every tile: the backward drops to 2 stages at D128 and 1 at D256 (296 KB of
    shared memory with the 3-stage bf16 tiles; sm_90 has 227 KB)."""
    from qflash.kernels.portable.bwd_launch import pick_bwd_config

    cuda = torch.device("cuda", 0)
    bf16, fp32 = pick_bwd_config(cuda, 128, torch.bfloat16), pick_bwd_config(cuda, 128, torch.float32)
    assert (fp32.num_stages1, fp32.num_stages2) == (2, 2) and (fp32.block_m1, fp32.block_n1) == (bf16.block_m1, bf16.block_n1)
    assert pick_bwd_config(cuda, 256, torch.float32).num_stages1 == 1
    assert pick_bwd_config(cuda, 64, torch.float32) == pick_bwd_config(cuda, 64, torch.bfloat16)


def test_config_keys_separate_exact_from_quantised():
    """The tuning key tells the none preset (exact) from 8-bit Q·K with float P·V and FP8 P·V;
    'exact' falls back to the 'float' row where a table has none of its own."""
    from qflash.kernels.portable import tuning as configs

    assert configs.config_key(128, False, 4608, 4608, qk_quant=False) == (128, "exact", "long")
    assert configs.config_key(128, False, 4608, 4608) == (128, "float", "long")
    assert configs.config_key(64, True, 512, 512) == (64, "fp8", "short")
    sm90 = configs.TABLES["sm90"]
    assert (64, "exact", "long") not in sm90 and (64, "float", "long") in sm90  # the fallback case exists
