"""qflash.integrations.diffusers on a tiny random Flux transformer and the generic SDPA processor."""

from __future__ import annotations

import importlib
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from helpers import cosine, rel_l2

import qflash
import qflash.integrations.diffusers as qfd


def tiny_flux(seed: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ).eval()


def flux_inputs(gen, B=2, H=8, W=6, T=12):
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(H).float(), torch.arange(W).float(), indexing="ij"), -1
    ).reshape(-1, 3)
    return {
        "hidden_states": torch.randn(B, H * W, 16, generator=gen),
        "encoder_hidden_states": torch.randn(B, T, 32, generator=gen),
        "pooled_projections": torch.randn(B, 16, generator=gen),
        "timestep": torch.rand(B, generator=gen),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(T, 3),
    }


@torch.no_grad()
def run(model, inputs, **kw):
    return model(**inputs, **kw).sample


@pytest.fixture
def count_sdpa(monkeypatch):
    """Counts qflash.sdpa calls made by the qflash processors."""
    calls = []
    real = qfd.sdpa

    def spy(*args, **kwargs):
        calls.append(kwargs.get("quant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(qfd, "sdpa", spy)
    return calls


def test_flux_apply_within_budget_and_remove_is_exact(gen, count_sdpa):
    model = tiny_flux(0)
    inputs = flux_inputs(gen)
    native = run(model, inputs)
    originals = dict(model.attn_processors)
    assert all(type(p) is FluxAttnProcessor for p in originals.values())

    summary = qfd.apply(model, quant="none")
    assert summary == {"flux": 2, "sdpa": 0, "updated": 0, "skipped": {}}
    assert all(isinstance(p, qfd.QFlashFluxAttnProcessor) for p in model.attn_processors.values())
    assert all(isinstance(p, FluxAttnProcessor) for p in model.attn_processors.values())
    exact = run(model, inputs)
    assert len(count_sdpa) == 2  # one double-stream and one single-stream attention
    assert rel_l2(exact, native) < 1e-5  # the mirrored processor body is diffusers' computation

    summary = qfd.apply(model, quant="int8")  # applying again swaps quant, keeps the first originals
    assert summary["updated"] == 2 and summary["flux"] == 0
    quantised = run(model, inputs)
    assert count_sdpa[-2:] == ["int8", "int8"]
    assert not torch.equal(quantised, native)
    assert cosine(quantised, native) > 0.999
    assert rel_l2(quantised, native) < 0.02

    assert qfd.remove(model) == 2
    restored = dict(model.attn_processors)
    assert restored.keys() == originals.keys()
    assert all(restored[name] is originals[name] for name in originals)
    assert torch.equal(run(model, inputs), native)
    assert qfd.remove(model) == 0


def test_flux_attention_level_error(gen):
    """The attention output itself (not diluted by residuals) stays within the int8 budget."""
    model = tiny_flux(1)
    attn = model.transformer_blocks[0].attn
    x = torch.randn(2, 40, model.inner_dim, generator=gen)
    ctx = torch.randn(2, 10, model.inner_dim, generator=gen)
    with torch.no_grad():
        ref = attn(x, ctx)
        qfd.apply(model, quant="int8")
        out = attn(x, ctx)
        qfd.remove(model)
    for o, r in zip(out, ref):
        err = rel_l2(o, r)
        assert 1e-6 < err < 0.02, err


def test_flux_with_key_padding_mask(gen):
    """A (B, S_txt + S_img) boolean mask through joint_attention_kwargs: native == qflash(none)."""
    model = tiny_flux(2)
    inputs = flux_inputs(gen, B=2, T=12)
    S = 12 + inputs["hidden_states"].shape[1]
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, 8:12] = False  # pad the last 4 text tokens of the second sample
    kw = {"joint_attention_kwargs": {"attention_mask": mask}}
    native = run(model, inputs, **kw)
    assert not torch.equal(native, run(model, inputs))  # the mask matters
    with qfd.applied(model, quant="none") as summary:
        assert summary["flux"] == 2
        ours = run(model, inputs, **kw)
    assert rel_l2(ours, native) < 1e-5
    assert all(type(p) is FluxAttnProcessor for p in model.attn_processors.values())


def test_flux_processor_hooks(gen):
    """The Flux body exists once (HookedFluxAttnProcessor); subclasses override _prologue/_attend only."""
    assert "__call__" not in vars(qfd.QFlashFluxAttnProcessor)
    assert issubclass(qfd.QFlashFluxAttnProcessor, qfd.HookedFluxAttnProcessor)
    F = torch.nn.functional

    class PlainSDPA(qfd.HookedFluxAttnProcessor):  # diffusers' "native" backend, through the hooks
        seen = []

        def _prologue(self, attn, query, key, encoder_query, encoder_key, image_rotary_emb):
            self.seen.append(encoder_query is not None)
            return super()._prologue(attn, query, key, encoder_query, encoder_key, image_rotary_emb)

        def _attend(self, query, key, value, attn_mask):
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)

    model = tiny_flux(7)
    inputs = flux_inputs(gen)
    native = run(model, inputs)
    model.set_attn_processor(PlainSDPA())
    assert torch.equal(run(model, inputs), native)
    assert PlainSDPA.seen == [True, False]  # double-stream (text + image), then single-stream
    model.set_attn_processor(qfd.HookedFluxAttnProcessor())
    with pytest.raises(NotImplementedError, match="_attend"):
        run(model, inputs)


def test_flux_processor_compiles_without_graph_breaks(gen):
    model = tiny_flux(8)
    attn = model.transformer_blocks[0].attn
    x = torch.randn(1, 16, model.inner_dim, generator=gen)
    ctx = torch.randn(1, 8, model.inner_dim, generator=gen)
    torch._dynamo.reset()
    with torch.no_grad(), qfd.applied(model, quant="none"):
        explained = torch._dynamo.explain(lambda a, b: attn(a, b))(x, ctx)
    assert explained.graph_break_count == 0, explained.break_reasons


def generic_attention(cross: bool) -> Attention:
    torch.manual_seed(3)
    attn = Attention(query_dim=64, heads=2, dim_head=64, cross_attention_dim=48 if cross else None)
    assert type(attn.processor) is AttnProcessor2_0
    return attn.eval()


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_generic_sdpa_processor(gen, cross, count_sdpa):
    attn = generic_attention(cross)
    x = torch.randn(2, 50, 64, generator=gen)
    ctx = torch.randn(2, 30, 48, generator=gen) if cross else None
    S = 30 if cross else 50
    mask = torch.where(torch.rand(2, S, generator=gen) < 0.8, 0.0, -10000.0)  # diffusers' additive (B, S_k)
    original = attn.processor
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
        assert qfd.apply(attn, quant="none")["sdpa"] == 1
        exact = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
        qfd.apply(attn, quant="int8")
        quantised = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
        assert qfd.remove(attn) == 1
        again = attn(x, encoder_hidden_states=ctx, attention_mask=mask)
    assert count_sdpa == ["none", "int8"]
    assert rel_l2(exact, ref) < 1e-5
    assert 1e-6 < rel_l2(quantised, ref) < 0.02
    assert attn.processor is original
    assert torch.equal(again, ref)


def test_generic_processor_on_image_input_with_group_norm(gen):
    """(B, C, H, W) input, group norm and residual: the VAE-style path of AttnProcessor2_0."""
    torch.manual_seed(4)
    attn = Attention(query_dim=64, heads=1, dim_head=64, norm_num_groups=8, residual_connection=True,
                     rescale_output_factor=2.0, bias=True).eval()
    x = torch.randn(2, 64, 6, 7, generator=gen)
    with torch.no_grad():
        ref = attn(x)
        with qfd.applied(attn, quant="none"):
            ours = attn(x)
    assert ours.shape == x.shape
    assert rel_l2(ours, ref) < 1e-5


def test_pipeline_like_object_and_skips(gen):
    flux = tiny_flux(5)
    generic = generic_attention(False)
    other = generic_attention(True)
    custom = type("MyProcessor", (AttnProcessor2_0,), {})()  # a subclass: left alone
    other.set_processor(custom)
    pipe = types.SimpleNamespace(components={"transformer": flux, "attn": generic, "other": other,
                                             "tokenizer": object(), "scheduler": None})
    summary = qfd.apply(pipe, quant="int8-fp8")
    assert summary == {"flux": 2, "sdpa": 1, "updated": 0, "skipped": {"MyProcessor": 1}}
    assert other.processor is custom
    assert qfd.remove(pipe) == 3
    assert other.processor is custom


def test_apply_errors_and_warnings():
    with pytest.raises(TypeError, match="model_or_pipeline"):
        qfd.apply(object())
    with pytest.raises(ValueError, match="not a preset"):
        qfd.apply(torch.nn.Linear(2, 2), quant="int3")
    with pytest.warns(UserWarning, match="found no FluxAttnProcessor or AttnProcessor2_0"):
        qfd.apply(torch.nn.Linear(2, 2))


def test_layer_skip_registry_knows_qflash_processors():
    helpers_mod = pytest.importorskip("diffusers.hooks._helpers")
    qfd.apply(tiny_flux(6))
    registry = helpers_mod.AttentionProcessorRegistry
    assert registry.get(qfd.QFlashFluxAttnProcessor) is registry.get(FluxAttnProcessor)
    assert registry.get(qfd.QFlashAttnProcessor2_0) is registry.get(AttnProcessor2_0)


def test_clear_import_error_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    monkeypatch.delitem(sys.modules, "qflash.integrations.diffusers")
    with pytest.raises(ImportError, match=r"pip install 'qflash\[diffusers\]'") as exc:
        importlib.import_module("qflash.integrations.diffusers")
    # the version it names is the extra's pin in pyproject.toml (issue 14: it said >= 0.32, the extra pins 0.42)
    pin = re.search(r'"diffusers([<>=!~][^"]*)"', (Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pin and f"diffusers ({pin.group(1)}" in str(exc.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(qflash)  # the core package never needs diffusers
