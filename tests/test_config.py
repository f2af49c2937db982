"""qflash.config: presets, validation in __post_init__, resolve_quant, immutability."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import PRESET_NAMES

import qflash
from qflash.config import (
    PRESETS,
    Granularity,
    GranularityKind,
    OperandQuant,
    Precision,
    QuantConfig,
    Strategy,
    resolve_quant,
)

I8 = OperandQuant(Precision.INT8)
I4 = OperandQuant(Precision.INT4)
F8 = OperandQuant(Precision.FP8_E4M3)
F8_V = OperandQuant(Precision.FP8_E4M3, Granularity.channel(128))
F8_P = OperandQuant(Precision.FP8_E4M3, Granularity.tensor())
F16 = OperandQuant(Precision.FP16)


# --- presets ------------------------------------------------------------------------------------


def test_preset_names():
    assert set(PRESETS) == set(PRESET_NAMES)
    assert qflash.PRESETS is PRESETS


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_resolves(name):
    cfg = resolve_quant(name)
    assert isinstance(cfg, QuantConfig)
    assert cfg is PRESETS[name]
    assert cfg.name == name
    assert resolve_quant(cfg) is cfg  # a config passes through unchanged


# what each preset quantises (issue 2 / DESIGN.md recipe)
PRESET_EXPECT = [
    pytest.param("none", None, None, False, id="none"),
    pytest.param("int8", Precision.INT8, None, True, id="int8"),
    pytest.param("int8-fp8", Precision.INT8, Precision.FP8_E4M3, True, id="int8-fp8"),
    pytest.param("int4", Precision.INT4, None, True, id="int4"),
    pytest.param("fp8", Precision.FP8_E4M3, Precision.FP8_E4M3, True, id="fp8"),
]


@pytest.mark.parametrize("name, qk, pv, smooth_k", PRESET_EXPECT)
def test_preset_contents(name, qk, pv, smooth_k):
    cfg = PRESETS[name]
    assert cfg.quantizes_qk == (qk is not None)
    assert cfg.quantizes_pv == (pv is not None)
    if qk is not None:
        assert cfg.q.precision is qk and cfg.k.precision is qk
    if pv is not None:
        assert cfg.p.precision is pv and cfg.v.precision is pv
        assert cfg.p.granularity.kind is GranularityKind.TENSOR
        assert cfg.v.granularity.kind is GranularityKind.CHANNEL
    assert cfg.smooth_k is smooth_k
    assert cfg.smooth_q is (name == "int4")


def test_with_renames_and_validates():
    cfg = PRESETS["int8"].with_(smooth_k=False)
    assert cfg.name == "custom" and cfg.smooth_k is False
    assert PRESETS["int8"].smooth_k is True  # the preset is untouched
    assert PRESETS["int8"].with_(name="mine").name == "mine"
    with pytest.raises(ValueError, match="q_mean_block"):
        PRESETS["int4"].with_(q_mean_block=0)


# --- frozen / hashable --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_frozen_and_hashable(name):
    cfg = PRESETS[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.smooth_k = not cfg.smooth_k  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.q.precision = Precision.INT4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.v.granularity.size = 3  # type: ignore[misc]
    # equal configs hash equal: usable as cache keys
    twin = dataclasses.replace(cfg)
    assert twin == cfg and hash(twin) == hash(cfg)
    assert {cfg: 1}[twin] == 1


def test_distinct_presets_differ():
    cfgs = list(PRESETS.values())
    assert len(set(cfgs)) == len(cfgs)


def test_enums_accept_strings():
    op = OperandQuant("int8", Granularity("block", 64), "asymmetric")
    assert op.precision is Precision.INT8
    assert op.granularity.kind is GranularityKind.BLOCK and op.granularity.size == 64
    assert op.strategy is Strategy.ASYMMETRIC
    assert op == OperandQuant(Precision.INT8, Granularity.block(64), Strategy.ASYMMETRIC)
    assert str(Granularity.group(32)) == "group(32)" and str(Granularity.token()) == "token"


def test_precision_properties():
    assert Precision.INT8.qmax == 127 and Precision.INT4.qmax == 7 and Precision.FP8_E4M3.qmax == 448
    assert Precision.INT8.code_range == (-128, 127) and Precision.INT4.code_range == (-8, 7)
    assert all(p.is_float for p in (Precision.FP16, Precision.BF16, Precision.FP32))
    assert not Precision.FP8_E4M3.is_float and not Precision.FP8_E4M3.is_integer
    assert Granularity.token().token_block == 1 and Granularity.block(64).token_block == 64
    assert Granularity.group(32).token_block is None


def test_legal_custom_configs():
    """Combinations the docstring allows construct, keep what they were given, and run: the
    fake-quant reference on N(0,1) fp32 inputs (1x2x96x160, D 64) is finite and within ~1.5x the
    relL2 vs exact fp64 measured for each (in the comments)."""
    from helpers import make_qkv, rel_l2

    from qflash.reference import exact_attention, fake_quant_attention

    cases = [
        (QuantConfig(q=I8, k=I8), 0.013),  # measured 8.4e-3
        (QuantConfig(q=I4, k=I4, smooth_q=True, smooth_k=True, q_mean_block=64), 0.22),  # 0.147
        (QuantConfig(q=F8, k=F8, v=F8_V, p=F8_P, smooth_v=True), 0.072),  # 4.76e-2
        (QuantConfig(q=OperandQuant("int8", Granularity.group(32)),
                     k=OperandQuant("int8", Granularity.block(64))), 0.015),  # 9.7e-3
        (QuantConfig(q=OperandQuant("int8", strategy="asymmetric"),
                     k=OperandQuant("int8", strategy="asymmetric")), 0.012),  # 7.4e-3
        (QuantConfig(v=OperandQuant("fp8_e4m3", Granularity.tensor()), p=F8_P), 0.05),  # 3.37e-2
        (QuantConfig(q=F16, k=F16), 1e-6),  # float Q/K: "the input dtype"; 3.1e-7
    ]
    assert cases[0][0].q == I8 and cases[0][0].k == I8
    assert cases[1][0].smooth_q and cases[1][0].smooth_k and cases[1][0].q_mean_block == 64
    assert cases[2][0].v == F8_V and cases[2][0].p == F8_P and cases[2][0].smooth_v
    assert cases[4][0].q.strategy == cases[4][0].k.strategy == "asymmetric"
    q, k, v = make_qkv(torch.Generator().manual_seed(0), Hq=2, Sq=96, Sk=160, D=64)
    exact = exact_attention(q.double(), k.double(), v.double())
    for cfg, bound in cases:
        out = fake_quant_attention(q, k, v, cfg)
        assert torch.isfinite(out).all()
        assert rel_l2(out, exact) < bound, (cfg, rel_l2(out, exact))


# --- rejections ---------------------------------------------------------------------------------

GRANULARITY_BAD = [
    pytest.param(lambda: Granularity.block(0), "size", id="block-0"),
    pytest.param(lambda: Granularity.block(-4), "size", id="block-negative"),
    pytest.param(lambda: Granularity.group(0), "size", id="group-0"),
    pytest.param(lambda: Granularity(GranularityKind.TOKEN, 4), "size", id="token-with-size"),
    pytest.param(lambda: Granularity(GranularityKind.TENSOR, 1), "size", id="tensor-with-size"),
    pytest.param(lambda: Granularity.channel(-1), "size", id="channel-negative"),
    pytest.param(lambda: Granularity("rows", 4), "rows", id="unknown-kind"),
]


@pytest.mark.parametrize("make, field", GRANULARITY_BAD)
def test_granularity_rejects(make, field):
    with pytest.raises(ValueError, match=field):
        make()


OPERAND_BAD = [
    pytest.param(lambda: OperandQuant(Precision.FP8_E4M3, strategy=Strategy.ASYMMETRIC), "strategy=asymmetric",
                 id="asymmetric-fp8"),
    pytest.param(lambda: OperandQuant(Precision.FP16, strategy=Strategy.ASYMMETRIC), "strategy=asymmetric",
                 id="asymmetric-fp16"),
    pytest.param(lambda: OperandQuant(Precision.INT4, Granularity.channel()), "int4.*granularity",
                 id="int4-channel"),
    pytest.param(lambda: OperandQuant("int2"), "int2", id="unknown-precision"),
    pytest.param(lambda: OperandQuant("int8", strategy="sym"), "sym", id="unknown-strategy"),
]


@pytest.mark.parametrize("make, match", OPERAND_BAD)
def test_operand_rejects(make, match):
    with pytest.raises(ValueError, match=match):
        make()


CONFIG_BAD = [
    pytest.param(dict(q=I8), "q and k", id="q-int8-k-float"),
    pytest.param(dict(k=I8), "q and k", id="q-float-k-int8"),
    pytest.param(dict(q=I8, k=I4), "q and k", id="q-int8-k-int4"),
    pytest.param(dict(q=I8, k=F8), "q and k", id="q-int8-k-fp8"),
    pytest.param(dict(q=F8, k=I4), "q and k", id="q-fp8-k-int4"),
    pytest.param(dict(v=F8_V), "p and v", id="v-fp8-p-float"),
    pytest.param(dict(p=F8_P), "p and v", id="p-fp8-v-float"),
    pytest.param(dict(v=OperandQuant("int8", Granularity.tensor()), p=OperandQuant("int8", Granularity.tensor())),
                 "p=int8, v=int8", id="pv-int8"),
    pytest.param(dict(v=F8_V, p=OperandQuant("int8", Granularity.tensor())), "p=int8", id="p-int8-v-fp8"),
    pytest.param(dict(q=OperandQuant("int8", Granularity.channel()), k=I8), "q granularity", id="q-channel"),
    pytest.param(dict(q=I8, k=OperandQuant("int8", Granularity.channel(64))), "k granularity", id="k-channel"),
    pytest.param(dict(v=OperandQuant("fp8_e4m3", Granularity.token()), p=F8_P), "v granularity", id="v-token"),
    pytest.param(dict(v=OperandQuant("fp8_e4m3", Granularity.block(64)), p=F8_P), "v granularity", id="v-block"),
    pytest.param(dict(v=F8_V, p=OperandQuant("fp8_e4m3", Granularity.token())), "p granularity", id="p-token"),
    pytest.param(dict(q=I8, k=I8, q_mean_block=0), "q_mean_block", id="q_mean_block-0"),
    pytest.param(dict(smooth_k=True), "smooth_k", id="smooth_k-float"),
    pytest.param(dict(smooth_q=True), "smooth_q", id="smooth_q-float"),
    pytest.param(dict(q=I8, k=I8, smooth_v=True), "smooth_v", id="smooth_v-float-v"),
]


@pytest.mark.parametrize("kwargs, field", CONFIG_BAD)
def test_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


# --- resolve_quant ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["int16", "INT8", "", "int8 "], ids=["int16", "upper", "empty", "trailing-space"])
def test_resolve_unknown_name_lists_presets(bad):
    with pytest.raises(ValueError, match="quant=.*not a preset") as info:
        resolve_quant(bad)
    for name in PRESET_NAMES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("bad", [None, 8, 1.5, Precision.INT8.qmax, ["int8"], PRESETS["int8"].q],
                         ids=["None", "int", "float", "qmax", "list", "OperandQuant"])
def test_resolve_wrong_type(bad):
    with pytest.raises(TypeError, match="quant must be"):
        resolve_quant(bad)
