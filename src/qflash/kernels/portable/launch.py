"""Launchers: allocate outputs, pick a config, compute the grid, call the Triton kernels.

``attention_fwd`` runs the fused quantiser (after the K/V statistics launch where a preset needs
token statistics), smoothing's score terms (``smooth_terms``: Q smoothing's bias, K smoothing's
lse correction when the lse is returned), the attention kernel and, in the split-key mode, the
merge; on the CPU interpreter the token means are small PyTorch reductions instead of the
statistics launch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ...config import Granularity, GranularityKind, OperandQuant, Precision, QuantConfig
from ..common import (
    LOG2E,
    MASK_ADD,
    MASK_NONE,
    QK_FLOAT,
    QK_FP8,
    QK_INT4,
    QK_INT8,
    causal_offset,
    cdiv,
    mask_operand,
    next_pow2,
)
from ..fastlaunch import FastLauncher, PlanCache, note_host_op
from ..kv_quant import _STATS as _KV_STATS
from ..kv_quant import quantize_kv, stat_rows
from ..pdl import pdl_enabled
from . import attn_fwd, quantize, split_merge
from .smooth_terms import lse_correction, q_bias
from .support import kernel_support
from .tuning import (
    FP32_STAGE_CAPS,
    QUANT_SELF_STATS_MAX_SK,
    KernelConfig,
    float_pv_max_work,
    fused_quant_limits,
    fused_tiles,
    int4_packed_codes,
    pick_config,
    split_limits,
)

FP32_DOT_PRECISION = "ieee"  # how fp32 inputs are multiplied in tl.dot (the kernel's DOT_PRECISION)
_QUANTIZE = FastLauncher(quantize.quantize_qkv_kernel, n_pointers=12)
_ATTN_FWD = FastLauncher(attn_fwd.attn_fwd_kernel, n_pointers=14)
_MERGE = FastLauncher(split_merge.split_merge_kernel, n_pointers=4)

__all__ = [
    "QKVCodes",
    "attention_fwd",
    "attention_fwd_kv",
    "call_quant",
    "kernel_support",
    "one_launch_quant",
    "quantize_q",
    "quantize_qkv",
    "reference_args",
]

_KIND = {Precision.INT8: QK_INT8, Precision.INT4: QK_INT4, Precision.FP8_E4M3: QK_FP8}
_TORCH_CODE_DTYPE = {Precision.INT8: torch.int8, Precision.INT4: torch.uint8, Precision.FP8_E4M3: torch.float8_e4m3fn}
_DEFAULT_ROWS = 64  # rows per quantiser program when the granularity does not fix it (per-token scales)


# Replays of repeated single-launch calls (the ``none`` preset, or the fused-quantiser mode)
_PLANS = PlanCache()


def _plan_key(q, k, v, cfg, causal, top_left, scale, return_lse, out_layout, kernel_config, fused_quant):
    # aliasing matters: a plan maps each pointer to the first of (q, k, v, out, lse) it *is*, so
    # attention(x, x, x) and attention(q, k, v) must not share one; alignment is per pointer,
    # as Triton specialises it
    return (cfg, causal, top_left, scale, return_lse, out_layout, kernel_config, fused_quant, q.dtype, q.device.index,
            q.shape, q.stride(), k.shape, k.stride(), v.stride(), q is k, k is v, q is v,
            q.data_ptr() % 16 == 0, k.data_ptr() % 16 == 0, v.data_ptr() % 16 == 0)


def _alloc_out(q: torch.Tensor, out_layout: str) -> torch.Tensor:
    B, Hq, Sq, D = q.shape
    if out_layout == "NHD":
        return torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)


def use_fused_quant(device: torch.device, cfg: QuantConfig, programs_bh: int, sq: int, sk: int, block_m: int,
                    split_keys: int | None = None, block_n: int = 64, *, head_dim: int) -> bool:
    """Quantise inside the attention kernel when the problem is small (see tuning.FUSED_QUANT).

    ``sk`` keys per head; ``split_keys``: keys per program when the call is split (each split
    quantises only its own keys, with its own statistics). ``split_keys=None`` (auto) counts the
    split ``pick_split_keys`` would choose for the one-launch tiles. ``head_dim``: wide heads (> 64)
    with many query tiles take the separate quantiser (``max_programs_wide``)."""
    blocks = _fused_blocks(cfg, block_m, block_n, sq) if cfg.quantizes_qk else None
    if blocks is None:
        return False
    limits = fused_quant_limits(device)
    if head_dim > 64 and programs_bh * cdiv(sq, 64) > limits.get("max_programs_wide", limits["max_programs"]):
        return False
    max_sk = limits["max_sk_smooth_q"] if cfg.smooth_q else limits["max_sk_fp8_pv"] if cfg.quantizes_pv \
        else limits["max_sk"]
    programs = programs_bh * cdiv(sq, blocks[0])
    if split_keys is None:
        split_keys = _one_launch_split(device, cfg, programs, sk, *blocks)
    return programs <= limits["max_programs"] and min(sk, split_keys or sk) <= max_sk


def _fused_blocks(cfg: QuantConfig, block_m: int, block_n: int, sq: int | None = None) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_N) that make every scale group one tile in the fused mode, or None.
    ``sq``: the call's queries; with Q smoothing, a tile is one Q-mean block, or, when one
    Q-mean block holds every query, a tile that holds them all (the same mean: a single query
    needs no 128-row tile)."""
    cfg = one_launch_quant(cfg)
    if cfg.smooth_q:
        fits = sq is not None and sq <= cfg.q_mean_block
        block_m = min(cfg.q_mean_block, max(block_m, next_pow2(sq))) if fits else cfg.q_mean_block
    qg, kg = cfg.q.granularity, cfg.k.granularity
    if qg.kind is GranularityKind.BLOCK:
        if cfg.smooth_q and qg.size != block_m:
            return None
        block_m = qg.size
    if cfg.quantizes_pv and cfg.v.granularity.size:  # channel(0): any tile (the kernel pre-passes V's max)
        block_n = cfg.v.granularity.size
    if kg.kind is GranularityKind.BLOCK:
        if cfg.quantizes_pv and cfg.v.granularity.size and kg.size != block_n:
            return None
        block_n = kg.size
    if max(block_m, block_n) > 128:
        return None
    return block_m, block_n


@dataclass
class QKVCodes:
    """Output of the fused quantiser (shapes in ``qflash.kernels.portable.quantize``'s docstring)."""

    q: torch.Tensor
    q_scale: torch.Tensor
    q_mean: torch.Tensor | None
    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor | None
    v_t: torch.Tensor | None
    v_scale: torch.Tensor | None
    v_mean: torch.Tensor | None
    q_rows: int
    k_rows: int
    v_rows: int
    # (B, Hkv, n_chunks, D) K sums when the statistics kernel ran (k_mean is then None): the kernels
    # that need the mean reduce them as the quantiser does (``smooth_terms``)
    k_partials: torch.Tensor | None = None
    sk: int = 0
    # INT4 Q and K codes two per byte (False: one int8 per code, read by the kernel as INT8)
    int4_packed: bool = True


def _rows(g, default: int) -> int:
    return g.size if g.kind is GranularityKind.BLOCK else default


_FLOAT_OPERAND = OperandQuant(Precision.FP32)  # "not quantised" (config.py's placeholder)
_V_GLOBAL_ROWS = 128  # key block of the repeated per-channel V scale (V granularity channel(0))


def _v_rows(cfg: QuantConfig) -> int:
    """Keys per V scale block of the separate quantiser's output (channel(0): the per-channel
    scale repeated per ``_V_GLOBAL_ROWS`` keys)."""
    if not cfg.quantizes_pv:
        return _DEFAULT_ROWS
    return cfg.v.granularity.size or _V_GLOBAL_ROWS


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: QuantConfig, stats: bool | None = None,
                 self_stats: bool | None = None, pack_int4: bool = True) -> QKVCodes:
    """Quantise HND views q (B,Hq,Sq,D), k/v (B,Hkv,Sk,D) in one Triton launch, after the token
    statistics it needs (the K mean for smoothing, V's per-channel max for channel(0) scales).

    ``stats``: True computes those statistics with ``kv_quant.kv_stats_kernel`` (one launch of
    partials, summed inside the quantiser: no torch op, so the call can be replayed as a plan);
    False with torch reductions and, for channel(0) V, the shared K/V quantiser (the CPU
    interpreter's default: the golden digests were recorded with it). Default: True on CUDA.
    ``self_stats`` (with ``stats``): no statistics launch; the quantiser's K and V programs take
    the statistics over all keys themselves (``quantize_qkv_kernel``'s ``SELF_STATS``; the K mean
    comes back as ``k_mean``). Default: up to ``tuning.QUANT_SELF_STATS_MAX_SK`` keys, without V
    smoothing. ``pack_int4`` (INT4 presets): Q and K codes two per byte, (…, D // 2) uint8; False:
    one int8 per code, (…, D) (``tuning.int4_packed_codes``).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev = q.device
    if stats is None:
        stats = dev.type == "cuda"
    kind = _KIND[cfg.q.precision]
    packed = kind == QK_INT4 and pack_int4
    d_codes = D // 2 if packed else D
    code_dtype = _TORCH_CODE_DTYPE[cfg.q.precision] if packed or kind != QK_INT4 else torch.int8
    q_rows = cfg.q_mean_block if cfg.smooth_q else _rows(cfg.q.granularity, _DEFAULT_ROWS)
    k_rows = _rows(cfg.k.granularity, _DEFAULT_ROWS)
    q_per_token = cfg.q.granularity.kind is GranularityKind.TOKEN
    k_per_token = cfg.k.granularity.kind is GranularityKind.TOKEN
    qc = torch.empty((B, Hq, Sq, d_codes), dtype=code_dtype, device=dev)
    kc = torch.empty((B, Hkv, Sk, d_codes), dtype=code_dtype, device=dev)
    qs = torch.empty((B, Hq, Sq if q_per_token else cdiv(Sq, q_rows)), dtype=torch.float32, device=dev)
    ks = torch.empty((B, Hkv, Sk if k_per_token else cdiv(Sk, k_rows)), dtype=torch.float32, device=dev)
    qm = torch.empty((B, Hq, cdiv(Sq, q_rows), D), dtype=torch.float32, device=dev) if cfg.smooth_q else None
    # V with one scale per channel over all keys (channel(0)) needs every key first; the scale
    # then repeats per 128-key block
    v_global = cfg.quantizes_pv and cfg.v.granularity.size == 0
    v_rows = _v_rows(cfg)
    vm = None
    n_chunks = 0
    km = k_mean = None
    needs_stats = (cfg.smooth_k or v_global) and Sk > 0
    if self_stats is None:
        self_stats = Sk <= QUANT_SELF_STATS_MAX_SK
    self_stats = bool(stats and self_stats and needs_stats and not cfg.smooth_v)
    if self_stats:  # the quantiser's K programs write the mean (B, Hkv, D) here
        km = k_mean = torch.empty((B, Hkv, D), dtype=torch.float32, device=dev) if cfg.smooth_k else None
    elif stats and needs_stats:
        rows = stat_rows(Sk)
        n_chunks = cdiv(Sk, rows)
        km = torch.empty((B, Hkv, n_chunks, D), dtype=torch.float32, device=dev) if cfg.smooth_k else None
        vm = torch.empty((B, Hkv, n_chunks, D), dtype=torch.float32, device=dev) if v_global else None
        ku, vu = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        _KV_STATS((n_chunks, B * Hkv), (ku, vu, km if km is not None else vm, vm if vm is not None else km),
                  (ku.stride(0), ku.stride(1), ku.stride(2), vu.stride(0), vu.stride(1), vu.stride(2),
                   Hkv, Sk, n_chunks, rows, bool(cfg.smooth_k), v_global, 64, D, max(next_pow2(D), 16),
                   pdl_enabled(dev)),
                  num_warps=8, num_stages=3)
    elif cfg.smooth_k:
        km = k_mean = torch.mean(k, dim=2, dtype=torch.float32)  # (B, Hkv, D)
        note_host_op()
    stats = stats and n_chunks > 0
    if v_global and (stats or self_stats):
        sk_pad = cdiv(Sk, v_rows) * v_rows
        vt = torch.empty((B, Hkv, D, sk_pad), dtype=torch.float8_e4m3fn, device=dev)
        vs_channel = torch.empty((B, Hkv, D), dtype=torch.float32, device=dev)
        vs = vs_channel.unsqueeze(2).expand(B, Hkv, sk_pad // v_rows, D)
    elif v_global:
        _, _, vt, vs_channel, _ = quantize_kv(k, v, cfg, v_rows, quant_k=False)
        vs = vs_channel.unsqueeze(2).expand(B, Hkv, vt.shape[-1] // v_rows, D)
    elif cfg.quantizes_pv:
        sk_pad = cdiv(Sk, v_rows) * v_rows
        vt = torch.empty((B, Hkv, D, sk_pad), dtype=torch.float8_e4m3fn, device=dev)
        vs = torch.empty((B, Hkv, sk_pad // v_rows, D), dtype=torch.float32, device=dev)
        vm = torch.mean(v, dim=2, dtype=torch.float32) if cfg.smooth_v else None
        if vm is not None:
            note_host_op()
    else:
        vt = vs = None
    quant_v = cfg.quantizes_pv and (stats or self_stats or not v_global)  # V quantised by the launch below
    dummy = qs  # stands in for absent tensors; never dereferenced (guarded by constexprs)
    qm_, km_, vt_, vs_, vm_ = (t if t is not None else dummy for t in (qm, km, vt, vs, vm))

    nblocks = max(cdiv(Sq, q_rows), cdiv(Sk, k_rows), cdiv(Sk, v_rows) if quant_v else 0)
    grid = (max(nblocks, 1), B * Hq, 3)  # roles: Q, K, V blocks side by side
    if Sq or Sk:
        _QUANTIZE(grid, (q, k, v, qc, qs, qm_, kc, ks, km_, vt_, vs_, vm_), (
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *qc.stride()[:3], *qs.stride(),
            *(qm.stride()[:3] if qm is not None else (0, 0, 0)),
            *kc.stride()[:3], *ks.stride(),
            *(km.stride()[:2] if km is not None else (0, 0)),
            *(vt.stride()[:3] if vt is not None else (0, 0, 0)),
            *(vs.stride()[:3] if vs is not None else (0, 0, 0)),
            *(vm.stride()[:2] if vm is not None else (0, 0)),
            Hq, Hkv, Sq, Sk, n_chunks,
            # constexprs, in the kernel's order: KIND, Q_PER_TOKEN, K_PER_TOKEN, Q_ROWS, K_ROWS, V_ROWS,
            # SMOOTH_Q, SMOOTH_K, QUANT_V, SMOOTH_V, STATS, SELF_STATS, HEAD_DIM, HEAD_DIM_PAD, PACK_INT4,
            # USE_PDL
            kind, q_per_token, k_per_token, q_rows, k_rows, v_rows,
            bool(cfg.smooth_q), bool(cfg.smooth_k), quant_v, bool(cfg.smooth_v), stats, self_stats,
            D, max(next_pow2(D), 32), packed, pdl_enabled(dev),
        ), num_warps=8, num_stages=3)
    return QKVCodes(qc, qs, qm, kc, ks, k_mean, vt, vs, None if stats else vm, q_rows, k_rows, v_rows,
                    k_partials=km if stats else None, sk=Sk, int4_packed=packed or kind != QK_INT4)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: QuantConfig,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out_layout: str = "HND",
    top_left: bool = False,
    kernel_config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    fused_quant: bool | None = None,
    codes: QKVCodes | None = None,
    split_keys: int | None = None,
):
    """Quantised attention forward on HND views; returns (out HND view, lse (B, Hq, Sq) fp32 | None).

    ``kernel_config`` fixes tile sizes/warps/stages (tests); default: ``configs.pick_config``.
    ``fused_quant``: quantise inside the attention kernel (one launch) instead of in a separate
    quantiser launch; default: ``use_fused_quant`` (small problems only).
    ``out`` / ``lse``: optional preallocated outputs (HND view of q's shape and dtype; fp32
    (B, Hq, Sq) contiguous), e.g. NaN-poisoned in tests or static buffers for CUDA graphs.
    ``top_left``: align ``causal`` to the top-left corner (query i sees keys j <= i, PyTorch SDPA's)
    instead of the bottom-right one (j <= i + Sk - Sq); the kernel only moves its diagonal.
    ``split_keys``: keys per split of the split-key mode (a multiple of the key tile and of the K/V
    scale blocks; partial results merged by ``split_merge``; in the one-launch mode each split takes
    its own K/V statistics, see ``reference_args``); default: ``pick_split_keys`` (CUDA, grids
    too small to fill the GPU), 0 or None on the CPU: no split.
    ``codes``: operands already quantised (``attention_fwd_kv``); k / v then only give shapes
    (and v the values when P·V is not quantised).
    Raises ``NotImplementedError`` for configs ``kernel_support`` rejects.
    """
    if out is None and lse is None and attn_mask is None and q.is_cuda and codes is None:
        # a repeated call replays the launches recorded the first time (see PlanCache)
        plan_key = _plan_key(q, k, v, cfg, causal, top_left, scale, return_lse, out_layout, kernel_config,
                             (fused_quant, split_keys))
        plan = _PLANS.get(plan_key, q.device)
        if plan is not None:
            out = _alloc_out(q, out_layout)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
            _PLANS.replay(plan, q.device, (q, k, v, out, lse))
            return out, lse
        with _PLANS.record() as records:
            out, lse = _attention_fwd(q, k, v, cfg, causal=causal, attn_mask=None, scale=scale,
                                      return_lse=return_lse, out_layout=out_layout, top_left=top_left,
                                      kernel_config=kernel_config, out=None, lse=None, fused_quant=fused_quant,
                                      split_keys=split_keys)
        if _replayable(q, k, v, scale):
            _PLANS.remember(plan_key, records, (q, k, v, out, lse))
        return out, lse
    return _attention_fwd(q, k, v, cfg, causal=causal, attn_mask=attn_mask, scale=scale, return_lse=return_lse,
                          out_layout=out_layout, top_left=top_left, kernel_config=kernel_config, out=out, lse=lse,
                          fused_quant=fused_quant, codes=codes, split_keys=split_keys)


def _pick_tiles(q, sk, cfg, kernel_config, fused_quant, split_keys, pre_codes):
    """(KernelConfig, one-launch mode?, BLOCK_M, BLOCK_N) of a forward call: the picked or given
    tiles, fp32's stage cap, the one-launch decision (``use_fused_quant`` unless given) and its
    tiles (``tuning.fused_tiles``, widened to whole scale groups by ``_fused_blocks``)."""
    dev = q.device
    B, Hq, Sq, D = q.shape
    kc = kernel_config or pick_config(dev, D, cfg.quantizes_pv, Sq, sk, cfg.quantizes_qk)
    if q.dtype == torch.float32 and kernel_config is None:  # fp32 tiles: fewer stages fit shared memory
        cap = FP32_STAGE_CAPS["fwd"].get(64 if D <= 64 else 128 if D <= 128 else 256)
        if cap is not None and kc.num_stages > cap:
            kc = dataclasses.replace(kc, num_stages=cap)
    block_m, block_n = kc.block_m, kc.block_n
    if pre_codes is not None:
        fused_quant = False
    elif fused_quant is None:
        fused_quant = use_fused_quant(dev, cfg, B * Hq, Sq, sk, block_m, split_keys, block_n, head_dim=D)
    if fused_quant and cfg.quantizes_qk and _fused_blocks(cfg, block_m, block_n, Sq) is None:
        raise ValueError(f"fused_quant=True: {cfg.name!r} cannot be quantised inside the attention kernel "
                         "(its scale groups are not kernel tiles)")
    fused = bool(fused_quant) and cfg.quantizes_qk and sk > 0
    if fused:
        tiles = fused_tiles(dev, D, B * Hq * cdiv(Sq, 64), Sq) if kernel_config is None else None
        if tiles is not None:  # (rows, warps) for this GPU
            kc = dataclasses.replace(kc, block_m=tiles[0], num_warps=tiles[1])
        block_m, block_n = _fused_blocks(cfg, kc.block_m, block_n, Sq)
    return kc, fused, block_m, block_n


def _one_launch_scale_blocks(cfg: QuantConfig, block_m: int, block_n: int) -> tuple[int, int, int]:
    """Rows per Q scale, keys per K scale and per V scale in the one-launch mode (V: 0 = one scale
    per channel over all keys of the program's statistics range, from a pre-pass over V)."""
    cfg = one_launch_quant(cfg)
    q_scale_block = 1 if cfg.q.granularity.kind is GranularityKind.TOKEN else block_m
    k_scale_block = 1 if cfg.k.granularity.kind is GranularityKind.TOKEN else block_n
    v_scale_block = block_n if not cfg.quantizes_pv or cfg.v.granularity.size else 0
    return q_scale_block, k_scale_block, v_scale_block


@functools.lru_cache(maxsize=64)
def one_launch_quant(cfg: QuantConfig) -> QuantConfig:
    """The quantisation the one-launch mode runs for ``cfg``: K per token where ``cfg`` scales K
    per block of keys (a finer grid, so at least as accurate: a block scale forces 128-key tiles,
    whose fp32 copies spill ~1.2-1.7 KB per thread at D128 on sm_90a; token scales take 64-key
    tiles), else ``cfg`` itself. The fake-quant reference of a one-launch call is
    ``reference.fake_quant_attention(q, k, v, **reference_args(q, k, cfg))``. Cached: the launcher
    asks several times per call, and building a config costs ~10 µs of host time."""
    if cfg.quantizes_qk and cfg.k.granularity.kind is GranularityKind.BLOCK:
        return cfg.with_(k=OperandQuant(cfg.k.precision, Granularity.token()), name=cfg.name)
    return cfg


def call_quant(q: torch.Tensor, k: torch.Tensor, cfg: QuantConfig) -> QuantConfig:
    """The quantisation an automatic call of ``cfg`` runs on this family (``PortableFamily.forward``;
    launches with an explicit config run ``cfg``): ``cfg`` with P·V in the input dtype for FP8 P·V
    presets at or below ``tuning.float_pv_max_work`` multiply-adds per matmul on this GPU (faster
    there, and more accurate), else ``cfg``. q (B, Hq, Sq, D), k (B, Hkv, Sk, D)."""
    if not cfg.quantizes_pv:
        return cfg
    limit = float_pv_max_work(q.device)  # None on the CPU
    B, Hq, Sq, D = q.shape
    if limit is None or B * Hq * Sq * k.shape[2] * D > limit:
        return cfg
    return _float_pv(cfg)


@functools.lru_cache(maxsize=64)
def _float_pv(cfg: QuantConfig) -> QuantConfig:
    # cached: one object per preset, as plan and dispatch keys expect (and with_ costs ~10 µs)
    return cfg.with_(v=_FLOAT_OPERAND, p=_FLOAT_OPERAND, smooth_v=False, name=cfg.name)


def reference_args(q: torch.Tensor, k: torch.Tensor, cfg: QuantConfig, *, kernel_config: KernelConfig | None = None,
                   fused_quant: bool | None = None, split_keys: int | None = None) -> dict:
    """Keyword arguments of ``reference.fake_quant_attention`` that model ``attention_fwd(q, k, v,
    cfg, ...)`` with the same arguments: ``quant`` (``one_launch_quant(cfg)`` in the one-launch
    mode), ``stat_block`` (the split's keys when the one-launch mode splits the keys, each split
    smoothing with its own K mean and scaling V over its own keys; None when one set of K/V
    statistics covers all keys) and ``block_n`` (the key tile: FP8 P rounds per tile)."""
    B, Hq, Sq, _ = q.shape
    sk = k.shape[2]
    _, fused, block_m, block_n = _pick_tiles(q, sk, cfg, kernel_config, fused_quant, split_keys, None)
    if not fused:
        if cfg.quantizes_pv:  # the V scale block caps the tile (as _attention_fwd does)
            block_n = min(block_n, _v_rows(cfg))
        return {"quant": cfg, "stat_block": None, "block_n": block_n}
    if split_keys is None:
        split_keys = _one_launch_split(q.device, cfg, B * Hq * cdiv(Sq, block_m), sk, block_m, block_n)
    stat_block = split_keys if split_keys and cdiv(sk, split_keys) > 1 else None
    return {"quant": one_launch_quant(cfg), "stat_block": stat_block, "block_n": block_n}


def _one_launch_split(dev, cfg: QuantConfig, programs: int, sk: int, block_m: int, block_n: int) -> int | None:
    """``pick_split_keys`` for the one-launch mode's tiles (the one rule ``attention_fwd``,
    ``use_fused_quant`` and ``reference_args`` share)."""
    _, k_block, v_block = _one_launch_scale_blocks(cfg, block_m, block_n)
    return pick_split_keys(dev, programs, sk, block_n, k_block, v_block if cfg.quantizes_pv else 1, one_launch=True)


def _replayable(q, k, v, scale) -> bool:
    """Whether a CUDA call of ``_attention_fwd`` runs on the caller's own tensors (no copy or
    negation of an input). Torch ops inside the call (token means without the statistics launch, V
    smoothing's mean) mark the recording itself (``note_host_op``) and keep it from
    becoming a plan."""
    return all(t.stride(-1) == 1 for t in (q, k, v)) and (scale is None or scale >= 0)


def _attention_fwd(q, k, v, cfg, *, causal, attn_mask, scale, return_lse, out_layout, top_left, kernel_config,
                   out, lse, fused_quant, codes=None, split_keys=None):
    """``attention_fwd`` without the plan cache (same arguments)."""
    pre_codes = codes
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    ok, why = kernel_support(cfg, D)
    if not ok:
        raise NotImplementedError(f"qflash kernels do not implement this config: {why}")
    # the kernels read the channel dim contiguously; other strides are free
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if scale < 0:
        # the kernel's running max is max(x)·c, which needs c >= 0; softmax(s·QKᵀ) = softmax(|s|·(-Q)Kᵀ)
        # (symmetric quantisation of -Q gives the negated codes, so quantised results agree too)
        q, scale = -q, -scale
    qk_mult = scale * LOG2E
    dev = q.device

    if out is None:
        out = _alloc_out(q, out_layout)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must have shape {tuple(q.shape)}, dtype {q.dtype} and a contiguous last dim")
    if return_lse and lse is None:
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    elif lse is not None and (lse.shape != (B, Hq, Sq) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous fp32 tensor of shape {(B, Hq, Sq)}")
    if Sq == 0 or B * Hq == 0:
        return out, lse

    kc, fused, block_m, block_n = _pick_tiles(q, Sk, cfg, kernel_config, fused_quant, split_keys, pre_codes)
    head_dim_pad = max(next_pow2(D), 32)

    bias = lse_corr = None
    codes = None
    if fused:
        # one launch: the kernel quantises its own tiles (see attn_fwd's docstring)
        qa, ka, va = q, k, v
        qs = ks = vs = q  # unused pointers
        kind = _KIND[cfg.q.precision]
        q_scale_block, k_scale_block, v_scale_block = _one_launch_scale_blocks(cfg, block_m, block_n)
        stride_vn, v_bh, vs_strides = v.stride(2), (v.stride(0), v.stride(1)), (0, 0, 0)
        has_bias = bool(cfg.smooth_q)
        has_lse_corr = bool(return_lse and cfg.smooth_k)  # split calls: below
    else:
        if cfg.quantizes_qk:
            codes = pre_codes if pre_codes is not None else quantize_qkv(
                q, k, v, cfg, pack_int4=int4_packed_codes(dev))
            qa, ka = codes.q, codes.k
            qs, ks = codes.q_scale, codes.k_scale
            q_scale_block = 1 if cfg.q.granularity.kind is GranularityKind.TOKEN else codes.q_rows
            k_scale_block = 1 if cfg.k.granularity.kind is GranularityKind.TOKEN else codes.k_rows
            kind = _KIND[cfg.q.precision]
            if kind == QK_INT4 and not codes.int4_packed:
                kind = QK_INT8  # int4 values one per byte: the INT8 products, no unpacking
            if cfg.smooth_q:
                block_m = min(block_m, codes.q_rows)  # one Q-mean block per program
                # (B, Hq, nQblocks, Sk) fp32, one recorded launch (the K mean from the statistics'
                # partials when they ran, as the quantiser reduced it)
                bias = q_bias(k, codes.q_mean, codes.k_mean, qk_mult, k_partials=codes.k_partials)
            if return_lse and (codes.k_partials is not None or codes.k_mean is not None) and Sk > 0:
                # K smoothing's shift of every score of a row, for the returned lse: (B, Hq, Sq) fp32
                lse_corr = lse_correction(q, codes.k_mean, scale, Sk, k_partials=codes.k_partials)
        else:
            qa, ka, qs, ks = q, k, q, k  # scales unused for float operands
            q_scale_block = k_scale_block = 1
            kind = QK_FLOAT
        if cfg.quantizes_pv:
            va = codes.v_t
            stride_vn = va.stride(2)  # between channels of Vᵀ
            v_bh = (va.stride(0), va.stride(1))
            vs = codes.v_scale
            v_scale_block = codes.v_rows
            block_n = min(block_n, v_scale_block)
            vs_strides = vs.stride()[:3]
        else:
            va = v
            stride_vn = v.stride(2)
            v_bh = (v.stride(0), v.stride(1))
            vs = qs
            v_scale_block = 1
            vs_strides = (0, 0, 0)
        has_bias = bias is not None
        has_lse_corr = lse_corr is not None

    m4, mask_kind, mask_strides = mask_operand(attn_mask, B, Hq, Sq, Sk, q)

    use_tma = (kc.tma and codes is not None and cfg.quantizes_pv and kind in (QK_INT8, QK_FP8)
               and D == head_dim_pad and Sk > 0)
    rotate = (kc.rotate and not fused and mask_kind == MASK_NONE and not has_bias
              and (kind == QK_FLOAT or k_scale_block % block_n == 0))
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor(ka, [B * Hkv * Sk, D], [D, 1], [block_n, D])
        sk_pad = va.shape[-1]
        v_desc = TensorDescriptor(va, [B * Hkv * D, sk_pad], [sk_pad, 1], [D, block_n])
    else:
        k_desc = v_desc = None

    dummy = qs
    if split_keys is None and fused:
        split_keys = _one_launch_split(dev, cfg, B * Hq * cdiv(Sq, block_m), Sk, block_m, block_n)
    elif split_keys is None:
        split_keys = pick_split_keys(dev, B * Hq * cdiv(Sq, block_m), Sk, block_n,
                                     k_scale_block, v_scale_block if cfg.quantizes_pv else 1)
    n_splits = cdiv(Sk, split_keys) if split_keys else 1
    if n_splits > 1:
        if split_keys % block_n or (k_scale_block > 1 and split_keys % k_scale_block) or \
                (cfg.quantizes_pv and v_scale_block > 1 and split_keys % v_scale_block):
            raise ValueError(f"split_keys={split_keys} must be a multiple of the key tile ({block_n}) and of the "
                             "K and V scale blocks")
        # partial results per split (fp32), merged by split_merge_kernel into out / lse
        o_dst = torch.empty((B, Hq, n_splits, Sq, D), dtype=torch.float32, device=dev)
        # (additive masks: a second plane of log(l) per split, for rows all under finfo.min)
        planes = 2 if mask_kind == MASK_ADD else 1
        lse_dst = torch.empty((planes, B * Hq, n_splits, Sq), dtype=torch.float32, device=dev)[0]
        o_strides = (o_dst.stride(0), o_dst.stride(1), o_dst.stride(3))
        stride_os = o_dst.stride(2)
        # the one-launch mode smooths K per split: each split's lse gets its own q·mean back
        has_lse_corr = has_lse_corr or (fused and bool(cfg.smooth_k))
    else:
        o_dst, lse_dst, o_strides, stride_os = out, lse, out.stride()[:3], 0
    grid = (cdiv(Sq, block_m), B * Hq, n_splits)
    pointers = (
        qa, ka, va, qs, ks, vs, m4,
        bias if bias is not None else dummy,
        codes.v_mean if codes is not None and codes.v_mean is not None else dummy,
        lse_corr if lse_corr is not None else dummy,
        o_dst, lse_dst if lse_dst is not None else dummy, k_desc, v_desc,
    )
    scalars = (
        *qa.stride()[:3], *ka.stride()[:3],
        *v_bh, stride_vn,
        *(qs.stride()[:3] if codes is not None else (0, 0, 0)),
        *(ks.stride()[:3] if codes is not None else (0, 0, 0)),
        *vs_strides,
        *mask_strides,
        *(bias.stride()[:3] if bias is not None else (0, 0, 0)),
        *(codes.v_mean.stride()[:2] if codes is not None and codes.v_mean is not None else (0, 0)),
        *o_strides,
        Hq, Hq // Hkv, Sq, Sk, causal_offset(top_left, Sq, Sk), qk_mult, split_keys or Sk, stride_os,
        # constexprs, in the kernel's order
        kind, q_scale_block, k_scale_block,  # KIND, Q_SCALE_BLOCK, K_SCALE_BLOCK
        cfg.quantizes_pv, v_scale_block,  # PV_FP8, V_SCALE_BLOCK
        bool(causal), mask_kind, has_bias,  # IS_CAUSAL, MASK_KIND, HAS_BIAS
        codes.q_rows if bias is not None else 1,  # BIAS_BLOCK
        bool(cfg.smooth_v), lse_dst is not None, has_lse_corr,  # SMOOTH_V, RETURN_LSE, HAS_LSE_CORR
        fused, bool(cfg.smooth_k), bool(cfg.smooth_q),  # FUSED_QUANT, SMOOTH_K, SMOOTH_Q
        use_tma, rotate,  # USE_TMA, ROTATE
        D, head_dim_pad, block_m, block_n,  # HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N
        # DOT_PRECISION. fp32 inputs: TF32 products (Triton's default) cost ~1e-3 relative error
        FP32_DOT_PRECISION if q.dtype == torch.float32 else "tf32",
        n_splits > 1,  # SPLIT
        pdl_enabled(dev),  # USE_PDL
    )
    _ATTN_FWD(grid, pointers, scalars, num_warps=kc.num_warps, num_stages=kc.num_stages)
    if n_splits > 1:
        rows = merge_rows(B * Hq * Sq)
        _MERGE((cdiv(Sq, rows), B * Hq), (o_dst, lse_dst, out, lse if lse is not None else lse_dst), (
            *o_dst.stride()[:4], *out.stride()[:3], Hq, Sq, n_splits,
            lse is not None, max(next_pow2(n_splits), 2), D, head_dim_pad,  # RETURN_LSE, SPLITS_PAD, HEAD_DIM(_PAD)
            rows, mask_kind == MASK_ADD, pdl_enabled(dev),  # ROWS, CLAMPED_PLANE, USE_PDL
        ), num_warps=4 if D > 64 else 2, num_stages=1)
    return out, lse


_SM_COUNT: dict[int, int] = {}


def merge_rows(rows: int) -> int:
    """Output rows per program of the split merge: one while there are few (a decode step's
    queries), more past ~512 so that each program has several rows' loads in flight."""
    return 1 if rows <= 512 else 4 if rows <= 4096 else 8


def pick_split_keys(dev: torch.device, programs: int, sk: int, block_n: int, k_block: int, v_block: int,
                    one_launch: bool = False) -> int | None:
    """Keys per split when a call has too few query-tile programs to fill the GPU (flash-decoding):
    enough splits to give every SM a program, at least two key tiles each (``one_launch``: at
    least 128 keys, one tile of 128 — the one-launch mode's statistics pass and quantisation are
    per program, so it wants short splits; measured in ``tuning.FUSED_QUANT``), split boundaries
    on whole K/V scale blocks; None (no split) on the CPU, or when the grid is already full."""
    if dev.type != "cuda":
        return None
    sms = _SM_COUNT.get(dev.index)
    if sms is None:
        sms = _SM_COUNT[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
    limits = split_limits(dev)
    if programs * 2 > sms or sk < limits["min_sk"]:
        return None
    align = math.lcm(block_n, max(k_block, 1), max(v_block, 1))
    splits = min(sms // programs, cdiv(sk, max(block_n, 128) if one_launch else 2 * block_n), limits["max_splits"])
    if splits < 2:
        return None
    keys = cdiv(cdiv(sk, splits), align) * align
    return keys if keys < sk else None


# --- pre-quantised K/V (``qflash.quant.kv.QuantizedKV``) ---------------------------------------


def quantize_q(q: torch.Tensor, cfg: QuantConfig):
    """Q codes, scales and rows per scale (``QKVCodes.q`` / ``q_scale`` / ``q_rows``) by the shared
    quantiser given no keys: ``quantize_qkv`` with Sk = 0 and P·V in float has nothing else to do."""
    B, Hq, Sq, D = q.shape
    q_only = cfg.with_(v=_FLOAT_OPERAND, p=_FLOAT_OPERAND, smooth_k=False, smooth_v=False)
    none = q[:, :, :0]
    c = quantize_qkv(q, none, none, q_only)
    return c.q, c.q_scale, c.q_rows


def attention_fwd_kv(q: torch.Tensor, qkv, cfg: QuantConfig, *, causal: bool = False,
                     attn_mask: torch.Tensor | None = None, scale: float | None = None, return_lse: bool = False,
                     out_layout: str = "HND", top_left: bool = False, kernel_config: KernelConfig | None = None,
                     out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
    """``attention_fwd`` on a ``QuantizedKV``: Q quantised here (one launch), K/V codes as given
    (Vᵀ gathered into key order first if it is in the Hopper order), then the attention kernel."""
    B, Hkv, Sk, D = qkv.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if scale < 0:  # as attention_fwd: negate q, not the scale (the kernel's running max needs c >= 0)
        q, scale = -q, -scale
    if q.stride(-1) != 1:
        q = q.contiguous()
    qc, qs, q_rows = quantize_q(q, cfg)
    k_rows = qkv.k_block if qkv.k_block > 1 else _DEFAULT_ROWS
    if cfg.quantizes_pv:
        vt = qkv.vt_in_key_order()
        vs = qkv.v_scale.unsqueeze(2).expand(B, Hkv, vt.shape[-1] // _V_GLOBAL_ROWS, D)
        v = qkv.k  # shapes only
    else:
        vt = vs = None
        v = qkv.v
    codes = QKVCodes(qc, qs, None, qkv.k, qkv.k_scale, qkv.k_mean, vt, vs, None, q_rows, k_rows, _V_GLOBAL_ROWS)
    return attention_fwd(q, qkv.k, v, cfg, causal=causal, attn_mask=attn_mask, scale=scale, return_lse=return_lse,
                         out_layout=out_layout, top_left=top_left, kernel_config=kernel_config, out=out, lse=lse,
                         codes=codes)
