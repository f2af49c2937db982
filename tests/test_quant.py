"""qflash.quant: quantize/dequantize round trips, scale layouts, INT4 packing, smoothing means."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import randn, rel_l2

from qflash.config import Granularity, GranularityKind, OperandQuant, Precision, Strategy
from qflash.quant import (
    QuantizedTensor,
    block_mean,
    codes_as_float,
    dequantize,
    expand_scales,
    pack_int4,
    quantize,
    token_mean,
    unpack_int4,
)

LEAD = (2, 3)  # (B, H)
D = 64

GRANS = {
    "tensor": Granularity.tensor(),
    "token": Granularity.token(),
    "block64": Granularity.block(64),
    "group32": Granularity.group(32),
    "channel128": Granularity.channel(128),
}

# every legal (precision, granularity, strategy): int4 can't be per channel, fp8 is symmetric only
COMBOS = [
    pytest.param(p, g, s, id=f"{p.value}-{gname}-{s.value[:4]}")
    for p in (Precision.INT8, Precision.INT4, Precision.FP8_E4M3)
    for gname, g in GRANS.items()
    for s in (Strategy.SYMMETRIC, Strategy.ASYMMETRIC)
    if not (p is Precision.INT4 and g.kind is GranularityKind.CHANNEL)
    and not (p is Precision.FP8_E4M3 and s is Strategy.ASYMMETRIC)
]
SEQS = [pytest.param(s, id=f"S{s}") for s in (1, 63, 1000)]


def _groups(x: torch.Tensor, g: Granularity) -> list[tuple[torch.Tensor, tuple]]:
    """Hand-written grouping, independent of the library: [(elements, scale index)]."""
    *lead, S, Dd = x.shape
    out = []
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in lead]).reshape(-1, len(lead)).tolist():
        xs = x[tuple(idx)]
        if g.kind is GranularityKind.TOKEN:
            out += [(xs[s], (*idx, s)) for s in range(S)]
        elif g.kind is GranularityKind.BLOCK:
            out += [(xs[b * g.size:(b + 1) * g.size], (*idx, b)) for b in range(math.ceil(S / g.size))]
        elif g.kind is GranularityKind.GROUP:
            out += [(xs[s, c * g.size:(c + 1) * g.size], (*idx, s, c)) for s in range(S) for c in range(Dd // g.size)]
        elif g.kind is GranularityKind.CHANNEL:
            n = g.size or S
            out += [(xs[b * n:(b + 1) * n, c], (*idx, b, c)) for b in range(math.ceil(S / n)) for c in range(Dd)]
    return out


def expected_scales(x: torch.Tensor, prec: Precision, g: Granularity, strat: Strategy):
    """(scale, zero point or None) computed group by group from the module docstring's formulas."""
    if g.kind is GranularityKind.TENSOR:
        groups = [(x, (0,) * (x.dim() - 1))]
        shape = (1,) * (x.dim() - 1)
    else:
        groups = _groups(x, g)
        shape = expected_scale_shape(x.shape, g)
    scale = torch.empty(shape, dtype=torch.float64)
    zero = torch.empty(shape, dtype=torch.float64)
    for xs, idx in groups:
        xs = xs.double()
        if strat is Strategy.SYMMETRIC:
            amax = xs.abs().max().item()
            scale[idx] = (amax if amax > 1e-30 else 1.0) / prec.qmax
        else:
            lo, hi = prec.code_range
            rng = (xs.max() - xs.min()).item()
            s = (rng if rng > 1e-30 else 1.0) / (hi - lo)
            scale[idx] = s
            zero[idx] = round(lo - xs.min().item() / s)
    return scale, (zero if strat is Strategy.ASYMMETRIC else None)


def expected_scale_shape(shape, g: Granularity) -> tuple:
    """The table in config.Granularity's docstring."""
    *lead, S, Dd = shape
    k = g.kind
    if k is GranularityKind.TENSOR:
        return (*[1] * len(lead), 1)
    if k is GranularityKind.TOKEN:
        return (*lead, S)
    if k is GranularityKind.BLOCK:
        return (*lead, math.ceil(S / g.size))
    if k is GranularityKind.GROUP:
        return (*lead, S, Dd // g.size)
    return (*lead, math.ceil(S / (g.size or S)), Dd)


@pytest.mark.parametrize("S", SEQS)
@pytest.mark.parametrize("prec, gran, strat", COMBOS)
def test_round_trip(gen, prec, gran, strat, S):
    x = randn(gen, *LEAD, S, D, scale=3.0)
    x[0, 0, 0, :5] += 20.0  # one outlier: a group whose scale differs from the others
    qt = quantize(x, prec, gran, strat)

    # bookkeeping
    assert isinstance(qt, QuantizedTensor)
    assert qt.shape == x.shape and qt.dtype == x.dtype
    assert qt.precision is prec and qt.granularity == gran and qt.strategy is strat
    assert qt.scale.dtype == torch.float32 and tuple(qt.scale.shape) == expected_scale_shape(x.shape, gran)
    data_dtype = {Precision.INT8: torch.int8, Precision.INT4: torch.uint8, Precision.FP8_E4M3: torch.float8_e4m3fn}
    assert qt.data.dtype == data_dtype[prec]
    packed = prec is Precision.INT4
    assert tuple(qt.data.shape) == (*LEAD, S, D // 2 if packed else D)
    if strat is Strategy.ASYMMETRIC:
        assert qt.zero_point is not None and qt.zero_point.shape == qt.scale.shape
        assert qt.zero_point.dtype == torch.float32
    else:
        assert qt.zero_point is None
    assert qt.nbytes == qt.data.numel() * qt.data.element_size() + qt.scale.numel() * 4 * (1 + (qt.zero_point is not None))

    # scales and zero points, against a group-by-group computation
    exp_scale, exp_zero = expected_scales(x, prec, gran, strat)
    torch.testing.assert_close(qt.scale.double(), exp_scale, rtol=1e-6, atol=0)
    if exp_zero is not None:
        assert torch.equal(qt.zero_point.double(), exp_zero)

    # codes in range
    codes = unpack_int4(qt.data) if packed else qt.data
    if prec.is_integer:
        lo, hi = (-prec.qmax, prec.qmax) if strat is Strategy.SYMMETRIC else prec.code_range
        assert int(codes.min()) >= lo and int(codes.max()) <= hi
    else:
        assert codes.float().abs().max() <= 448.0 and torch.isfinite(codes.float()).all()

    # round-trip error, bounded by the step size elementwise
    y = dequantize(qt)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = (y.double() - x.double()).abs()
    step = expand_scales(qt.scale, gran, x.shape).double()
    if prec.is_integer:
        bound = step * 0.5 * (1 + 1e-4)  # half a step (round to nearest), plus fp32 slack
    else:  # e4m3: 3 mantissa bits -> relative half-ulp 2^-4; subnormal spacing 2^-9 of the scale
        bound = torch.maximum(x.double().abs() * 2.0**-4, step * 2.0**-10) * (1 + 1e-4) + 1e-12
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # and the reconstruction is actually good overall (a too-coarse scale would fail here)
    budget = {Precision.INT8: 0.04, Precision.INT4: 0.4, Precision.FP8_E4M3: 0.06}[prec]
    assert rel_l2(y, x) < budget


@pytest.mark.parametrize("prec, gran, strat", COMBOS)
def test_extremes_hit_code_range(gen, prec, gran, strat):
    """The largest-magnitude element of each group maps to the end of the code range."""
    x = randn(gen, *LEAD, 63, D)
    qt = quantize(x, prec, gran, strat)
    c = codes_as_float(qt).double()  # zero point removed
    if strat is Strategy.SYMMETRIC:
        amax_pos = x.abs() == x.abs().amax() if gran.kind is GranularityKind.TENSOR else None
        if amax_pos is not None:
            assert c[amax_pos].abs().max().item() == prec.qmax
        assert c.abs().max().item() == prec.qmax
    else:
        lo, hi = prec.code_range
        raw = unpack_int4(qt.data) if prec is Precision.INT4 else qt.data
        assert int(raw.min()) == lo and int(raw.max()) == hi


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("prec", [Precision.INT8, Precision.INT4, Precision.FP8_E4M3], ids=lambda p: p.value)
def test_dtype_preserved(gen, prec, dtype):
    x = randn(gen, 2, 63, 128, dtype=dtype)
    qt = quantize(x, prec)
    assert qt.dtype == dtype and qt.scale.dtype == torch.float32
    y = dequantize(qt)
    assert y.dtype == dtype
    assert dequantize(qt, torch.float64).dtype == torch.float64
    assert rel_l2(dequantize(qt, torch.float64), x) < {Precision.INT8: 0.02, Precision.INT4: 0.25}.get(prec, 0.05)


def test_operand_quant_argument(gen):
    x = randn(gen, 2, 63, 64)
    spec = OperandQuant(Precision.INT8, Granularity.block(16), Strategy.ASYMMETRIC)
    a, b = quantize(x, spec), quantize(x, "int8", Granularity.block(16), "asymmetric")
    assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert a.granularity == spec.granularity and a.strategy is Strategy.ASYMMETRIC
    assert quantize(x, "int8").granularity == Granularity.token()  # the default


def test_round_half_even():
    # a tensor whose scale is exactly 1: codes are round-half-even of x
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 127.0]])
    qt = quantize(x, "int8", Granularity.tensor())
    assert qt.scale.item() == 1.0
    assert qt.data.tolist() == [[0, 2, 2, 0, -2, 127]]


@pytest.mark.parametrize("prec, gran, strat", COMBOS)
def test_zero_groups_give_finite_scales(gen, prec, gran, strat):
    x = randn(gen, *LEAD, 63, D)
    x[0] = 0.0  # whole (B=0) slice zero: zero tokens, blocks, groups and channels
    x[1, 1, 5] = 0.0  # one zero token
    x[1, 2, :, 32:] = 0.0  # zero channel groups
    qt = quantize(x, prec, gran, strat)
    assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()
    if qt.zero_point is not None:
        assert torch.isfinite(qt.zero_point).all()
    y = dequantize(qt)
    assert torch.isfinite(y).all()
    if gran.kind is not GranularityKind.TENSOR:
        assert (y[0] == 0).all()
    x0 = torch.zeros(2, 63, D)
    qt0 = quantize(x0, prec, gran, strat)
    assert torch.isfinite(qt0.scale).all() and (qt0.scale > 0).all()
    assert torch.equal(dequantize(qt0), x0)


@pytest.mark.parametrize("prec, strat", [(Precision.INT8, "asymmetric"), (Precision.INT4, "asymmetric")],
                         ids=["int8", "int4"])
def test_constant_groups_asymmetric(prec, strat):
    # range 0 -> the range is taken as 1 (like an all-zero group): finite, within half a step
    x = torch.full((3, 16, 8), -2.75)
    qt = quantize(x, prec, Granularity.token(), strat)
    lo, hi = prec.code_range
    assert torch.isfinite(qt.zero_point).all() and torch.allclose(qt.scale, torch.tensor(1.0 / (hi - lo)))
    err = (dequantize(qt) - x).abs()
    assert (err <= qt.scale[..., None] * 0.5 * (1 + 1e-4)).all()


def test_empty_sequence():
    for gname, g in GRANS.items():
        x = torch.randn(2, 3, 0, 64)
        qt = quantize(x, "int8", g)
        assert dequantize(qt).shape == x.shape, gname


# --- INT4 packing -------------------------------------------------------------------------------


def test_pack_int4_layout_hand_made():
    # byte j = channel 2j in bits 0..3 (low nibble), channel 2j+1 in bits 4..7, two's complement
    codes = torch.tensor([[3, -2, -8, 7, 0, -1, 1, 0]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 4)
    assert packed.tolist() == [[0xE3, 0x78, 0xF0, 0x01]]
    assert torch.equal(unpack_int4(torch.tensor([0xE3, 0x78, 0xF0, 0x01], dtype=torch.uint8)),
                       torch.tensor([3, -2, -8, 7, 0, -1, 1, 0], dtype=torch.int8))


@pytest.mark.parametrize("shape", [(2,), (1, 2), (3, 63, 128), (2, 2, 1000, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64], ids=lambda d: str(d)[6:])
def test_pack_unpack_round_trip(gen, shape, dtype):
    codes = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int64).to(dtype)
    codes.view(-1)[0], codes.view(-1)[-1] = -8, 7  # both ends of the range are always present
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    back = unpack_int4(packed)
    assert back.dtype == torch.int8 and torch.equal(back, codes.to(torch.int8))


def test_unpack_pack_all_bytes():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every)), every)


def test_int4_quantize_data_is_packed_codes(gen):
    x = randn(gen, 2, 63, 64)
    qt = quantize(x, "int4")
    c = torch.round(x / qt.scale[..., None]).clamp(-7, 7).to(torch.int8)
    assert torch.equal(qt.data, pack_int4(c))


@pytest.mark.parametrize("codes, exc, match", [
    pytest.param(torch.zeros(4), TypeError, "codes", id="float-codes"),
    pytest.param(torch.zeros(4, dtype=torch.uint8), TypeError, "codes", id="uint8-codes"),
    pytest.param(torch.zeros(2, 3, dtype=torch.int8), ValueError, r"even.*\(2, 3\)", id="odd-last-dim"),
])
def test_pack_int4_rejects(codes, exc, match):
    with pytest.raises(exc, match=match):
        pack_int4(codes)


@pytest.mark.parametrize("packed", [torch.zeros(4, dtype=torch.int8), torch.zeros(4)], ids=["int8", "float"])
def test_unpack_int4_rejects(packed):
    with pytest.raises(TypeError, match="packed must be torch.uint8"):
        unpack_int4(packed)


# --- bad quantize inputs ------------------------------------------------------------------------

QUANTIZE_BAD = [
    pytest.param(lambda: quantize(torch.ones(4, 64, dtype=torch.int32)), TypeError, "x must be a floating", id="int-x"),
    pytest.param(lambda: quantize(torch.ones(64)), ValueError, r"x must have shape.*\(64,\)", id="1d-x"),
    pytest.param(lambda: quantize(torch.ones(4, 64), "fp16"), ValueError, "precision must be", id="float-precision"),
    pytest.param(lambda: quantize(torch.ones(4, 64), "int2"), ValueError, "int2", id="unknown-precision"),
    pytest.param(lambda: quantize(torch.ones(4, 63), "int4"), ValueError, "head dim must be even, got 63", id="int4-odd"),
    pytest.param(lambda: quantize(torch.ones(4, 64), "int8", Granularity.group(48)), ValueError, "group size 48",
                 id="group-not-dividing"),
    pytest.param(lambda: quantize(torch.ones(4, 64), "fp8_e4m3", strategy="asymmetric"), ValueError,
                 "strategy=asymmetric", id="asymmetric-fp8"),
    pytest.param(lambda: quantize(torch.ones(4, 64), "int4", Granularity.channel()), ValueError, "int4",
                 id="int4-channel"),
    pytest.param(lambda: quantize(torch.ones(4, 64), "int8", strategy="affine"), ValueError, "affine",
                 id="unknown-strategy"),
]


@pytest.mark.parametrize("call, exc, match", QUANTIZE_BAD)
def test_quantize_rejects(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- smoothing means ----------------------------------------------------------------------------


@pytest.mark.parametrize("S", SEQS)
def test_token_mean(gen, S):
    x = randn(gen, 2, 3, S, 64, dtype=torch.bfloat16)
    m = token_mean(x)
    assert m.dtype == torch.float32 and m.shape == (2, 3, 1, 64)
    torch.testing.assert_close(m.double(), x.double().mean(dim=-2, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("S, block", [(1, 128), (63, 16), (64, 16), (1000, 128), (1000, 1)],
                         ids=["S1-b128", "S63-b16", "S64-b16", "S1000-b128", "S1000-b1"])
def test_block_mean(gen, S, block):
    x = randn(gen, 2, 3, S, 64)
    m = block_mean(x, block)
    nb = math.ceil(S / block)
    assert m.dtype == torch.float32 and m.shape == (2, 3, nb, 64)
    # the last, possibly short, block averages only the rows it has
    expect = torch.stack([x[..., i * block:(i + 1) * block, :].double().mean(dim=-2) for i in range(nb)], dim=-2)
    torch.testing.assert_close(m.double(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prec, gran", [
    pytest.param(Precision.INT8, Granularity.channel(128), id="int8-channel128"),
    pytest.param(Precision.INT8, Granularity.block(64), id="int8-block64"),
    pytest.param(Precision.INT4, Granularity.block(64), id="int4-block64"),
])
def test_asymmetric_short_block_range(gen, prec, gran):
    """A short last block's padding must not widen the asymmetric range (all-positive data)."""
    x = randn(gen, 2, 63, 64).abs() + 1.0  # min >= 1: zero padding would drag min to 0
    qt = quantize(x, prec, gran, "asymmetric")
    exp_scale, exp_zero = expected_scales(x, prec, gran, Strategy.ASYMMETRIC)
    torch.testing.assert_close(qt.scale.double(), exp_scale, rtol=1e-6, atol=0)
    assert torch.equal(qt.zero_point.double(), exp_zero)
    lo, hi = prec.code_range
    raw = unpack_int4(qt.data) if prec is Precision.INT4 else qt.data
    assert int(raw.min()) == lo and int(raw.max()) == hi  # the whole code range is used
