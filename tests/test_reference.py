"""qflash.reference: exact attention against hand-written math; fake-quant against exact;
the per-preset error budgets of issue 2 (printed as a table with ``pytest -s``)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PRESET_NAMES, cosine, make_qkv, naive_attention, randn, rel_l2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qflash
from qflash.reference import exact_attention, expand_kv, fake_quant_attention

F64 = torch.float64


def qkv64(gen, **kw):
    return tuple(t.to(F64) for t in make_qkv(gen, **kw))


# --- exact attention against a hand-written softmax ---------------------------------------------

SMALL = [  # (B, Hq, Hkv, Sq, Sk, D)
    pytest.param(1, 1, 1, 1, 1, 8, id="S1"),
    pytest.param(2, 2, 2, 5, 5, 16, id="B2-S5"),
    pytest.param(1, 2, 2, 3, 9, 8, id="Sq3-Sk9"),
    pytest.param(1, 2, 2, 9, 4, 8, id="Sq9-Sk4"),
    pytest.param(1, 4, 2, 7, 6, 8, id="gqa4-2"),
    pytest.param(2, 3, 1, 4, 7, 12, id="mqa3-1"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Sk, D", SMALL)
def test_exact_matches_hand_written(gen, B, Hq, Hkv, Sq, Sk, D, causal):
    q, k, v = qkv64(gen, B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D)
    out, lse = exact_attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    assert out.dtype == F64 and out.shape == (B, Hq, Sq, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5], ids=["s0.05", "s1", "s2.5"])
def test_exact_scale(gen, scale):
    q, k, v = qkv64(gen, Hq=2, Sq=5, Sk=6, D=8)
    torch.testing.assert_close(exact_attention(q, k, v, scale=scale), naive_attention(q, k, v, scale=scale)[0])
    # default scale is 1/sqrt(D)
    torch.testing.assert_close(exact_attention(q, k, v), exact_attention(q, k, v, scale=1 / math.sqrt(8)))


def test_exact_output_dtype_and_fp32_compute(gen):
    q, k, v = make_qkv(gen, Hq=2, Sq=33, Sk=40, D=32)
    out64 = exact_attention(q.double(), k.double(), v.double())
    out32 = exact_attention(q, k, v, compute_dtype=torch.float32)
    assert out32.dtype == torch.float32 and rel_l2(out32, out64) < 1e-6
    assert torch.equal(exact_attention(q, k, v), out64.float())  # fp64 compute by default
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out = exact_attention(qb, kb, vb)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, exact_attention(qb.double(), kb.double(), vb.double())) < 4e-3  # output rounding only


# --- causal, bottom-right aligned ----------------------------------------------------------------


@pytest.mark.parametrize("Sq, Sk", [(3, 8), (8, 3), (5, 5), (1, 7), (7, 1)],
                         ids=["Sq<Sk", "Sq>Sk", "square", "Sq1", "Sk1"])
def test_causal_bottom_right(gen, Sq, Sk):
    q, k, v = qkv64(gen, B=1, Hq=2, Sq=Sq, Sk=Sk, D=8)
    out, lse = exact_attention(q, k, v, causal=True, return_lse=True)
    # query i sees key j iff j <= i + Sk - Sq: check by perturbing every invisible key/value
    for i in range(Sq):
        last = i + Sk - Sq  # last visible key
        k2, v2 = k.clone(), v.clone()
        k2[:, :, last + 1 if last >= 0 else 0:] += 5.0
        v2[:, :, last + 1 if last >= 0 else 0:] -= 7.0
        out2 = exact_attention(q, k2, v2, causal=True)
        torch.testing.assert_close(out2[:, :, i], out[:, :, i], rtol=1e-12, atol=1e-12)
        if last < 0:  # no visible key: zeros and lse = -inf
            assert (out[:, :, i] == 0).all()
            assert torch.isneginf(lse[:, :, i]).all()
        else:  # the last visible key's value matters
            v3 = v.clone()
            v3[:, :, last] += 1.0
            assert not torch.allclose(exact_attention(q, k, v3, causal=True)[:, :, i], out[:, :, i])
    n_masked_rows = max(Sq - Sk, 0)
    assert torch.isneginf(lse).sum() == 2 * n_masked_rows
    assert not torch.isnan(out).any()
    # the last query always sees every key: equals the non-causal last row
    torch.testing.assert_close(out[:, :, -1], exact_attention(q, k, v)[:, :, -1])


# --- masks ---------------------------------------------------------------------------------------

B_, H_, SQ_, SK_ = 2, 3, 5, 7
MASK_SHAPES = [
    pytest.param((SQ_, SK_), id="Sq,Sk"),
    pytest.param((SK_,), id="Sk"),
    pytest.param((1, 1, SQ_, SK_), id="1,1,Sq,Sk"),
    pytest.param((B_, 1, 1, SK_), id="B,1,1,Sk"),
    pytest.param((1, H_, SQ_, 1), id="1,H,Sq,1"),
    pytest.param((B_, H_, SQ_, SK_), id="B,H,Sq,Sk"),
    pytest.param((H_, 1, SK_), id="H,1,Sk"),
]


def random_bool_mask(gen, shape):
    m = torch.rand(shape, generator=gen) < 0.7  # True = keep
    return m


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_bool_mask(gen, shape, causal):
    q, k, v = qkv64(gen, B=B_, Hq=H_, Sq=SQ_, Sk=SK_, D=8)
    mask = random_bool_mask(gen, shape)
    out, lse = exact_attention(q, k, v, attn_mask=mask, causal=causal, return_lse=True)
    ref, ref_lse = naive_attention(q, k, v, mask=mask, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    assert not torch.isnan(out).any()
    # same as an additive mask of 0 / -inf
    add = torch.zeros(shape, dtype=F64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(exact_attention(q, k, v, attn_mask=add, causal=causal), out)


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_additive_mask(gen, shape):
    q, k, v = qkv64(gen, B=B_, Hq=H_, Sq=SQ_, Sk=SK_, D=8)
    mask = randn(gen, *shape, dtype=F64, scale=2.0)
    out, lse = exact_attention(q, k, v, attn_mask=mask, return_lse=True)
    ref, ref_lse = naive_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    # a mask constant along keys leaves the output alone but shifts lse
    if shape[-1] == 1:
        torch.testing.assert_close(out, exact_attention(q, k, v))
    else:
        assert not torch.allclose(out, exact_attention(q, k, v))


def test_float32_additive_mask_on_bf16_inputs(gen):
    q, k, v = make_qkv(gen, Hq=2, Sq=9, Sk=11, D=16, dtype=torch.bfloat16)
    mask = randn(gen, 9, 11)
    out = exact_attention(q, k, v, attn_mask=mask)
    ref, _ = naive_attention(q, k, v, mask=mask)
    assert out.dtype == torch.bfloat16 and rel_l2(out, ref) < 5e-3


# --- GQA / MQA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (4, 1), (6, 3)], ids=["gqa4-2", "mqa4-1", "gqa6-3"])
@pytest.mark.parametrize("fn", ["exact", "fake-int8", "fake-int4", "fake-fp8", "api-int8-fp8"])
def test_gqa_equals_repeated_heads(gen, Hq, Hkv, fn):
    q, k, v = make_qkv(gen, B=2, Hq=Hq, Hkv=Hkv, Sq=37, Sk=70, D=32)
    kr, vr = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    assert torch.equal(expand_kv(k, Hq), kr)
    if fn == "exact":
        a, b = exact_attention(q, k, v, causal=True), exact_attention(q, kr, vr, causal=True)
    elif fn.startswith("fake"):
        p = fn.split("-", 1)[1]
        a = fake_quant_attention(q, k, v, p, causal=True, return_lse=True)
        b = fake_quant_attention(q, kr, vr, p, causal=True, return_lse=True)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        a, b = a[0], b[0]
    else:
        a, b = qflash.attention(q, k, v, quant="int8-fp8"), qflash.attention(q, kr, vr, quant="int8-fp8")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and query heads sharing a kv head still differ (the mapping is h // (Hq // Hkv), not h % Hkv)
    q2 = q.clone()
    q2[:, 1:] = q[:, :1]
    a2 = exact_attention(q2, k, v)
    if Hq // Hkv > 1:
        torch.testing.assert_close(a2[:, 1], a2[:, 0])


# --- lse, fully masked rows -------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lse_matches_logsumexp(gen, causal):
    q, k, v = qkv64(gen, B=2, Hq=3, Sq=20, Sk=30, D=16)
    mask = randn(gen, 2, 1, 20, 30, dtype=F64)
    scale = 0.3
    _, lse = exact_attention(q, k, v, attn_mask=mask, causal=causal, scale=scale, return_lse=True)
    s = q @ k.transpose(-1, -2) * scale + mask
    if causal:
        keep = torch.ones(20, 30, dtype=torch.bool).tril(diagonal=30 - 20)
        s = s.masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1).float())


@pytest.mark.parametrize("fn", ["exact"] + [f"fake-{p}" for p in PRESET_NAMES])
@pytest.mark.parametrize("kind", ["bool", "additive-inf"])
def test_fully_masked_rows_are_zero(gen, fn, kind):
    q, k, v = make_qkv(gen, B=1, Hq=2, Sq=6, Sk=70, D=32)
    keep = torch.rand(1, 2, 6, 70, generator=gen) < 0.5
    keep[0, 0, 2] = False  # one fully masked row in head 0
    keep[0, 1, :, :] = False  # every row of head 1
    keep[0, 1, 4, 69] = True  # ... but one key of one row
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    if fn == "exact":
        out, lse = exact_attention(q, k, v, attn_mask=mask, return_lse=True)
    else:
        out, lse = fake_quant_attention(q, k, v, fn[5:], attn_mask=mask, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    dead = ~keep.any(dim=-1)
    assert dead.sum() == 6
    assert (out[dead] == 0).all()
    assert torch.isneginf(lse[dead]).all() and torch.isfinite(lse[~dead]).all()
    # a row with a single key returns that key's value
    torch.testing.assert_close(out[0, 1, 4], v[0, 1, 69], rtol=0.07, atol=0.07)


def test_no_keys_at_all(gen):
    q, k, v = make_qkv(gen, Hq=2, Sq=4, Sk=0, D=16)
    out, lse = exact_attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 4, 16) and (out == 0).all() and torch.isneginf(lse).all()
    for p in PRESET_NAMES:
        out, lse = fake_quant_attention(q, k, v, p, return_lse=True)
        assert (out == 0).all() and torch.isneginf(lse).all(), p


# --- fake-quant against exact --------------------------------------------------------------------

FQ_SHAPES = [  # (B, Hq, Hkv, Sq, Sk, D)
    pytest.param(1, 2, 2, 1, 1, 64, id="S1"),
    pytest.param(1, 2, 2, 63, 63, 64, id="S63"),
    pytest.param(1, 2, 2, 200, 130, 128, id="Sq200-Sk130"),
    pytest.param(2, 4, 2, 17, 100, 96, id="gqa-Sq17-Sk100"),
]
FQ_MASKS = ["none", "causal", "bool", "additive", "causal+bool"]


@pytest.mark.parametrize("masking", FQ_MASKS)
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Sk, D", FQ_SHAPES)
def test_fake_quant_none_fp32_is_exact(gen, B, Hq, Hkv, Sq, Sk, D, masking):
    q, k, v = make_qkv(gen, B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D)
    mask = None
    if "bool" in masking:
        mask = torch.rand(B, 1, Sq, Sk, generator=gen) < 0.8
    elif masking == "additive":
        mask = randn(gen, 1, Hq, Sq, Sk)
    causal = "causal" in masking
    out, lse = fake_quant_attention(q, k, v, "none", causal=causal, attn_mask=mask, return_lse=True)
    ref, ref_lse = exact_attention(q.double(), k.double(), v.double(), causal=causal,
                                   attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double(),
                                   return_lse=True)
    assert out.dtype == torch.float32
    assert rel_l2(out, ref) < 1e-5
    assert (out - ref).abs().max() < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_n", [16, 32, 128], ids=lambda b: f"block_n{b}")
def test_fake_quant_tile_width(gen, block_n):
    """The tile width only changes float rounding for float P·V."""
    q, k, v = make_qkv(gen, Hq=2, Sq=50, Sk=300, D=64)
    a = fake_quant_attention(q, k, v, "int8", block_n=block_n, causal=True)
    b = fake_quant_attention(q, k, v, "int8", block_n=64, causal=True)
    assert rel_l2(a, b) < 1e-6


# lse of the quantised presets stays close to the exact one (the kernels return it for backward)
LSE_TOL = {"none": 0.01, "int8": 0.03, "int8-fp8": 0.03, "int4": 0.5, "fp8": 0.1}


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_fake_quant_lse(gen, preset):
    q, k, v = make_qkv(gen, Hq=2, Sq=300, Sk=300, D=128)
    k = k + 0.5  # a key mean, so K smoothing's lse correction matters
    _, lse = fake_quant_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), preset, causal=True, return_lse=True)
    _, ref = exact_attention(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 300)
    assert (lse - ref).abs().max() < LSE_TOL[preset]


# hypothesis: small random shapes, any dtype, masks and causal; int8 within budget, never NaN
INT8_SMALL_BUDGET = 0.02  # measured max over 400 random small shapes: 1.0%


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3),
    Sq=st.integers(1, 80), Sk=st.integers(1, 80), D=st.sampled_from([8, 16, 32, 64, 96, 128]),
    causal=st.booleans(), masked=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_int8_within_budget(B, Hkv, group, Sq, Sk, D, causal, masked, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(gen, B=B, Hq=Hkv * group, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D)
    mask = (torch.rand(B, 1, Sq, Sk, generator=gen) < 0.75) if masked else None
    out, lse = fake_quant_attention(q.to(dtype), k.to(dtype), v.to(dtype), "int8", causal=causal,
                                    attn_mask=mask, return_lse=True)
    ref, ref_lse = exact_attention(q.double(), k.double(), v.double(), causal=causal, attn_mask=mask,
                                   return_lse=True)
    assert out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    assert rel_l2(out, ref) <= INT8_SMALL_BUDGET


PROPERTY_BUDGET = {"none": 6e-3, "int8": 0.025, "int8-fp8": 0.095, "int4": 0.28, "fp8": 0.145}


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(
    Hkv=st.integers(1, 2), group=st.integers(1, 2), Sq=st.integers(0, 70), Sk=st.integers(0, 70),
    D=st.sampled_from([8, 32, 64]), causal=st.booleans(), seed=st.integers(0, 2**31 - 1),
    preset=st.sampled_from(PRESET_NAMES),
)
def test_property_every_preset_finite(Hkv, group, Sq, Sk, D, causal, preset, seed):
    """No NaN or inf in any preset's output, including empty and fully causal-masked rows."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(gen, Hq=Hkv * group, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, dtype=torch.bfloat16)
    out = fake_quant_attention(q, k, v, preset, causal=causal)
    ref = exact_attention(q, k, v, causal=causal)
    assert torch.isfinite(out).all()
    # ~1.7-2x the max measured over 1500 random draws of these strategies (bf16, tiny shapes):
    # none 2.9e-3, int8 1.22e-2, int8-fp8 4.7e-2, int4 0.163, fp8 7.3e-2
    assert rel_l2(out, ref) < PROPERTY_BUDGET[preset]
    dead = torch.arange(Sq) + Sk - Sq < 0 if causal else torch.zeros(Sq, dtype=torch.bool) | (Sk == 0)
    assert (out[:, :, dead] == 0).all()


# --- error budgets (issue 2): qflash.attention on CPU vs fp64 exact -------------------------------

BUDGET_SEEDS = (0, 1, 2, 3)
# asserted bounds: measured max over 8 seeds + a small margin (issue 2's budgets in comments)
BUDGETS = {  # preset: (max rel. L2, min cosine)
    "none": (0.0040, 0.99999),  # issue: <= 0.5%
    "int8": (0.0110, 0.99994),  # issue: <= 1.5%
    "int8-fp8": (0.0390, 0.99920),  # issue: <= 4.5%
    "int4": (0.1780, 0.98400),  # issue: <= 18%
    "fp8": (0.0550, 0.99840),  # issue: <= 6%
}


@pytest.fixture(scope="module")
def budget_measurements():
    """{preset: [(relL2, cosine) per seed]}: N(0,1), B=1, H=4, S=1024, D=128, bf16 in, fp64 exact."""
    res = {p: [] for p in PRESET_NAMES}
    for s in BUDGET_SEEDS:
        g = torch.Generator().manual_seed(s)
        q, k, v = (randn(g, 1, 4, 1024, 128) for _ in range(3))
        ref = exact_attention(q.double(), k.double(), v.double())
        for p in PRESET_NAMES:
            out = qflash.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), quant=p)
            assert out.dtype == torch.bfloat16
            res[p].append((rel_l2(out, ref), cosine(out, ref)))
    return res


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_error_budget(budget_measurements, preset):
    max_rel, min_cos = BUDGETS[preset]
    for seed, (rel, cos) in zip(BUDGET_SEEDS, budget_measurements[preset]):
        assert rel <= max_rel, f"{preset} seed {seed}: relL2 {rel:.4%} > {max_rel:.2%}"
        assert cos >= min_cos, f"{preset} seed {seed}: cosine {cos:.6f} < {min_cos}"


def test_error_budgets_are_ordered(budget_measurements):
    mean = {p: sum(r for r, _ in v) / len(v) for p, v in budget_measurements.items()}
    assert mean["none"] < mean["int8"] < mean["int8-fp8"] < mean["fp8"] < mean["int4"]


def test_error_table(budget_measurements):
    """Prints the README table (run with ``-s``); the "asserted bound" column holds for the mean,
    and each seed's cosine agrees with its relL2 (1 - cos <= ~relL2^2 / 2: the angle's sine is at
    most relL2), so the two columns cannot drift apart."""
    lines = [
        "",
        (
            "qflash.attention on CPU vs fp64 exact; N(0,1), B=1 H=4 S=1024 D=128, bf16 inputs, "
            f"mean over seeds {list(BUDGET_SEEDS)}"
        ),
        "",
        "| preset | rel. L2 error | cosine | asserted bound |",
        "|---|---|---|---|",
    ]
    for p in PRESET_NAMES:
        rels, coss = zip(*budget_measurements[p])
        lines.append(f"| `{p}` | {sum(rels) / len(rels):.3%} | {sum(coss) / len(coss):.6f} | <= {BUDGETS[p][0]:.2%} |")
        assert all(math.isfinite(x) for x in rels + coss)
        assert sum(rels) / len(rels) <= BUDGETS[p][0] and sum(coss) / len(coss) >= BUDGETS[p][1]
        for r, c in zip(rels, coss):
            assert 0 <= 1 - c <= 0.51 * r * r + 1e-12, (p, r, c)
    print("\n".join(lines))
