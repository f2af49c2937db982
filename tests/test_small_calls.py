"""Small calls (issue 15): the split-key mode and its merge, the quantiser's in-launch token
statistics, and recorded plans (repeated calls replayed as their launches).

The split-key kernels run on the CPU interpreter at small shapes (``split_keys`` forced: the
policy only splits on CUDA) against the exact fp64 reference, the fake-quant reference and the
unsplit kernel; plans and CUDA graphs need a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import qflash
from qflash import reference
from qflash.config import Granularity, OperandQuant, Precision
from qflash.kernels.portable import launch

from helpers import rel_l2

pytestmark = pytest.mark.interpreter

if not torch.cuda.is_available():
    import triton_interpreter_shim

    triton_interpreter_shim.apply()

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# relL2 of the split kernel vs exact fp64 attention, measured on the interpreter over these
# cases (bf16 inputs): none 2.3e-3, int8 9.4e-3, int8-fp8 3.9e-2, fp8 5.3e-2. Bounds ~1.3x.
EXACT_BOUND = {"none": 3.5e-3, "int8": 0.013, "int8-fp8": 0.05, "fp8": 0.07}
# vs the unsplit kernel: bf16 output rounding (none/int8, measured <= 2.3e-3); with FP8 P each
# split rounds P against its own running max (measured <= 2.7e-2)
UNSPLIT_BOUND = {"none": 3.5e-3, "int8": 3.5e-3, "int8-fp8": 0.04, "fp8": 0.04}

# lse vs exact (the scores' quantisation error; rows that see one key carry it whole), measured:
# none 1.2e-5, int8 1.1e-2, int8-fp8 1.5e-2, fp8 4.5e-2
LSE_BOUND = {"none": 1e-4, "int8": 0.02, "int8-fp8": 0.02, "fp8": 0.06}

CASES = [
    # B, Hq, Hkv, Sq, Sk, D, causal, mask
    (1, 2, 1, 1, 300, 64, "none", None),          # one query over many keys, GQA, a partial last tile
    (1, 1, 1, 40, 384, 64, "top_left", None),      # rows see <= 40 keys: whole splits are empty
    (1, 2, 1, 17, 256, 64, "bottom_right", "bool"),  # causal + mask, a fully masked row
]
# every preset on the first case, the float and the FP8-P·V paths on all (CI time: ~9 s a case)
PRESET_CASES = [(p, CASES[0]) for p in ("none", "int8", "int8-fp8", "fp8")] + \
    [(p, c) for c in CASES[1:] for p in ("none", "int8-fp8")]


def _inputs(B, Hq, Hkv, Sq, Sk, D, mask, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(torch.bfloat16).to(DEV)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(torch.bfloat16).to(DEV)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(torch.bfloat16).to(DEV)
    m = None
    if mask == "bool":
        m = (torch.rand(B, 1, Sq, Sk, generator=g) > 0.3).to(DEV)
        m[..., -1, :] = False  # a fully masked row: zeros and lse -inf
    return q, k, v, m


@pytest.mark.parametrize("preset,case", PRESET_CASES,
                         ids=[f"{p}-{c[3]}:{c[4]}-{c[6]}-{c[7]}" for p, c in PRESET_CASES])
def test_split_keys_matches_references(preset, case):
    B, Hq, Hkv, Sq, Sk, D, causal, mask = case
    cfg = qflash.resolve_quant(preset)
    q, k, v, m = _inputs(B, Hq, Hkv, Sq, Sk, D, mask, seed=Sk + Sq)
    kw = dict(causal=causal != "none", top_left=causal == "top_left", attn_mask=m, return_lse=True)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written by the merge
    lse = torch.full(q.shape[:3], float("nan"), device=DEV)
    o, l = launch.attention_fwd(q, k, v, cfg, out=out, lse=lse, fused_quant=False, split_keys=128, **kw)
    assert o.data_ptr() == out.data_ptr()
    o_ref, l_ref = reference.exact_attention(q, k, v, **kw)
    assert not o.isnan().any() and not l.isnan().any()
    empty = l_ref == float("-inf")
    assert torch.equal(l == float("-inf"), empty)  # fully masked rows: lse -inf ...
    assert (o[empty] == 0).all()  # ... and zeros
    assert rel_l2(o, o_ref) < EXACT_BOUND[preset]
    assert (l[~empty] - l_ref[~empty]).abs().max().item() < LSE_BOUND[preset]  # log of the merged sums
    o_unsplit, l_unsplit = launch.attention_fwd(q, k, v, cfg, fused_quant=False, **kw)
    assert rel_l2(o, o_unsplit) < UNSPLIT_BOUND[preset]
    assert (l[~empty] - l_unsplit[~empty]).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", ["int8", "int8-fp8"])
def test_split_keys_fake_quant(preset):
    """The split kernel against the fake-quant reference (the quantisation the kernel claims)."""
    cfg = qflash.resolve_quant(preset)
    q, k, v, _ = _inputs(1, 1, 1, 8, 384, 64, None, seed=3)
    o, _ = launch.attention_fwd(q, k, v, cfg, fused_quant=False, split_keys=128)
    o_fq = reference.fake_quant_attention(q, k, v, cfg)
    # measured 2.4e-3 (int8: bf16 rounding of the merge) and 2.2e-2 (int8-fp8: P rounded per split)
    assert rel_l2(o, o_fq) < {"int8": 3.5e-3, "int8-fp8": 0.03}[preset]


# The one-launch mode split by keys: each split takes its K mean (and V's channel scales) over its
# own keys and hands its q·mean shift to the merge through its lse. Cases: GQA with a partial last
# split, causal (bottom-right: whole splits hidden from the first rows) + a boolean mask with a
# fully masked row, a custom config with V smoothing (per-split V means).
FUSED_SPLIT_CASES = [
    # preset, (B, Hq, Hkv, Sq, Sk, D), causal, mask
    ("int8", (1, 2, 1, 3, 300, 64), "none", None),
    ("int8-fp8", (1, 2, 1, 3, 300, 64), "none", None),
    ("fp8", (1, 1, 1, 20, 256, 64), "bottom_right", "bool"),
    ("int4", (1, 2, 2, 9, 384, 32), "bottom_right", None),
    ("int8-fp8+smooth_v", (1, 1, 1, 5, 256, 64), "none", None),
]
# relL2 vs the fake-quant reference with per-split statistics, measured on the interpreter (the H200
# within these bounds, session 9): int8
# 1.1e-3, int8-fp8 3.2e-3, fp8 5.3e-3, int4 9.5e-4 (vs whole-sequence statistics: 6.3e-3, 1.8e-2,
# 3.8e-2, 9.4e-2), int8-fp8 with smoothed V 5.5e-3 (2.4e-2); the lse within 1e-6. Bounds ~1.5x.
FUSED_SPLIT_BOUND = {"int8": 1.6e-3, "int8-fp8": 5e-3, "fp8": 8e-3, "int4": 1.5e-3, "int8-fp8+smooth_v": 8e-3}


@pytest.mark.parametrize("preset,shape,causal,mask", FUSED_SPLIT_CASES, ids=[c[0] for c in FUSED_SPLIT_CASES])
def test_split_keys_fused_quant_mode(preset, shape, causal, mask):
    """The one-launch mode (quantisation inside the attention kernel) split by keys, against the
    fake-quant reference with per-split statistics (``stat_block``) and the exact one; output and
    lse poisoned before the kernel writes them."""
    B, Hq, Hkv, Sq, Sk, D = shape
    name = preset.split("+")[0]
    cfg = qflash.resolve_quant(name)
    if preset.endswith("smooth_v"):  # (V scales per 128 keys: channel(0) V is not smoothed)
        cfg = cfg.with_(v=OperandQuant(Precision.FP8_E4M3, Granularity.channel(128)), smooth_v=True)
    q, k, v, m = _inputs(B, Hq, Hkv, Sq, Sk, D, mask, seed=Sk + D)
    # K and V drift from split to split (channel offsets): each split's own mean is what the
    # merge must put back, and it differs between splits
    channels = torch.randn(D, generator=torch.Generator().manual_seed(1)).to(DEV)
    drift = torch.linspace(-1.5, 1.5, Sk, device=DEV)[:, None] * channels
    k = (k.float() + drift).to(k.dtype)
    v = (v.float() + 0.5 * drift).to(v.dtype)
    kw = {"causal": causal != "none", "top_left": causal == "top_left", "attn_mask": m}
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=DEV)
    o, l = launch.attention_fwd(q, k, v, cfg, out=out, lse=lse, return_lse=True, fused_quant=True, split_keys=128, **kw)
    ref = launch.reference_args(q, k, cfg, fused_quant=True, split_keys=128)
    assert ref["stat_block"] == 128
    o_fq, l_fq = reference.fake_quant_attention(q, k, v, return_lse=True, **ref, **kw)
    o_ex, l_ex = reference.exact_attention(q, k, v, return_lse=True, **kw)
    empty = l_ex == float("-inf")
    assert torch.equal(l == float("-inf"), empty) and (o[empty] == 0).all()
    assert not o.isnan().any() and not l.isnan().any()
    assert rel_l2(o, o_fq) < FUSED_SPLIT_BOUND[preset]
    # (on the GPU, measured 6e-5: torch's CUDA mean rounds differently, a rare code moves one step)
    assert (l[~empty] - l_fq[~empty]).abs().max().item() < 2e-4
    assert rel_l2(o, o_ex) < {"int4": 0.22}.get(name, EXACT_BOUND.get(name, 0.02))
    assert (l[~empty] - l_ex[~empty]).abs().max().item() < {"int4": 0.3}.get(name, LSE_BOUND.get(name, 0.02))
    # without a returned lse the splits still weigh each other by their corrected lse
    o_only, _ = launch.attention_fwd(q, k, v, cfg, fused_quant=True, split_keys=128, **kw)
    assert rel_l2(o_only, o) < 1e-6


def test_fake_quant_stat_block_reference():
    """The reference's per-block statistics keep attention what it is (each block's q·mean shift
    goes back into its scores: int8 stays within its quantisation error of exact attention, lse
    included), and they are not the whole-sequence statistics."""
    q, k, v, _ = _inputs(1, 2, 1, 7, 300, 64, None, seed=9)
    k = k + torch.arange(300, device=DEV)[:, None] / 100.0  # drifting keys: block means differ
    o_blk, l_blk = reference.fake_quant_attention(q, k, v, "int8", return_lse=True, stat_block=128)
    o_all, _ = reference.fake_quant_attention(q, k, v, "int8", return_lse=True)
    o_ex, l_ex = reference.exact_attention(q, k, v, return_lse=True)
    assert rel_l2(o_blk, o_ex) < EXACT_BOUND["int8"] and (l_blk - l_ex).abs().max() < LSE_BOUND["int8"]
    assert not torch.equal(o_blk, o_all)


@pytest.mark.parametrize("preset,fused", [("none", False), ("int8", False), ("int8-fp8", True)])
def test_split_keys_finfo_min_padding_row(preset, fused):
    """A row under a Hugging Face padding mask (finfo.min on every key) is the mean of V over all
    keys, as in SDPA, when the keys are split unevenly (128 + 128 + 44): the merge weighs such
    splits by their key counts (before: equal weights per split, 47 % off the mean)."""
    cfg = qflash.resolve_quant(preset)
    q, k, v, _ = _inputs(1, 2, 1, 6, 300, 64, None, seed=6)
    mask = torch.zeros(1, 1, 6, 300, device=DEV)
    mask[..., 2, :] = torch.finfo(torch.float32).min  # a padding row
    mask[..., 4, 100:] = torch.finfo(torch.float32).min  # a row that sees keys 0-99 only
    out = torch.full_like(q, float("nan"))
    o, l = launch.attention_fwd(q, k, v, cfg, attn_mask=mask, split_keys=128, fused_quant=fused, out=out,
                                return_lse=True)
    o_ex = reference.exact_attention(q, k, v, attn_mask=mask)
    # measured (interpreter): none / int8 1.4e-3 (bf16 output), int8-fp8 2.6e-2 (FP8 V codes)
    assert rel_l2(o[:, :, 2], v.float().mean(dim=2).expand(1, 2, 64)) < {"int8-fp8": 0.03}.get(preset, 2e-3)
    assert rel_l2(o, o_ex) < EXACT_BOUND[preset]
    assert (l[:, :, 2] < -3.0e38).all() and l.isfinite().all()  # finfo.min rows' lse: -FLT_MAX, as unsplit


def test_split_merge_rows_per_program(monkeypatch):
    """The merge with several output rows per program (a partial last program included) writes
    what one row per program writes, bit for bit."""
    cfg = qflash.resolve_quant("none")
    q, k, v, _ = _inputs(1, 2, 1, 10, 300, 64, None, seed=4)
    one = launch.attention_fwd(q, k, v, cfg, split_keys=128, return_lse=True)
    monkeypatch.setattr(launch, "merge_rows", lambda rows: 4)
    out = torch.full_like(q, float("nan"))
    four = launch.attention_fwd(q, k, v, cfg, split_keys=128, return_lse=True, out=out)
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])


def test_split_keys_rejects_misaligned_splits():
    cfg = qflash.resolve_quant("int8-fp8")  # K and V scale blocks of 128 keys
    q, k, v, _ = _inputs(1, 1, 1, 4, 512, 64, None, seed=1)
    with pytest.raises(ValueError, match="split_keys=64"):
        launch.attention_fwd(q, k, v, cfg, fused_quant=False, split_keys=64)


def test_split_merge_nan_propagates():
    """A NaN key reaches every query that attends to it, through the merge (as in SDPA)."""
    cfg = qflash.resolve_quant("none")
    q, k, v, _ = _inputs(1, 1, 1, 3, 300, 64, None, seed=2)
    k[0, 0, 200, 5] = float("nan")
    o, _ = launch.attention_fwd(q, k, v, cfg, split_keys=128)
    assert o.isnan().all()


def test_pick_split_keys_policy(monkeypatch):
    dev = torch.device("cuda", 0)
    monkeypatch.setitem(launch._SM_COUNT, 0, 132)
    # one query row tile per head, 8 heads, 4096 keys: 16 splits of 256 keys (132 // 8)
    assert launch.pick_split_keys(dev, 8, 4096, 64, 128, 128) == 256
    # a grid that already fills half the GPU: no split
    assert launch.pick_split_keys(dev, 128, 4096, 64, 1, 1) is None
    # too few keys to be worth it
    assert launch.pick_split_keys(dev, 1, 128, 64, 1, 1) is None
    # boundaries on whole K/V scale blocks (128), at least two tiles per split
    keys = launch.pick_split_keys(dev, 16, 1024, 64, 128, 128)
    assert keys == 128 * math.ceil(1024 / 8 / 128)
    assert launch.pick_split_keys(torch.device("cpu"), 1, 4096, 64, 1, 1) is None
    # the one-launch mode: one 128-key tile per split where the SMs allow (16 programs x 8 splits)
    assert launch.pick_split_keys(dev, 16, 1024, 64, 1, 1, one_launch=True) == 128
    assert launch.pick_split_keys(dev, 8, 4096, 128, 128, 128, one_launch=True) == 256  # 132 // 8 splits


@pytest.mark.parametrize("self_stats", [False, True], ids=["stats-launch", "self-stats"])
@pytest.mark.parametrize("preset", ["int8-fp8", "int4"])
def test_quantiser_stats_pass_matches_torch_statistics(preset, self_stats):
    """The quantiser fed by the statistics kernel's partials, or taking the statistics itself
    (``self_stats``, short keys; the CUDA defaults: no torch op, so the call can be a plan), writes
    the same codes and scales as with torch's token means (GQA: two query heads share a K/V head)."""
    cfg = qflash.resolve_quant(preset)
    q, k, v, _ = _inputs(1, 2, 1, 5, 300, 64, None, seed=7)
    k = k + 0.5  # a mean worth subtracting
    a = launch.quantize_qkv(q, k, v, cfg, stats=False)
    b = launch.quantize_qkv(q, k, v, cfg, stats=True, self_stats=self_stats)
    assert (b.k_partials is None) == self_stats and (b.k_mean is not None) == (self_stats and cfg.smooth_k)
    for name in ("q", "q_scale", "k", "k_scale", "v_t", "v_scale"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
            continue
        if name == "v_t":
            x, y = x[..., :300], y[..., :300]
        if DEV == "cpu" and not self_stats:  # the interpreter sums the partials as torch's CPU mean does: bit-identical
            assert torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x,
                               y.view(torch.uint8) if y.element_size() == 1 else y), name
        elif x.element_size() == 1:  # another summation order (~1e-7 apart): rare codes move one step
            diff = (x.float() - y.float()).abs()
            assert (diff > 0).float().mean().item() < 0.01 and diff.max().item() <= 1.0, name
        else:  # scales: measured within 3e-8 relative (int4 K block scales)
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=name)
    if cfg.smooth_k:
        mean = b.k_mean if self_stats else b.k_partials.sum(2) / b.sk
        torch.testing.assert_close(mean, k.float().mean(dim=2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["int8", "int8-fp8", "int4", "fp8"])
def test_two_launch_path_with_self_statistics(preset):
    """The separate quantiser taking the K/V statistics itself (no statistics launch), then the
    attention kernel on its codes: against the fake-quant reference (whole-sequence statistics,
    the kernel's tiles) and the exact one, with GQA, causal, a partial key tile, the lse (K
    smoothing's correction from the quantiser's K mean), output and lse poisoned."""
    cfg = qflash.resolve_quant(preset)
    q, k, v, _ = _inputs(1, 4, 2, 37, 200, 64, None, seed=23)
    k = k + 0.7  # a mean worth subtracting
    codes = launch.quantize_qkv(q, k, v, cfg, stats=True, self_stats=True)
    assert codes.k_partials is None and codes.k_mean is not None
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=DEV)
    o, l = launch.attention_fwd(q, k, v, cfg, causal=True, return_lse=True, out=out, lse=lse, codes=codes)
    ref = launch.reference_args(q, k, cfg, fused_quant=False)
    o_fq, l_fq = reference.fake_quant_attention(q, k, v, causal=True, return_lse=True, **ref)
    o_ex = reference.exact_attention(q, k, v, causal=True)
    assert not o.isnan().any() and not l.isnan().any()
    # measured (interpreter), the same as with the statistics launch: int8 5.2e-4, int8-fp8 3.8e-3,
    # int4 0, fp8 4.4e-3; lse 7.4e-4 / 7.5e-4 / 1.4e-6 / 2.0e-3
    # (H200, session 11: int8 1.18e-3, int4 3.9e-5; int8-fp8 and fp8 within the bounds)
    gpu = DEV != "cpu"
    assert rel_l2(o, o_fq) < {"int8": 1.6e-3 if gpu else 8e-4, "int8-fp8": 6e-3, "int4": 6e-5 if gpu else 1e-5,
                              "fp8": 7e-3}[preset]
    assert (l - l_fq).abs().max().item() < {"int8": 1.2e-3, "int8-fp8": 1.2e-3, "int4": 1e-5, "fp8": 3e-3}[preset]
    assert rel_l2(o, o_ex) < {"int4": 0.22}.get(preset, EXACT_BOUND.get(preset, 0.02))
    # and against the statistics launch's path (bit-identical on the interpreter; the GPU sums the
    # K mean in another order, so a rare code may move one step)
    o2, l2 = launch.attention_fwd(q, k, v, cfg, causal=True, return_lse=True,
                                  codes=launch.quantize_qkv(q, k, v, cfg, stats=True, self_stats=False))
    assert rel_l2(o, o2) < (1e-6 if DEV == "cpu" else 2e-3)


@pytest.mark.parametrize("nqb", [3, 1])
@pytest.mark.parametrize("mean", ["partials", "mean", "none"])
def test_q_bias_launch_matches_torch(mean, nqb):
    """Q smoothing's bias launch (int4's block bias restoration) equals the torch formula it
    replaced, q_mean · (k - k_mean)ᵀ · qk_mult, with GQA, a partial key tile, a padded head dim,
    the K mean from the statistics' partials, given whole, or absent. NaN lands where the formula
    puts it: a NaN key poisons its own column and, through the K mean, every column of its head.
    Each program loops over the query blocks (one block: a bound Triton specialises to 1)."""
    from qflash.kernels.portable.smooth_terms import q_bias

    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, Sk, D = 2, 4, 2, 100, 48
    k = (torch.randn(B, Sk, Hkv, D, generator=g) + 0.3).to(torch.bfloat16).to(DEV).transpose(1, 2)  # NHD view
    k[1, 0, 7, 5] = float("nan")
    q_mean = torch.randn(B, Hq, nqb, D, generator=g).to(DEV)
    kf = k.float()
    sums = torch.stack([kf[:, :, i:i + 40].nansum(2) for i in range(0, Sk, 40)], dim=2)  # 3 chunks
    sums[1, 0, :, 5] = float("nan")
    k_mean = sums.sum(2) / Sk
    mult = 0.125 * 1.4426950408889634
    if mean == "partials":
        got = q_bias(k, q_mean, None, mult, k_partials=sums.contiguous())
    else:
        got = q_bias(k, q_mean, k_mean if mean == "mean" else None, mult)
    ks = kf - k_mean[:, :, None, :] if mean != "none" else kf
    want = (q_mean.double() @ ks.repeat_interleave(Hq // Hkv, dim=1).double().transpose(-1, -2)) * mult
    assert got.shape == (B, Hq, nqb, Sk) and got.dtype == torch.float32
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and nan.any()
    torch.testing.assert_close(got[~nan].double(), want[~nan], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean", ["partials", "mean"])
def test_lse_correction_launch_matches_torch(mean):
    """K smoothing's lse term, scale · q · k_mean, equals the torch matmul it replaced: GQA, NHD q,
    a partial query tile, a padded head dim, the mean from partials or given; NaN in q stays in
    its row."""
    from qflash.kernels.portable.smooth_terms import lse_correction

    g = torch.Generator().manual_seed(12)
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 70, 90, 48
    q = torch.randn(B, Sq, Hq, D, generator=g).to(torch.bfloat16).to(DEV).transpose(1, 2)
    q[0, 3, 9, 2] = float("nan")
    sums = (torch.randn(B, Hkv, 2, D, generator=g) * 30 + 20).to(DEV)  # two chunks' K sums
    k_mean = sums.sum(2) / Sk
    if mean == "partials":
        got = lse_correction(q, None, 0.3, Sk, k_partials=sums.contiguous())
    else:
        got = lse_correction(q, k_mean, 0.3, Sk)
    want = (q.double() @ k_mean.repeat_interleave(Hq // Hkv, dim=1).double()[..., None]).squeeze(-1) * 0.3
    assert got.shape == (B, Hq, Sq) and got.dtype == torch.float32
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and nan.sum() == 1
    torch.testing.assert_close(got[~nan].double(), want[~nan], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="plans replay compiled kernels (CUDA)")
@pytest.mark.parametrize("preset", ["none", "int8", "int8-fp8", "fp8", "int4"])
@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (1, 1, 1024, 128), (8, 16, 77, 64), (1, 8, 1, 128, 4096)])
def test_plans_replay_fresh_data(preset, shape):
    """A repeated call replays its recorded launches (one plan per call description) and gives
    the same answer as the first, recorded call on the same data, and right answers on new data.
    int4 included: its Q-smoothing bias is a recorded launch (``q_bias``), not torch ops."""
    B, H, Sq, D, *rest = shape
    Sk = rest[0] if rest else Sq
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda s: torch.randn(B, H, s, D, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = mk(Sq), mk(Sk), mk(Sk)
    launch._PLANS.clear()
    first = qflash.attention(q, k, v, quant=preset, backend="portable")
    assert len(launch._PLANS) == 1
    again = qflash.attention(q, k, v, quant=preset, backend="portable")
    assert torch.equal(first, again)
    q2, k2, v2 = mk(Sq), mk(Sk), mk(Sk)
    out = qflash.attention(q2, k2, v2, quant=preset, backend="portable")
    assert len(launch._PLANS) == 1
    # int4: 14-17 % relL2 in `qflash bench` on an H200 (2026-12-02) at these shapes
    bound = {"none": 3.5e-3, "int8": 0.013, "int8-fp8": 0.05, "fp8": 0.07, "int4": 0.2}[preset]
    assert rel_l2(out, reference.exact_attention(q2, k2, v2)) < bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
@pytest.mark.parametrize("preset", ["int8", "int8-fp8"])
def test_plans_under_cuda_graph(preset):
    q, k, v = (torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16) for s in (1, 4096, 4096))
    expect = qflash.attention(q, k, v, quant=preset)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        qflash.attention(q, k, v, quant=preset)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qflash.attention(q, k, v, quant=preset)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_l2(out, qflash.attention(q, k, v, quant=preset)) == 0
    assert not torch.equal(out, expect)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the call cache replays CUDA plans")
@pytest.mark.parametrize("layout", ["HND", "NHD"])
# int8, not int8-fp8: on the H200 the FP8 P·V tiles load K/V through TMA descriptors, which hold
# base addresses, so those calls are never recorded as replayable plans (fastlaunch.PlanCache)
@pytest.mark.parametrize("preset", ["none", "int8"])
def test_call_cache_matches_full_path(layout, preset):
    """qflash.attention's call cache (a repeated eager call replays its plan from the API) returns
    what the full path returns: same values, layout, lse shape; a grad-requiring call bypasses it."""
    from qflash import api

    shape = (2, 3, 200, 64) if layout == "HND" else (2, 200, 3, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    api._CALLS.clear()
    full = [qflash.attention(q, k, v, quant=preset, layout=layout, return_lse=True) for _ in range(2)]
    assert len(api._CALLS) == 1  # learnt from the second call (a plan replay)
    out, lse = qflash.attention(q, k, v, quant=preset, layout=layout, return_lse=True)
    assert torch.equal(out, full[0][0]) and torch.equal(lse, full[0][1])
    assert out.shape == q.shape and out.stride() == full[0][0].stride() and lse.shape == (2, 3, 200)
    qg = q.clone().requires_grad_()
    out_g = qflash.attention(qg, k, v, quant=preset, layout=layout)
    assert out_g.grad_fn is not None


@pytest.mark.parametrize("preset", ["int8-fp8", "fp8"])
def test_small_fp8_pv_calls_keep_pv_in_input_dtype(preset, monkeypatch):
    """An automatic call of an FP8 P·V preset at or below ``tuning.float_pv_max_work`` MACs runs the
    preset with P·V in the input dtype (``launch.call_quant``): it matches that fake-quant reference
    and is closer to exact attention than the FP8 P·V run; one MAC above the limit the call runs
    the preset as given (against the preset's reference). GQA, causal."""
    cfg = qflash.resolve_quant(preset)
    q, k, v, _ = _inputs(1, 4, 2, 40, 96, 64, None, seed=31)
    work = 4 * 40 * 96 * 64
    monkeypatch.setattr(launch, "float_pv_max_work", lambda device: work)
    run = launch.call_quant(q, k, cfg)
    assert not run.quantizes_pv and (run.q, run.k, run.smooth_k, run.name) == (cfg.q, cfg.k, cfg.smooth_k, cfg.name)
    assert launch.call_quant(q, k, cfg) is run  # one object per preset: plan and dispatch keys stay stable
    assert launch.call_quant(q, k, qflash.resolve_quant("int8")) is qflash.resolve_quant("int8")
    exact = reference.exact_attention(q, k, v, causal=True)
    errs = {}
    for limit, want in ((work, run), (work - 1, cfg)):
        monkeypatch.setattr(launch, "float_pv_max_work", lambda device, limit=limit: limit)
        assert launch.call_quant(q, k, cfg) is want
        out = qflash.attention(q, k, v, quant=preset, causal=True, backend="portable")
        fq = reference.fake_quant_attention(q, k, v, causal=True, **launch.reference_args(q, k, want))
        assert not out.isnan().any()
        # measured, int8-fp8 / fp8: interpreter float P·V 8.4e-4 / 1.3e-3, FP8 P·V 2.6e-3 / 2.9e-3; H200 FP8
        # P·V int8-fp8 5.7e-3 (float P·V within its bounds)
        fp8_bound = 5e-3 if DEV == "cpu" else 7.5e-3
        assert rel_l2(out, fq) < {True: {"int8-fp8": 1.6e-3, "fp8": 2.5e-3}, False: {"int8-fp8": fp8_bound,
                                                                                   "fp8": fp8_bound}}[want is run][preset]
        errs[want is run] = rel_l2(out, exact)
    assert errs[True] < errs[False]
