"""The cooperative one-launch mode (``attn_fwd``'s ``COOP``, ``launch.pick_coop``): each program
quantises its share of its head's K tiles, the programs of a KV head meet at a barrier
(``kernels.grid_sync``), then attend over the codes.

On the CPU interpreter the mode runs as its two phases, two launches (the interpreter runs
programs one after another, so a barrier would never open); the arithmetic is the same code.
The barrier itself, CUDA graphs, recorded plans and streams need a GPU.
"""

from __future__ import annotations

import pytest
import torch

import qflash
from qflash import reference
from qflash.kernels.portable import launch
from qflash.kernels.portable.tuning import KernelConfig

from helpers import rel_l2

pytestmark = pytest.mark.interpreter

if not torch.cuda.is_available():
    import triton_interpreter_shim

    triton_interpreter_shim.apply()

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# vs the fake-quant reference that models the call (reference_args), measured on the interpreter
# over these cases: relL2 int8 <= 7.6e-4, int4 <= 1.5e-3, fp8 (Q·K) 4.3e-3; lse max |diff| int8
# 1.6e-3, int4 1.2e-2 (the causal case's short rows), fp8 7.6e-3. Bounds ~1.3x.
REF_BOUND = {"int8": 1e-3, "int4": 2e-3, "fp8": 6e-3}
LSE_BOUND = {"int8": 2.5e-3, "int4": 1.6e-2, "fp8": 1e-2}
# vs exact attention (the quantisation error itself), measured: int8 <= 8.6e-3, int4 <= 0.152
# (INT4 codes), fp8 3.6e-2
EXACT_BOUND = {"int8": 0.012, "int4": 0.2, "fp8": 0.05}

CASES = [
    # B, Hq, Hkv, Sq, Sk, D, causal, mask
    (1, 4, 2, 100, 77, 64, "none", None),            # GQA: 2 heads x 2 query tiles share a KV head
    (2, 2, 2, 130, 150, 64, "bottom_right", None),   # causal, a partial last query and key tile
    (1, 2, 1, 70, 96, 128, "top_left", "bool"),      # causal + mask, a fully masked row, D128
]
PRESET_CASES = [(p, c) for c in CASES for p in ("int8", "int4")] + [("fp8", CASES[0])]


def _cfg(preset):
    # automatic small calls of FP8 P·V presets keep P·V in the input dtype (launch.call_quant),
    # which is what the cooperative mode runs
    return launch._float_pv(qflash.resolve_quant(preset))


def _inputs(B, Hq, Hkv, Sq, Sk, D, mask, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(torch.bfloat16).to(DEV)
    # K with a channel offset: K smoothing's mean matters
    k = (torch.randn(B, Hkv, Sk, D, generator=g) + 0.7).to(torch.bfloat16).to(DEV)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(torch.bfloat16).to(DEV)
    m = None
    if mask == "bool":
        m = (torch.rand(B, 1, Sq, Sk, generator=g) > 0.3).to(DEV)
        m[..., -1, :] = False  # a fully masked row: zeros and lse -inf
    return q, k, v, m


def _expand(t, hq):
    return t.repeat_interleave(hq // t.shape[1], dim=1)


@pytest.mark.parametrize("preset,case", PRESET_CASES,
                         ids=[f"{p}-{c[1]}/{c[2]}x{c[3]}:{c[4]}-d{c[5]}-{c[6]}-{c[7]}" for p, c in PRESET_CASES])
def test_coop_matches_references(preset, case):
    B, Hq, Hkv, Sq, Sk, D, causal, mask = case
    cfg = _cfg(preset)
    q, k, v, m = _inputs(B, Hq, Hkv, Sq, Sk, D, mask, seed=Sq * Sk + D)
    kw = dict(causal=causal != "none", top_left=causal == "top_left", attn_mask=m, return_lse=True)
    out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
    lse = torch.full(q.shape[:3], float("nan"), device=DEV)
    kc = KernelConfig(64, 64, 4, 2)
    o, l = launch.attention_fwd(q, k, v, cfg, out=out, lse=lse, coop=True, kernel_config=kc, **kw)
    assert o.data_ptr() == out.data_ptr() and not o.isnan().any() and not l.isnan().any()

    ra = launch.reference_args(q, k, cfg, coop=True, kernel_config=kc)
    assert ra["stat_block"] is None  # one K mean over all keys
    ke, ve = _expand(k, Hq), _expand(v, Hq)
    o_fq, l_fq = reference.fake_quant_attention(q, ke, ve, **ra, **kw)
    o_ex, l_ex = reference.exact_attention(q, ke, ve, **kw)
    empty = l_ex == float("-inf")
    assert torch.equal(l == float("-inf"), empty)
    assert (o[empty[..., None].expand_as(o)] == 0).all()
    assert rel_l2(o, o_fq) < REF_BOUND[preset]
    assert rel_l2(o, o_ex) < EXACT_BOUND[preset]
    fin = ~empty
    assert (l[fin] - l_fq[fin]).abs().max() < LSE_BOUND[preset]

    # the one-launch mode (every program quantises every tile) with the same tiles: same codes,
    # same loop, so the same bits
    o1, l1 = launch.attention_fwd(q, k, v, cfg, fused_quant=True, split_keys=0, kernel_config=kc, **kw)
    assert torch.equal(o, o1) and torch.equal(l, l1)


def test_coop_refuses_what_it_cannot_run():
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 64, None, seed=1)
    with pytest.raises(ValueError, match="P·V"):
        launch.attention_fwd(q, k, v, qflash.resolve_quant("int8-fp8"), coop=True)
    with pytest.raises(ValueError, match="fused_quant=True"):
        launch.attention_fwd(q, k, v, _cfg("int8"), coop=True, fused_quant=True)
    with pytest.raises(ValueError, match="Q·K"):
        launch.attention_fwd(q, k, v, qflash.resolve_quant("none"), coop=True)


def test_coop_is_never_automatic_on_the_cpu():
    q, k, _, _ = _inputs(1, 24, 24, 256, 256, 128, None, seed=2)
    q, k = q.cpu(), k.cpu()
    kc, fused, _, _ = launch._pick_tiles(q, 256, _cfg("int8"), None, None, None, None)
    assert launch.pick_coop(q, 24, 256, _cfg("int8"), kc, None, None, fused, None, None, None) is None


# --- GPU: the barrier, repeated calls, CUDA graphs, plans, streams ------------------------------

SHAPE = (1, 24, 24, 256, 256, 128)  # issue 15's 1x24x256x128: 96 programs, 4 per head


@GPU
@pytest.mark.parametrize("preset", ["int8", "int4", "int8-fp8"])
def test_coop_is_automatic_at_one_wave_and_repeats(preset):
    B, Hq, Hkv, Sq, Sk, D = SHAPE
    q, k, v, _ = _inputs(B, Hq, Hkv, Sq, Sk, D, None, seed=3)
    cfg = launch.call_quant(q, k, qflash.resolve_quant(preset))
    kc, fused, _, _ = launch._pick_tiles(q, Sk, cfg, None, None, None, None)
    assert launch.pick_coop(q, Hkv, Sk, cfg, kc, None, None, fused, None, None, None) is not None
    o, l = launch.attention_fwd(q, k, v, cfg, return_lse=True)
    o_fq, l_fq = reference.fake_quant_attention(q, k, v, return_lse=True, **launch.reference_args(q, k, cfg))
    assert rel_l2(o, o_fq) < 2e-3
    # many rounds of the same counters (plans replayed after the first call): the same bits
    for _ in range(200):
        o2, l2 = launch.attention_fwd(q, k, v, cfg, return_lse=True)
    torch.cuda.synchronize()
    assert torch.equal(o, o2) and torch.equal(l, l2)


@GPU
def test_coop_under_cuda_graphs_and_streams():
    B, Hq, Hkv, Sq, Sk, D = SHAPE
    q, k, v, _ = _inputs(B, Hq, Hkv, Sq, Sk, D, None, seed=4)
    cfg = _cfg("int8")
    want, _ = launch.attention_fwd(q, k, v, cfg, coop=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graph asks
        launch.attention_fwd(q, k, v, cfg, coop=True)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got, _ = launch.attention_fwd(q, k, v, cfg, coop=True)
    for _ in range(20):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    # two streams at once: each has its own counters
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    outs = {}
    for name, s in (("a", s1), ("b", s2)):
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(10):
        for name, s in (("a", s1), ("b", s2)):
            with torch.cuda.stream(s):
                outs[name] = launch.attention_fwd(q, k, v, cfg, coop=True)[0]
    torch.cuda.synchronize()
    assert torch.equal(outs["a"], want) and torch.equal(outs["b"], want)
