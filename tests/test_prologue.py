"""Issue 16: the attention prologue that writes quantised operands (``qflash.fused.qkv_prologue``),
the pre-quantised K/V object (``qflash.QuantizedKV`` / ``qflash.quantize_kv``) and
``qflash.attention(q, qkv)`` on every family that reads it.

* the Triton prologue (CPU interpreter) against the unfused path it replaces — ``rmsnorm_rope``
  of q and k, the V concat, then ``quantize_kv_reference`` — on poisoned outputs;
* ``qflash.attention(q, qkv)``: the reference family bit-identical to ``fake_quant_attention`` on
  the same K/V; the portable kernel (interpreter) against the fake-quant reference on the same
  codes and against exact attention; the unfused ``qflash.attention(q, k, v)`` path;
* validation (preset mismatch, shapes, dtype, device, unsupported presets, gradients);
* on an sm_90 GPU (``gpu``): the Hopper family on a QuantizedKV against its own unfused path.
"""

from __future__ import annotations

import pytest
import torch
from helpers import randn, rel_l2

import qflash
from qflash.config import resolve_quant
from qflash.fused.qkv_prologue import (
    quantize_kv_triton,
    rmsnorm_rope_quantize,
    rmsnorm_rope_quantize_reference,
    rmsnorm_rope_quantize_triton,
)
from qflash.fused.rmsnorm_rope import rmsnorm_rope_reference, rmsnorm_rope_triton
from qflash.kernels.common import interpreter_enabled
from qflash.quant.kv import QuantizedKV, hopper_key_order, quantize_kv_reference
from qflash.reference import exact_attention, fake_quant_attention, fake_quant_attention_kv

if interpreter_enabled():  # bf16/fp8 conversions as the GPU does them (tests/triton_interpreter_shim.py)
    import triton_interpreter_shim

    triton_interpreter_shim.apply()

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PRESETS = ["int8", "int8-fp8", "fp8"]


def _flux_parts(gen, B, S_txt, S_img, H, D, dtype=torch.bfloat16):
    """Projection outputs as Flux's processor has them (B, S, H, D) — strided views of (B, S, H·D)
    buffers, scaled/shifted like real K — norm weights, rotary tables."""
    def part(S, scale=1.0, shift=0.0):
        return (randn(gen, B, S, H * D, scale=scale) + shift).to(dtype).to(DEV).unflatten(-1, (H, D))

    q, k, v = part(S_img), part(S_img, 3.0, 1.0), part(S_img, 2.0)
    qp, kp, vp = (part(S_txt), part(S_txt, 3.0, -0.5), part(S_txt)) if S_txt else (None, None, None)
    w = [(torch.rand(D, generator=gen) + 0.5).to(DEV) for _ in range(4)]
    ang = torch.rand(S_txt + S_img, D // 2, generator=gen) * 6
    cos, sin = (f(ang).repeat_interleave(2, -1).to(DEV) for f in (torch.cos, torch.sin))
    kw = dict(norm_q=w[0], norm_k=w[1], eps=1e-6, cos=cos, sin=sin, q_prefix=qp, k_prefix=kp, v_prefix=vp,
              norm_q_prefix=w[2] if S_txt else None, norm_k_prefix=w[3] if S_txt else None)
    return q, k, v, kw


def _unfused(q, k, v, kw, cfg, v_order):
    """What the prologue replaces: rmsnorm_rope (Triton) of q and k, the V concat, the quantiser."""
    qq = rmsnorm_rope_triton(q, kw["norm_q"], kw["cos"], kw["sin"], kw["eps"], x_prefix=kw["q_prefix"],
                             weight_prefix=kw["norm_q_prefix"])
    kk = rmsnorm_rope_triton(k, kw["norm_k"], kw["cos"], kw["sin"], kw["eps"], x_prefix=kw["k_prefix"],
                             weight_prefix=kw["norm_k_prefix"])
    vv = torch.cat([kw["v_prefix"], v], dim=1) if kw["v_prefix"] is not None else v
    return qq, kk, vv, quantize_kv_reference(kk.transpose(1, 2), vv.transpose(1, 2), cfg, v_order)


def _poisoned_empty(real):
    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.dtype == torch.int8:
            t.fill_(-128)  # symmetric INT8 codes stop at -127
        elif t.dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
        elif t.is_floating_point():
            t.fill_(float("nan"))
        return t
    return empty


def _assert_same_q(got: torch.Tensor, want: torch.Tensor):
    """The prologue's q against rmsnorm_rope_triton's: bit for bit on the interpreter; on a GPU the two
    kernels may contract or order fp32 steps differently, so an element may land one ulp away."""
    if got.device.type == "cpu":
        assert torch.equal(got, want)
        return
    a, b = got.double(), want.double()
    # within a few ulps elementwise, and ~ the dtype's rounding overall (one ulp everywhere ~ 3e-3)
    ulp = torch.finfo(got.dtype).eps * torch.maximum(a.abs(), b.abs()) + torch.finfo(got.dtype).tiny
    assert ((a - b).abs() <= 4 * ulp).all(), (a - b).abs().max().item()
    assert rel_l2(a, b) < 2e-3


def _assert_same_scales(got: torch.Tensor, want: torch.Tensor):
    """Scales from the same maxima: equal on the interpreter, within an ulp or two on a GPU."""
    if got.is_cuda:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    else:
        assert torch.equal(got, want)


def _assert_same_kv(got: QuantizedKV, want: QuantizedKV):
    assert got.quant is want.quant and got.v_order == want.v_order and got.dtype == want.dtype
    # K codes: the K mean is summed in another order than torch.mean, so a code on a rounding
    # boundary may move one step (measured on the interpreter: 0 codes moved)
    diff = (got.k.float() - want.k.float()).abs()
    step = 1.0 if got.k.dtype == torch.int8 else 64.0  # FP8: one e4m3 step at the largest codes
    assert diff.max().item() <= step and (diff > 0).float().mean().item() < 1e-3
    torch.testing.assert_close(got.k_scale, want.k_scale, rtol=1e-6, atol=0)
    if want.k_mean is not None:
        # atol on a GPU: a mean near zero summed in another order (measured 3.8e-6 on an H200, bf16)
        torch.testing.assert_close(got.k_mean, want.k_mean, rtol=1e-5, atol=1e-5 if got.k_mean.is_cuda else 1e-6)
    if want.quant.quantizes_pv:
        # e4m3 codes (zero padding included): Triton's fp32 -> e4m3 conversion and PyTorch's differ
        # by one step on a few values (measured 0.13 % on the interpreter with the shim; an H200
        # 0.15 %, tests/test_hopper.py); the scales are the same fp32 numbers
        a, b = got.v.float(), want.v.float()
        step = 2.0 ** (torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp(min=2.0 ** -6))) - 3)
        assert ((a - b).abs() <= step).all() and (a != b).float().mean().item() < 1e-2
        # the same maxima; on a GPU Triton's fp32 division is not IEEE-rounded (one ulp apart)
        _assert_same_scales(got.v_scale, want.v_scale)
    else:
        assert torch.equal(got.v, want.v)


# ---------------------------------------------------------------------------------------------
# the Triton prologue against the unfused path
# ---------------------------------------------------------------------------------------------
@pytest.mark.interpreter
@pytest.mark.parametrize("preset, B, S_txt, S_img, H, D, v_order", [
    pytest.param("int8-fp8", 1, 32, 96, 2, 128, "hopper", id="int8-fp8-double-D128-hopper"),
    pytest.param("int8", 1, 32, 96, 2, 128, "keys", id="int8-double-D128"),
    pytest.param("fp8", 2, 17, 43, 1, 64, "keys", id="fp8-double-awkward-B2-keys"),
    pytest.param("int8", 2, 17, 43, 1, 64, "keys", id="int8-double-awkward-B2"),
    pytest.param("int8-fp8", 1, 0, 200, 1, 64, "hopper", id="int8-fp8-single-S200"),
])
def test_prologue_matches_unfused_path(gen, monkeypatch, preset, B, S_txt, S_img, H, D, v_order):
    """Each output poisoned first; q bit-identical to rmsnorm_rope_triton's, K/V to the quantisers'."""
    cfg = resolve_quant(preset)
    q, k, v, kw = _flux_parts(gen, B, S_txt, S_img, H, D)
    inputs = [t.clone() for t in (q, k, v)]
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", _poisoned_empty(torch.empty))
        q_out, qkv = rmsnorm_rope_quantize_triton(q, k, v, cfg, v_order=v_order, **kw)
    qq, _, _, want = _unfused(q, k, v, kw, cfg, v_order)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v)))  # inputs untouched
    assert q_out.is_contiguous()
    _assert_same_q(q_out, qq)  # rmsnorm_rope's arithmetic
    _assert_same_kv(qkv, want)
    if cfg.quantizes_pv:  # the unfused Triton path (rmsnorm_rope + kv_quant, the Hopper family's)
        from qflash.kernels.kv_quant import quantize_kv

        kk = rmsnorm_rope_triton(k, kw["norm_k"], kw["cos"], kw["sin"], kw["eps"], x_prefix=kw["k_prefix"],
                                 weight_prefix=kw["norm_k_prefix"])
        vv = torch.cat([kw["v_prefix"], v], dim=1) if kw["v_prefix"] is not None else v
        kc, ks, vt, vs, _ = quantize_kv(kk.transpose(1, 2), vv.transpose(1, 2), cfg, 128, v_permuted=v_order == "hopper")
        # V: bit for bit (a maximum does not depend on the order); K: the mean is summed per head
        # group in another order than kv_quant's, a code may move one step (measured: none moved)
        assert torch.equal(qkv.v.view(torch.uint8), vt.view(torch.uint8))
        _assert_same_scales(qkv.v_scale, vs)
        diff = (qkv.k.float() - kc.float()).abs()
        assert diff.max().item() <= (1 if kc.dtype == torch.int8 else 64) and (diff > 0).float().mean() < 1e-3
        torch.testing.assert_close(qkv.k_scale, ks, rtol=1e-6, atol=0)
    if cfg.quantizes_pv and v_order == "keys":  # and the order is what the Hopper order permutes
        hop = rmsnorm_rope_quantize_triton(q, k, v, cfg, v_order="hopper", **kw)[1].v
        col = hopper_key_order(hop.shape[-1], hop.device)
        assert torch.equal(hop.view(torch.uint8)[..., col], qkv.v.view(torch.uint8))


@pytest.mark.interpreter
@pytest.mark.parametrize("preset", ["int8", "fp8"])
def test_quantize_kv_triton_matches_torch(gen, monkeypatch, preset):
    """qflash.quantize_kv's Triton path (no norm, no rotation; HND and strided NHD inputs)."""
    cfg = resolve_quant(preset)
    kn = (randn(gen, 1, 150, 2, 64, scale=2.0) + 0.7).to(torch.bfloat16).to(DEV)  # NHD buffer
    vn = randn(gen, 1, 150, 2, 64).to(torch.bfloat16).to(DEV)
    k, v = kn.transpose(1, 2), vn.transpose(1, 2)  # strided HND views
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", _poisoned_empty(torch.empty))
        got = quantize_kv_triton(k, v, cfg, "hopper" if cfg.quantizes_pv else "keys")
    _assert_same_kv(got, quantize_kv_reference(k, v, cfg, "hopper" if cfg.quantizes_pv else "keys"))
    via_api = qflash.quantize_kv(kn, vn, preset, layout="NHD", v_order="keys", backend="triton")
    _assert_same_kv(via_api, quantize_kv_reference(k, v, cfg, "keys"))


def test_prologue_reference_is_the_unfused_definition(gen):
    """rmsnorm_rope_quantize on CPU (its PyTorch path) = rmsnorm_rope_reference + quantize_kv_reference."""
    q, k, v, kw = _flux_parts(gen, 1, 20, 70, 2, 64)
    q = q.cpu()
    kwc = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    q_out, qkv = rmsnorm_rope_quantize(q, k.cpu(), v.cpu(), "int8-fp8", **kwc)
    qq = rmsnorm_rope_reference(q, kwc["norm_q"], kwc["cos"], kwc["sin"], 1e-6, x_prefix=kwc["q_prefix"],
                                weight_prefix=kwc["norm_q_prefix"])
    kk = rmsnorm_rope_reference(k.cpu(), kwc["norm_k"], kwc["cos"], kwc["sin"], 1e-6, x_prefix=kwc["k_prefix"],
                                weight_prefix=kwc["norm_k_prefix"])
    vv = torch.cat([kwc["v_prefix"], v.cpu()], dim=1)
    want = quantize_kv_reference(kk.transpose(1, 2), vv.transpose(1, 2), resolve_quant("int8-fp8"))
    assert torch.equal(q_out, qq)
    assert torch.equal(qkv.k, want.k) and torch.equal(qkv.k_scale, want.k_scale) and torch.equal(qkv.v, want.v)


# ---------------------------------------------------------------------------------------------
# qflash.attention on a QuantizedKV
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("v_order", ["keys", "hopper"])
@pytest.mark.parametrize("case", ["plain", "gqa-causal-lse", "mask-nhd", "scale"])
def test_reference_family_is_bit_identical(gen, preset, v_order, case):
    """On the same codes (torch quantiser) attention(q, qkv) is fake_quant_attention(q, k, v) exactly."""
    B, Hq, Hkv, Sq, Sk, D = (2, 4, 2, 37, 130, 64) if case == "gqa-causal-lse" else (1, 2, 2, 50, 77, 64)
    q = randn(gen, B, Hq, Sq, D).to(torch.bfloat16)
    k = (randn(gen, B, Hkv, Sk, D, scale=2.0) + 0.5).to(torch.bfloat16)
    v = randn(gen, B, Hkv, Sk, D).to(torch.bfloat16)
    kw = dict(causal=case == "gqa-causal-lse", return_lse=True)
    if case == "mask-nhd":
        kw["attn_mask"] = torch.rand(B, 1, Sq, Sk, generator=gen) < 0.7
    if case == "scale":
        kw["scale"] = -0.2
    qkv = qflash.quantize_kv(k, v, preset, v_order=v_order, backend="torch")
    with torch.no_grad():
        if case == "mask-nhd":
            out, lse = qflash.attention(q.transpose(1, 2).contiguous(), qkv, layout="NHD", **kw)
            out = out.transpose(1, 2)
        else:
            out, lse = qflash.attention(q, qkv, **kw)
    want, want_lse = fake_quant_attention(q, k, v, preset, **kw)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.interpreter
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("B, Hq, Hkv, Sq, Sk, D, causal, layout", [
    pytest.param(1, 2, 2, 64, 200, 64, False, "HND", id="S200-D64"),
    pytest.param(2, 4, 2, 33, 129, 128, True, "NHD", id="gqa-causal-nhd-D128"),
    pytest.param(1, 2, 1, 1, 1, 64, False, "HND", id="S1-mqa"),
])
def test_portable_kernel_on_quantized_kv(gen, preset, B, Hq, Hkv, Sq, Sk, D, causal, layout):
    from test_attention_api import _kernel_block_n

    cfg = resolve_quant(preset)
    q = randn(gen, B, Hq, Sq, D).to(torch.bfloat16).to(DEV)
    k = (randn(gen, B, Hkv, Sk, D, scale=2.0) + 0.5).to(torch.bfloat16).to(DEV)
    v = randn(gen, B, Hkv, Sk, D).to(torch.bfloat16).to(DEV)
    qkv = qflash.quantize_kv(k, v, preset, v_order="hopper" if cfg.quantizes_pv else "keys")  # gathered back
    qa = q.transpose(1, 2).contiguous() if layout == "NHD" else q
    with torch.no_grad():
        out, lse = qflash.attention(qa, qkv, causal=causal, layout=layout, return_lse=True, backend="portable")
        unfused = qflash.attention(qa, k if layout == "HND" else k.transpose(1, 2), v if layout == "HND"
                                   else v.transpose(1, 2), quant=preset, causal=causal, layout=layout,
                                   backend="portable")
    if layout == "NHD":
        assert out.is_contiguous()
        out, unfused = out.transpose(1, 2), unfused.transpose(1, 2)
    fq, fq_lse = fake_quant_attention_kv(q, qkv, causal=causal, return_lse=True,
                                         block_n=_kernel_block_n(q, k, cfg))
    exact = exact_attention(q.double(), k.double(), v.double(), causal=causal)
    fin = torch.isfinite(fq_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    err = dict(fq=rel_l2(out, fq), lse=(lse[fin] - fq_lse[fin]).abs().max().item(), exact=rel_l2(out, exact),
               unfused=rel_l2(out, unfused), unfused_exact=rel_l2(unfused, exact))
    # kernel vs the reference on the same codes, measured max over these shapes (bf16 inputs):
    # out int8 1.05e-3, int8-fp8 1.3e-3, fp8 5.3e-3 (test_attention_api: this kernel at 6.0e-4 /
    # 8.4e-3 / 8.5e-3); lse max |diff| int8 5.0e-3, int8-fp8 3.3e-3, fp8 3.2e-2 (Q codes one FP8
    # step apart where Triton's and PyTorch's e4m3 rounding differ move a score)
    # H200: int8 1.68e-3 and int8-fp8 lse 5.1e-3 (GPU fp32 exp2 / division rounding)
    gpu = DEV == "cuda"
    assert err["fq"] < (8e-3 if cfg.quantizes_pv else 2.5e-3 if gpu else 1.6e-3), err
    assert err["lse"] < {"int8": 7.5e-3, "int8-fp8": 7.5e-3 if gpu else 5e-3, "fp8": 5e-2}[preset], err
    assert err["exact"] < {"int8": 0.015, "int8-fp8": 0.058, "fp8": 0.08}[preset], err  # test_attention_api's budgets
    # the unfused path quantises K itself (another K-mean summation; at small sizes inside the
    # kernel, with other P·V tiles, and K per token where the codes here are per 128-key block:
    # launch.one_launch_quant): measured int8 0 (bit-identical) / 1.9e-4 (the small GQA call
    # quantises inside the kernel); the FP8 presets are two quantisations apart (int8-fp8 2.6e-2,
    # fp8 6.9e-2), so each is held to the exact budget instead
    if cfg.quantizes_pv:
        assert err["unfused_exact"] < {"int8-fp8": 0.058, "fp8": 0.08}[preset], err
    else:
        assert err["unfused"] < 3e-4, err


@pytest.mark.interpreter
@pytest.mark.parametrize("preset", ["int8", "int8-fp8"])
def test_fused_prologue_attention_matches_unfused_attention(gen, preset):
    """The whole Flux step: prologue + attention(q, qkv) vs rmsnorm_rope + attention(q, k, v), portable."""
    from test_attention_api import _kernel_block_n

    cfg = resolve_quant(preset)
    q, k, v, kw = _flux_parts(gen, 1, 24, 104, 2, 64)
    q_out, qkv = rmsnorm_rope_quantize_triton(q, k, v, cfg, v_order="keys", **kw)
    qq, kk, vv, _ = _unfused(q, k, v, kw, cfg, "keys")
    with torch.no_grad():
        fused = qflash.attention(q_out, qkv, layout="NHD", backend="portable")
        unfused = qflash.attention(qq, kk, vv, quant=preset, layout="NHD", backend="portable")
        fq = fake_quant_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), cfg,
                                  block_n=_kernel_block_n(qq.transpose(1, 2), kk.transpose(1, 2), cfg))
    # measured: int8 fused == unfused bit for bit; int8-fp8 2.9e-2 (the unfused small call quantises
    # inside the kernel: K per token, other P tiles); fused vs the fake-quant reference int8 8.4e-4,
    # int8-fp8 2.3e-3 (H200: int8-fp8 5.4e-3)
    assert rel_l2(fused.transpose(1, 2), fq) < (1.3e-3 if preset == "int8" else 8e-3 if DEV == "cuda" else 3.5e-3)
    assert rel_l2(fused, unfused) < (1e-6 if preset == "int8" else 4.5e-2)
    assert torch.isfinite(fused).all()


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _small(gen, dtype=torch.bfloat16):
    q = randn(gen, 1, 2, 8, 64).to(dtype)
    k = randn(gen, 1, 2, 10, 64).to(dtype)
    return q, k, randn(gen, 1, 2, 10, 64).to(dtype)


def test_validation_errors_name_the_problem(gen):
    q, k, v = _small(gen)
    qkv = qflash.quantize_kv(k, v, "int8-fp8")
    assert "int8-fp8" in repr(qkv) and qkv.nbytes > 0
    with pytest.raises(ValueError, match="does not match the QuantizedKV's preset 'int8-fp8'"):
        qflash.attention(q, qkv, quant="int8")
    qflash.attention(q, qkv, quant=resolve_quant("int8-fp8").with_(name="same-numbers"))  # equal config: fine
    with pytest.raises(ValueError, match="v must be None"):
        qflash.attention(q, qkv, v)
    with pytest.raises(TypeError, match="dtype K and V had"):
        qflash.attention(q.half(), qkv)
    with pytest.raises(ValueError, match="batch 1 and head dim 64"):
        qflash.attention(randn(gen, 2, 2, 8, 64).to(torch.bfloat16), qkv)
    with pytest.raises(ValueError, match="multiple of the QuantizedKV's heads"):
        qflash.attention(randn(gen, 1, 3, 8, 64).to(torch.bfloat16), qkv)
    with pytest.raises(ValueError, match="attn_mask"):
        qflash.attention(q, qkv, attn_mask=torch.ones(1, 1, 8, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout"):
        qflash.attention(q, qkv, layout="BHSD")
    with pytest.raises(NotImplementedError, match="forward only"):
        qflash.attention(q.clone().requires_grad_(), qkv)
    with pytest.raises(NotImplementedError, match="hopper"):
        qflash.attention(q, qkv, backend="hopper")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            qflash.attention(q.cuda(), qkv)
    for bad, match in (("none", "does not quantise"), ("int4", "K precision int4")):
        with pytest.raises(ValueError, match=match):
            qflash.quantize_kv(k, v, bad)
    with pytest.raises(ValueError, match="same shape"):
        qflash.quantize_kv(k, v[:, :, :5], "int8")
    with pytest.raises(ValueError, match="v_order"):
        qflash.quantize_kv(k, v, "int8", v_order="random")
    with pytest.raises(ValueError, match="backend"):
        qflash.quantize_kv(k, v, "int8", backend="cuda")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        qflash.quantize_kv(k.to(torch.int32), v, "int8")
    with pytest.raises(ValueError, match=r"QuantizedKV.k_scale must be torch.float32 \(1, 2, 1\)"):
        QuantizedKV(qkv.quant, qkv.k, qkv.k_scale[..., :0], qkv.k_mean, qkv.v, qkv.v_scale, "keys", qkv.dtype)
    with pytest.raises(ValueError, match="QuantizedKV.v must be"):
        QuantizedKV(qkv.quant, qkv.k, qkv.k_scale, qkv.k_mean, qkv.v[..., :64], qkv.v_scale, "keys", qkv.dtype)


def test_prologue_argument_errors(gen):
    q, k, v, kw = _flux_parts(gen, 1, 8, 16, 2, 64)
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    with pytest.raises(ValueError, match="prefix"):
        rmsnorm_rope_quantize_reference(q, k, v, "int8", **{**cpu, "v_prefix": None})
    with pytest.raises(ValueError, match="cos and sin must be"):
        rmsnorm_rope_quantize_reference(q, k, v, "int8", **{**cpu, "cos": cpu["cos"][:5], "sin": cpu["sin"][:5]})
    with pytest.raises(ValueError, match="norm_k_prefix"):
        rmsnorm_rope_quantize_reference(q, k, v, "int8", **{**cpu, "norm_k_prefix": None})
    with pytest.raises(ValueError, match="q must have k's sequence length"):
        rmsnorm_rope_quantize_reference(q[:, :3], k, v, "int8", **cpu)
    with pytest.raises(ValueError, match="'int4' cannot be pre-quantised: K precision int4"):
        rmsnorm_rope_quantize_reference(q, k, v, "int4", **cpu)


def test_empty_query_and_keys(gen):
    q, k, v = _small(gen)
    qkv = qflash.quantize_kv(k[:, :, :0], v[:, :, :0], "int8-fp8")
    with torch.no_grad():
        out, lse = qflash.attention(q, qkv, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == float("-inf")).all()
    out = qflash.attention(q[:, :, :0], qflash.quantize_kv(k, v, "int8"))
    assert out.shape == (1, 2, 0, 64)


@pytest.mark.interpreter
def test_prologue_nan_reaches_the_scales(gen):
    """A NaN in K (one token) or V (one channel) gives NaN scales, never finite codes that hide it."""
    q, k, v, kw = _flux_parts(gen, 1, 0, 130, 1, 64)
    k, v = k.clone(), v.clone()
    k[0, 5, 0, 3] = float("nan")
    v[0, 7, 0, 9] = float("nan")
    _, qkv = rmsnorm_rope_quantize_triton(q, k, v, "int8-fp8", **kw)
    assert torch.isnan(qkv.k_mean[0, 0]).any()  # smoothing spreads it: every block's scale is NaN
    assert torch.isnan(qkv.k_scale).all()
    assert torch.isnan(qkv.v_scale[0, 0, 9]) and torch.isfinite(qkv.v_scale[0, 0, :9]).all()
    _, qkv8 = rmsnorm_rope_quantize_triton(q, k, v, "int8", **{**kw, "cos": None, "sin": None})
    assert torch.isnan(qkv8.k_scale).all()


def test_prologue_kernels_compile_for_sm90():
    """The Triton kernels of Flux's int8-fp8 prologue compile for sm_90a here (no GPU: a subprocess
    without TRITON_INTERPRET). Spill instructions measured (Triton 3.6, D 128): token statistics 0,
    reduce 0, codes 261; the bound catches a regression to the thousands an earlier layout had."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "qflash.fused.compile_check", "flux-int8-fp8-D128"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert {x["kernel"] for x in recs} == {"prologue_token_stats_kernel", "prologue_reduce_kernel",
                                           "prologue_quant_kernel"}
    for x in recs:
        assert x["shared"] <= 232448, x
        assert x["spills"] is None or x["spills"] < 600, x


# ---------------------------------------------------------------------------------------------
# GPU (the lead runs these): the Hopper family on a QuantizedKV
# ---------------------------------------------------------------------------------------------
def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("preset", ["int8-fp8", "fp8"])
@pytest.mark.parametrize("B, H, S_txt, S_img, D", [(1, 4, 512, 4096, 128), (2, 3, 77, 1000, 64)])
def test_hopper_fused_prologue_matches_unfused(gen, preset, B, H, S_txt, S_img, D):
    cfg = resolve_quant(preset)
    q, k, v, kw = _flux_parts(gen, B, S_txt, S_img, H, D)
    with torch.no_grad():
        q_out, qkv = rmsnorm_rope_quantize(q, k, v, cfg, v_order="auto", **kw)
        assert qkv.v_order == "hopper"
        qq, kk, vv, want = _unfused(q, k, v, kw, cfg, "hopper")
        _assert_same_q(q_out, qq)
        diff = (qkv.k.float() - want.k.float()).abs()  # K: INT8 or e4m3 codes, mean summation order
        assert diff.max().item() <= (1 if preset == "int8-fp8" else 64) and (diff > 0).float().mean().item() < 1e-3
        # V: Triton's e4m3 conversion vs PyTorch's, 99.85 % equal on an H200 (tests/test_hopper.py)
        assert (qkv.v.float() == want.v.float()).float().mean().item() > 0.995
        fused, lse = qflash.attention(q_out, qkv, layout="NHD", return_lse=True, backend="hopper")
        unfused, lse_u = qflash.attention(qq, kk, vv, quant=preset, layout="NHD", return_lse=True, backend="hopper")
        fq = fake_quant_attention_kv(q_out.transpose(1, 2), qkv, block_n=128)
    # same kernel, same Q; K/V codes from another kernel with the same arithmetic: equal up to the
    # K mean's summation order (not measured yet; bounds: test_hopper's kernel-vs-fake-quant ones)
    # H200: 1.8e-2 / 1.9e-2 at the small (2, 3, 77 + 1000) shape, where the two calls' K codes come from
    # different kernels (K mean summation order) and FP8 P ties round apart; the fake-quant check is the tight one
    assert rel_l2(fused, unfused) < 2.8e-2
    assert rel_l2(fused.transpose(1, 2), fq) < {"int8-fp8": 0.011, "fp8": 0.014}[preset]
    torch.testing.assert_close(lse, lse_u, rtol=1e-4, atol=2e-3)
    assert torch.isfinite(fused).all()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_prequantised_matches_unfused(gen, preset):
    """Any CUDA GPU: quantize_kv (Triton) + attention(q, qkv) vs attention(q, k, v), default backend."""
    cfg = resolve_quant(preset)
    q = randn(gen, 2, 8, 1000, 128).to(torch.bfloat16).cuda()
    k = (randn(gen, 2, 8, 1500, 128, scale=2.0) + 0.5).to(torch.bfloat16).cuda()
    v = randn(gen, 2, 8, 1500, 128).to(torch.bfloat16).cuda()
    with torch.no_grad():
        qkv = qflash.quantize_kv(k, v, preset)
        out = qflash.attention(q, qkv, causal=True)
        ref = qflash.attention(q, k, v, quant=preset, causal=True)
        fq = fake_quant_attention_kv(q, qkv, causal=True, block_n=128 if cfg.quantizes_pv else 64)
    # not measured on a GPU yet: int8 (portable) as the interpreter's kernel-vs-fake-quant 1.05e-3
    # x ~2, the FP8 P·V presets (Hopper) test_hopper's bounds
    assert rel_l2(out, ref) < (2e-3 if not cfg.quantizes_pv else 1e-2)
    assert rel_l2(out, fq) < {"int8": 2e-3, "int8-fp8": 0.011, "fp8": 0.014}[preset]
