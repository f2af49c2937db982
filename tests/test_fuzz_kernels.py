"""Property fuzz of the kernel path against an independent fp64 reference (issue 14, "Done when").

hypothesis draws small problems — head dims 1..256, GQA, Sq != Sk, causal, bool / additive masks
(with ``finfo.min`` and ``-inf`` entries, fully masked rows), q/k magnitudes up to 1e4, NaN/Inf
in one q element — and runs ``qflash.attention(backend="portable")`` (Triton's CPU interpreter
without a GPU). The reference below is written from the definition, in fp64, sharing no code with
``qflash.reference``. Bounds are per preset and per logit size (quantisation error grows with the
logits: README, Reliability), ~1.5x the largest error measured over 1600 draws. ~15 s on two CPU cores.
``test_split_path_fuzz`` runs the same properties with the keys forced into one-tile splits (up to
160 keys), the merge and the one-launch mode's per-split statistics included (~15 s); it caught
the merge's equal weighting of finfo.min rows (NOTES, session 9).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qflash

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MAGS = (1.0, 10.0, 100.0, 1e3, 1e4)  # q, k element scale; logits grow as its square

# Error over the finite rows relative to sqrt(softmax·v²) (see run_problem): the max measured over
# 1600 random draws (2026-12-02, interpreter), by preset and by the logits' size, sigma = mag² ·
# scale · sqrt(D) (<= 2 | <= 200 | more: with the default scale, q/k element scale 1 | 10 | >= 100);
# the bound is 1.5x that, plus 1e-3. Past 200 the softmax is near one-hot and one quantisation
# step can pick another key (README, Reliability): those bounds only catch gross failures.
# (Session 9: keyed on the element scale alone, scale=1.0 draws at large D — sigma up to 1600 under
# "10" — exceeded the "10" bounds in 4 of 1000 random draws, all near-one-hot; keyed on sigma, none.)
MEASURED = {
    "none": (1.75e-3, 1.42e-3, 3.0e-4),
    "int8": (3.0e-2, 0.103, 0.482),
    "int8-fp8": (4.9e-2, 0.131, 0.991),
    "int4": (0.419, 0.716, 1.06),
    "fp8": (0.111, 0.343, 1.04),
}


def logit_size(pb) -> float:
    """sigma: the standard deviation of a drawn problem's logits (N(0, mag²) q and k)."""
    scale = pb["scale"] if pb["scale"] is not None else pb["D"] ** -0.5
    return pb["mag"] ** 2 * scale * pb["D"] ** 0.5


def bound(preset: str, sigma: float) -> float:
    m = MEASURED[preset][0 if sigma <= 2 else 1 if sigma <= 200 else 2]
    return 1.5 * m + 1e-3


def reference(q, k, v, *, causal, mask, scale, with_scale=False):
    """softmax(q·kᵀ·scale + mask)·v in fp64, from the definition: bool mask = keep, additive
    mask added, causal bottom-right; a row whose scores are all -inf is 0; NaN propagates. With
    ``with_scale`` also sqrt(softmax·v²), the error scale of each output element."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    qd = q.double()
    kd = k.double().repeat_interleave(Hq // Hkv, dim=1)
    vd = v.double().repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", qd, kd) * scale
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        visible = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        s = s + mask.double()
    s = torch.where(visible, s, -math.inf)
    # a row whose scores are all -inf is 0, whether masking or an Inf in q made them so (what
    # SDPA's math backend gives for the latter too)
    m = s.amax(dim=-1, keepdim=True)
    keep = (m > -math.inf) | m.isnan()
    e = torch.exp(s - torch.where(keep, m, 0.0))
    p = e / e.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhij,bhjd->bhid", p, vd)
    if with_scale:  # sqrt(E_p[v²]) per output element: the size of what the row averages
        return torch.where(keep, out, 0.0), torch.where(keep, torch.einsum("bhij,bhjd->bhid", p, vd * vd), 0.0).sqrt()
    return torch.where(keep, out, 0.0)


@st.composite
def problems(draw, max_sk=40):
    preset = draw(st.sampled_from(["none", "int8", "int8-fp8", "int4", "fp8"]))
    D = draw(st.integers(1, 256))
    if preset == "int4" and D % 2:
        D += 1 if D < 256 else -1
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 2))
    Sq, Sk = draw(st.integers(1, 40)), draw(st.integers(1, max_sk))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    mag = draw(st.sampled_from(MAGS))
    if dtype == torch.float16:
        mag = min(mag, 1e2)  # fp16 q·k with |q|,|k| ~1e3 overflows fp16 logits in SDPA too
    mask_kind = draw(st.sampled_from(["none", "bool", "additive", "finfo"]))
    return dict(preset=preset, D=D, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, dtype=dtype, mag=mag, mask_kind=mask_kind,
                causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.05, 1.0])),
                poison=draw(st.sampled_from([None, None, None, "nan", "inf"])), seed=draw(st.integers(0, 2**31 - 1)))


def run_problem(pb):
    """(kernel out, fp64 reference, finite-row relL2 or None) for one drawn problem."""
    g = torch.Generator().manual_seed(pb["seed"])
    B, D, Sq, Sk = 1, pb["D"], pb["Sq"], pb["Sk"]
    q = torch.randn(B, pb["Hq"], Sq, D, generator=g) * pb["mag"]
    k = torch.randn(B, pb["Hkv"], Sk, D, generator=g) * pb["mag"]
    v = torch.randn(B, pb["Hkv"], Sk, D, generator=g)
    mask = None
    if pb["mask_kind"] == "bool":
        mask = torch.rand(Sq, Sk, generator=g) < 0.7
        mask[0] = False  # a fully masked row
    elif pb["mask_kind"] in ("additive", "finfo"):
        mask = torch.randn(Sq, Sk, generator=g)
        if pb["mask_kind"] == "finfo":
            lo = torch.finfo(pb["dtype"]).min
            mask = torch.where(torch.rand(Sq, Sk, generator=g) < 0.3, lo, mask)
            mask[0] = lo  # a row masked entirely with finfo.min: the mean of v
            mask[:, -1] = -math.inf
        mask = mask.to(pb["dtype"])
    poisoned = bool(pb["poison"]) and pb["preset"] != "int4" and pb["mask_kind"] in ("none", "bool")
    if poisoned:
        q[0, 0, Sq // 2, D // 2] = math.nan if pb["poison"] == "nan" else math.inf
    q, k, v = (t.to(pb["dtype"]) for t in (q, k, v))
    scale = pb["scale"] if pb["scale"] is not None else 1 / math.sqrt(D)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        out = qflash.attention(q.to(DEV), k.to(DEV), v.to(DEV), quant=pb["preset"], causal=pb["causal"],
                               attn_mask=None if mask is None else mask.to(DEV), scale=pb["scale"],
                               backend="portable").cpu()
    ref, size = reference(q, k, v, causal=pb["causal"], mask=mask, scale=scale, with_scale=True)
    r = (0, 0, Sq // 2)
    if poisoned and pb["poison"] == "inf" and pb["preset"] != "none" and (ref[r] == 0).all() and out[r].isnan().all():
        # documented (README, Reliability): an Inf in q makes a quantised preset's row NaN (its
        # per-token scale is Inf); SDPA gives zeros when the Inf makes all the row's scores -inf
        out = out.clone()
        out[r] = 0.0
    bad_ref = ~ref.isfinite()
    rows = ~bad_ref.any(-1)  # rows the reference keeps finite
    err = None
    if rows.any():
        # relative to sqrt(softmax·v²), not to |out|: where the averaged values cancel (one key's +v
        # against another's -v) the output is ~0 and its relative error says nothing about the
        # kernel; the quantisation error scales with the values averaged, not with their mean
        a, b = out[rows].double(), ref[rows]
        den = size[rows].norm().item()
        err = (a - b).norm().item() / den if den > 0 else (a - b).norm().item()
    return out, ref, err


@pytest.mark.interpreter
# On a GPU every new (preset, head dim, dtype, mask) combination is a real Triton compile (~3-5 s):
# 100 draws ran past 200 s on the H200, so the GPU run takes the first 40 of the same sequence.
@settings(max_examples=40 if DEV == "cuda" else 100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems())
def test_kernel_path_fuzz(pb):
    out, ref, err = run_problem(pb)
    assert out.shape == ref.shape and out.dtype == pb["dtype"]
    # non-finite exactly where the definition is (NaN/Inf in a q row reaches that row only)
    assert torch.equal(~out.isfinite(), ~ref.isfinite()), pb
    if err is not None:
        assert err < bound(pb["preset"], logit_size(pb)), (err, pb)


def _split_everywhere(dev, programs, sk, block_n, k_block, v_block, one_launch=False):
    """``launch.pick_split_keys`` for the split fuzz: one aligned tile per split wherever there
    are two (the policy itself only splits on CUDA, for grids that leave SMs idle)."""
    align = math.lcm(block_n, max(k_block, 1), max(v_block, 1))
    return align if sk > align else None


@pytest.mark.interpreter
@settings(max_examples=30 if DEV == "cuda" else 60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems(max_sk=160))
def test_split_path_fuzz(pb):
    """The same properties with the keys split (flash-decoding: partial results merged by their
    lse; the one-launch mode with per-split statistics): masks with finfo.min rows and -inf
    columns, GQA, causal, NaN/Inf in q, across 2-5 splits."""
    from unittest import mock

    from qflash.kernels.portable import launch

    with mock.patch.object(launch, "pick_split_keys", _split_everywhere):
        out, ref, err = run_problem(pb)
    assert torch.equal(~out.isfinite(), ~ref.isfinite()), pb
    if err is not None:
        assert err < bound(pb["preset"], logit_size(pb)), (err, pb)
