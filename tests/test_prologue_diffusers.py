"""Issue 16 item 2: ``qflash.integrations.diffusers.apply(..., fuse_prologue=True)`` — Flux double-
and single-stream blocks and the generic processor run the fused prologue (RMSNorm + RoPE + concat
+ K/V quantisation) and ``qflash.attention(q, QuantizedKV)``; ``remove`` restores the originals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from helpers import cosine, rel_l2
from test_diffusers import flux_inputs, run, tiny_flux

import qflash.integrations.diffusers as qfd
from qflash.integrations import fused_prologue


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the fused calls (and which returned a result) of the qflash processors."""
    calls = []
    for name in ("flux_attention", "generic_attention", "flux_norm_rope"):
        real = getattr(fused_prologue, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            calls.append((_name, out is not None))
            return out

        monkeypatch.setattr(fused_prologue, name, spy)
    return calls


@pytest.mark.parametrize("preset", ["int8", "int8-fp8"])
def test_flux_fused_prologue_matches_unfused_and_removes(gen, preset, count_fused):
    model = tiny_flux(0)
    for module in model.modules():  # non-trivial norm weights (diffusers initialises them to 1)
        if type(module).__name__ == "RMSNorm" and getattr(module, "weight", None) is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=gen)
    inputs = flux_inputs(gen)
    native = run(model, inputs)
    originals = dict(model.attn_processors)
    with qfd.applied(model, quant=preset) as summary:
        assert summary["flux"] == 2
        unfused = run(model, inputs)
    summary = qfd.apply(model, quant=preset, fuse_prologue=True)
    assert summary == {"flux": 2, "sdpa": 0, "updated": 0, "skipped": {}}
    assert all("fuse_prologue=True" in repr(p) for p in model.attn_processors.values())
    fused = run(model, inputs)
    assert count_fused == [("flux_attention", True)] * 2  # the double- and the single-stream block
    # CPU, fp32 model: both run the reference family on the same numbers (the fp32 RMSNorm, RoPE
    # and K mean agree), measured rel 0 for both presets; in bf16 on a GPU they differ by ~1 ulp of
    # the normed q/k (rmsnorm_rope rounds once, diffusers twice)
    assert rel_l2(fused, unfused) < 1e-6
    assert cosine(fused, native) > 0.9999
    assert qfd.remove(model) == 2
    assert dict(model.attn_processors) == originals  # the same objects
    assert torch.equal(run(model, inputs), native)


def test_flux_fused_prologue_falls_back_where_it_cannot_fuse(gen, count_fused):
    model = tiny_flux(1)
    inputs = flux_inputs(gen, B=1)
    qfd.apply(model, quant="int4", fuse_prologue=True)  # int4: K/V quantised inside attention
    out_int4 = run(model, inputs)
    assert [c for c in count_fused if c[0] == "flux_attention"] == [("flux_attention", False)] * 2
    assert [c for c in count_fused if c[0] == "flux_norm_rope"] == [("flux_norm_rope", True)] * 2
    qfd.remove(model)
    with qfd.applied(model, quant="int4"):
        assert rel_l2(out_int4, run(model, inputs)) < 1e-6  # measured 0 (fp32)
    count_fused.clear()
    mask = torch.ones(1, inputs["encoder_hidden_states"].shape[1] + inputs["hidden_states"].shape[1], dtype=torch.bool)
    with qfd.applied(model, quant="int8", fuse_prologue=True), torch.no_grad():
        a = model(**inputs, joint_attention_kwargs={"attention_mask": mask}).sample
    assert ("flux_attention", False) in count_fused  # a mask: unfused path
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("cross", [False, True])
def test_generic_processor_fused_prologue(gen, cross, count_fused):
    torch.manual_seed(3)
    attn = Attention(query_dim=64, heads=2, dim_head=64, cross_attention_dim=48 if cross else None,
                     qk_norm="rms_norm").eval()
    assert type(attn.processor) is AttnProcessor2_0
    x = torch.randn(2, 40, 64, generator=gen)
    ctx = torch.randn(2, 24, 48, generator=gen) if cross else None
    with torch.no_grad():
        native = attn(x, encoder_hidden_states=ctx)
        with qfd.applied(attn, quant="int8-fp8"):
            unfused = attn(x, encoder_hidden_states=ctx)
        with qfd.applied(attn, quant="int8-fp8", fuse_prologue=True) as summary:
            assert summary["sdpa"] == 1
            fused = attn(x, encoder_hidden_states=ctx)
    assert count_fused == [("generic_attention", True)]
    # measured fp32: 0 vs unfused (self and cross); vs native SDPA 2.6e-2 / 2.8e-2 (int8-fp8's
    # budget in test_attention_api is 0.058)
    assert rel_l2(fused, unfused) < 1e-6
    assert rel_l2(fused, native) < 0.058
    assert type(attn.processor) is AttnProcessor2_0


def test_fuse_prologue_argument_is_checked():
    with pytest.raises(TypeError, match="fuse_prologue must be a bool"):
        qfd.apply(tiny_flux(0), quant="int8", fuse_prologue="yes")


def test_norm_params_recognises_rmsnorm_only():
    from diffusers.models.normalization import RMSNorm

    x = torch.zeros(1, 2, 3, 8)
    w, eps = fused_prologue.norm_params(RMSNorm(8, eps=1e-5), x)
    assert w.shape == (8,) and eps == 1e-5
    assert fused_prologue.norm_params(torch.nn.RMSNorm(8), x)[1] == torch.finfo(torch.float32).eps
    assert fused_prologue.norm_params(torch.nn.LayerNorm(8), x) is fused_prologue._NO_NORM
    assert fused_prologue.norm_params(None, x) == (None, None)
    assert FluxAttnProcessor is not None
