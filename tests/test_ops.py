"""torch.ops.qflash.attention_fwd: opcheck, fake strides, config keys, straight-through autograd,
torch.compile(fullgraph=True), and (GPU) CUDA graphs and the cost of patching on SDPA fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_l2

import qflash
from qflash.ops import attention_fwd, config_from_key, config_key, reference_backward
from qflash.spec import AttnSpec

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


def rnd(gen, *shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(requires_grad)


# ---- opcheck ----------------------------------------------------------------------------------

OPCHECK = [
    # id, (B, Hq, Hkv, Sq, Sk, D), mask kind, causal, return_lse, out_layout, quant
    ("hnd-plain-lse", (2, 2, 2, 9, 13, 32), None, False, True, "HND", "int8"),
    ("nhd-gqa-causal", (1, 4, 2, 13, 9, 32), None, True, False, "NHD", "int8-fp8"),
    ("hnd-floatmask-grad", (2, 2, 1, 7, 11, 16), "float", False, True, "HND", "none"),
    ("nhd-boolmask-lse", (1, 2, 2, 8, 8, 64), "bool", True, True, "NHD", "custom"),
]


@pytest.mark.parametrize("shape,mask,causal,lse,layout,quant", [c[1:] for c in OPCHECK], ids=[c[0] for c in OPCHECK])
def test_opcheck(gen, shape, mask, causal, lse, layout, quant):
    B, Hq, Hkv, Sq, Sk, D = shape
    q = rnd(gen, B, Hq, Sq, D, requires_grad=True)
    k = rnd(gen, B, Hkv, Sk, D, requires_grad=True)
    v = rnd(gen, B, Hkv, Sk, D, requires_grad=True)
    if layout == "NHD":  # strided HND views of NHD buffers, as qflash.attention(layout="NHD") passes
        q, k, v = (rnd(gen, t.shape[0], t.shape[2], t.shape[1], D).transpose(1, 2).requires_grad_() for t in (q, k, v))
    m = None
    if mask == "float":
        m = rnd(gen, 1, Hq, Sq, Sk, requires_grad=True)
    elif mask == "bool":
        m = torch.rand(Sq, Sk, generator=gen) < 0.7
    cfg = qflash.PRESETS["int8"].with_(smooth_k=False) if quant == "custom" else quant
    spec = AttnSpec.build(cfg, causal=causal, attn_mask=m, scale=0.17, return_lse=lse, layout=layout)
    torch.library.opcheck(attention_fwd, (q, k, v, m, spec.key()))


@pytest.mark.parametrize("bwd_lowbit,bwd_recompute", [("int8", False), ("none", True)], ids=["int8bwd-reuse", "recompute"])
def test_opcheck_backward_options(gen, bwd_lowbit, bwd_recompute):
    """The two trailing backward arguments (schema defaults "none" / None) go through opcheck."""
    q = rnd(gen, 1, 4, 9, 32, requires_grad=True)
    k, v = rnd(gen, 1, 2, 12, 32, requires_grad=True), rnd(gen, 1, 2, 12, 32, requires_grad=True)
    spec = AttnSpec.build("int8", causal=True, return_lse=True, bwd_lowbit=bwd_lowbit, bwd_recompute=bwd_recompute)
    args = (q, k, v, None, spec.key())
    torch.library.opcheck(attention_fwd, args)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_fake_matches_real_metadata(gen, layout, return_lse):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = rnd(gen, 2, 4, 11, 32), rnd(gen, 2, 2, 17, 32), rnd(gen, 2, 2, 17, 32)
    key = AttnSpec.build("int8", return_lse=return_lse, layout=layout).key()
    real = torch.ops.qflash.attention_fwd(q, k, v, None, key)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.qflash.attention_fwd(fq, fk, fv, None, key)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
    assert real[1].shape == ((2, 4, 11) if return_lse else (0,))
    if layout == "NHD":
        assert real[0].transpose(1, 2).is_contiguous()


def test_op_rejects_bad_layout(gen):
    q = rnd(gen, 1, 1, 4, 16)
    with pytest.raises(ValueError, match="layout"):
        torch.ops.qflash.attention_fwd(q, q, q, None, "int8|none|none|None|BHSD|0|auto|none|None")
    with pytest.raises(ValueError, match="layout"):
        AttnSpec.build("int8", layout="BHSD")


def test_spec_keys_round_trip():
    """The op's one string: every field survives, a custom config's name may hold the separator."""
    custom = qflash.PRESETS["int4"].with_(name="a|b;c")
    mask = torch.zeros(3, 3)
    for spec in (AttnSpec.build("int8"),
                 AttnSpec.build(custom, causal="top_left", attn_mask=mask, scale=0.1 + 0.2, layout="NHD",
                                return_lse=True, backend="portable", bwd_lowbit="int8", bwd_recompute=False),
                 AttnSpec.build("none", causal=True, attn_mask=mask > 0, bwd_recompute=True)):
        assert AttnSpec.from_key(spec.key()) == spec
    assert AttnSpec.build("fp8").key() == "fp8|none|none|None|HND|0|auto|none|None"
    assert AttnSpec.build("fp8").key(return_lse=True) == "fp8|none|none|None|HND|1|auto|none|None"
    with pytest.raises(ValueError, match="AttnSpec"):
        AttnSpec.from_key("int8|sideways|none|None|HND|0|auto|none|None")


# ---- config keys ------------------------------------------------------------------------------


def test_config_keys_round_trip():
    for name, cfg in qflash.PRESETS.items():
        assert config_key(name) == name
        assert config_from_key(name) is cfg
        key = config_key(cfg)  # a config object, even one equal to a preset, is spelled out
        assert key.startswith("cfg:") and config_from_key(key) == cfg
    custom = qflash.PRESETS["int4"].with_(q_mean_block=64, smooth_k=False, name="odd;name=with,separators/")
    key = config_key(custom)
    from qflash import spec

    spec._PARSED.clear()  # as in another process: parsed from the string alone
    assert config_from_key(key) == custom
    assert config_from_key(key).name == custom.name
    with pytest.raises(ValueError, match="not a preset"):
        config_from_key("int9")
    with pytest.raises(ValueError, match="not a valid serialised QuantConfig"):
        config_from_key("cfg:bogus=1")
    with pytest.raises(TypeError, match="QuantConfig"):
        config_key(3)


# ---- autograd: straight-through estimator -----------------------------------------------------


def _grads(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return torch.autograd.grad(out, tensors, g)


GRAD_CASES = [
    ("plain", (2, 2, 2, 9, 13), {}),
    ("causal-top-left", (1, 2, 2, 13, 9), {"is_causal": True}),
    ("gqa", (1, 4, 2, 8, 12), {"enable_gqa": True}),
    ("bool-mask", (2, 2, 2, 8, 10), {"mask": "bool"}),
]


@pytest.mark.parametrize("shape,kw", [c[1:] for c in GRAD_CASES], ids=[c[0] for c in GRAD_CASES])
def test_backward_none_matches_torch(gen, shape, kw):
    B, Hq, Hkv, Sq, Sk = shape
    kw = dict(kw)
    if kw.pop("mask", None):
        m = torch.rand(B, 1, Sq, Sk, generator=gen) < 0.7
        m[..., 0] = True
        kw["attn_mask"] = m
    q, k, v = rnd(gen, B, Hq, Sq, 32, requires_grad=True), rnd(gen, B, Hkv, Sk, 32, requires_grad=True), \
        rnd(gen, B, Hkv, Sk, 32, requires_grad=True)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, **kw), q, k, v)
    got = _grads(lambda *t: qflash.sdpa(*t, quant="none", fallback=False, **kw), q, k, v)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # straight-through: the quantised forward has the exact backward
    ste = _grads(lambda *t: qflash.sdpa(*t, quant="int8", fallback=False, **kw), q, k, v)
    for r, g in zip(ref, ste):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_backward_float_mask_and_lse(gen):
    B, H, Sq, Sk, D = 1, 2, 7, 11, 16
    q, k, v = rnd(gen, B, H, Sq, D, requires_grad=True), rnd(gen, B, H, Sk, D, requires_grad=True), \
        rnd(gen, B, H, Sk, D, requires_grad=True)
    m = rnd(gen, 1, H, Sq, Sk, requires_grad=True)
    wo, wl = rnd(gen, B, H, Sq, D), rnd(gen, B, H, Sq)

    def exact(q, k, v, m):
        s = q @ k.transpose(-1, -2) * 0.3 + m
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    o, lse = exact(q, k, v, m)
    ref = torch.autograd.grad((o * wo).sum() + (lse * wl).sum(), (q, k, v, m))
    o, lse = qflash.attention(q, k, v, quant="none", attn_mask=m, scale=0.3, return_lse=True)
    got = torch.autograd.grad((o * wo).sum() + (lse * wl).sum(), (q, k, v, m))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_reference_backward_bottom_right_causal(gen):
    q, k, v = rnd(gen, 1, 2, 5, 16), rnd(gen, 1, 2, 9, 16), rnd(gen, 1, 2, 9, 16)
    do = rnd(gen, 1, 2, 5, 16)
    keep = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=9 - 5)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(qq, kk, vv, attn_mask=keep), (qq, kk, vv), do)
    got = reference_backward(q, k, v, do, causal=True)[:3]
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ---- torch.compile ----------------------------------------------------------------------------


class TinyBlock(torch.nn.Module):
    """A projection, qflash.sdpa (HND, causal, Sq != Sk) and qflash.attention (NHD, float mask)."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, ctx, mask):
        B, S, C = x.shape
        q = self.qkv(x).unflatten(-1, (3, self.heads, -1))[:, :, 0]  # (B, S, H, D)
        kv = self.qkv(ctx).unflatten(-1, (3, self.heads, -1))
        k, v = kv[:, :, 1], kv[:, :, 2]  # (B, Sk, H, D)
        a = qflash.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, quant="int8")
        b = qflash.attention(q, k, v, attn_mask=mask, layout="NHD", quant="int8-fp8")
        return a.transpose(1, 2).reshape(B, S, C) + b.reshape(B, S, C)


def test_compile_fullgraph_forward_backward(gen):
    torch.manual_seed(0)
    model = TinyBlock()
    x, ctx, mask = rnd(gen, 2, 12, 64), rnd(gen, 2, 20, 64), rnd(gen, 12, 20)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g), bw_compiler=lambda g, _: make_boxed_func(g))(
            gm, example_inputs
        )

    compiled = torch.compile(model, fullgraph=True, backend=capture)
    out = compiled(x, ctx, mask)
    ref = model(x, ctx, mask)
    torch.testing.assert_close(out, ref)
    assert len(graphs) == 1
    op = torch.ops.qflash.attention_fwd
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(t in (op, op.default) for t in targets) == 2, targets
    # backward through the compiled graph = eager backward
    g_c = torch.autograd.grad(out.sum(), list(model.parameters()))
    g_e = torch.autograd.grad(ref.sum(), list(model.parameters()))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_patched_sdpa_and_fallback(gen):
    """F.scaled_dot_product_attention patched before compiling: the op is traced; a fallback
    (float64) traces PyTorch's SDPA, warning once at trace time."""

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(
            q.double(), k.double(), v.double()
        ).float()

    q, k, v = rnd(gen, 1, 2, 10, 32), rnd(gen, 1, 2, 14, 32), rnd(gen, 1, 2, 14, 32)
    from qflash import dropin

    dropin.reset_fallback_warnings()
    with qflash.patch_sdpa(quant="none"), pytest.warns(qflash.QFlashFallbackWarning, match="float64"):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    torch.testing.assert_close(out, 2 * TORCH_SDPA(q, k, v), rtol=2e-5, atol=2e-6)


def test_compile_custom_config_no_graph_break(gen):
    cfg = qflash.PRESETS["int8"].with_(smooth_k=False)
    q, k, v = rnd(gen, 1, 2, 10, 32), rnd(gen, 1, 2, 14, 32), rnd(gen, 1, 2, 14, 32)
    f = torch.compile(lambda q, k, v: qflash.attention(q, k, v, quant=cfg), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), qflash.attention(q, k, v, quant=cfg))


# ---- GPU only ---------------------------------------------------------------------------------

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("quant", ["int8", "int8-fp8"])
@pytest.mark.parametrize("entry", ["attention", "sdpa"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay(entry, quant):
    g = torch.Generator(device="cuda").manual_seed(3)
    shape = (2, 4, 300, 128)
    static = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    if entry == "attention":
        def fn(q, k, v):
            return qflash.attention(q, k, v, quant=quant, causal=True)
    else:
        def fn(q, k, v):
            return qflash.sdpa(q, k, v, is_causal=True, quant=quant, fallback=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile kernels, pick configs, before capture
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static)
    for _ in range(2):
        fresh = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        eager = fn(*fresh)
        torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
        assert rel_l2(static_out, TORCH_SDPA(*fresh, is_causal=True)) < (0.02 if quant == "int8" else 0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_patch_does_not_slow_sdpa_fallbacks():
    """A call qflash hands back (v's head dim differs) costs about what unpatched SDPA costs."""
    from triton.testing import do_bench

    q = torch.randn(1, 24, 4096, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(1, 24, 4096, 64, device="cuda", dtype=torch.bfloat16)
    base = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
    with qflash.patch_sdpa(quant="int8"):
        with pytest.warns(qflash.QFlashFallbackWarning):
            F.scaled_dot_product_attention(q, k, v)
        patched = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
    base2 = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
    assert patched < 1.1 * min(base, base2) + 0.02, (base, base2, patched)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_inductor_cuda():
    torch.manual_seed(0)
    model = TinyBlock(dim=256, heads=2).cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(2, 400, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.randn(300, 400, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, ctx, mask), model(x, ctx, mask), rtol=2e-2, atol=2e-2)
