"""Reference attention in pure PyTorch, on any device.

Two functions, both on the "HND" layout: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv),
Hq a multiple of Hkv (GQA/MQA: query head h reads key/value head ``h // (Hq // Hkv)``).

- ``exact_attention``: softmax(q·kᵀ·scale + mask)·v in fp64 (or fp32), the ground truth.
- ``fake_quant_attention``: the same attention computed the way the Triton kernels compute it
  for a ``QuantConfig`` — same smoothing, same codes and scales, same bias restoration, same
  tile-by-tile online softmax with P rounded to its precision per key tile of ``block_n``. A
  kernel is tested tightly against it; it is tested against the exact one within the preset's
  error budget. That separates quantisation error from kernel bugs.

Conventions shared with the kernels:

- ``causal`` is aligned to the bottom-right corner: query i sees key j iff ``j <= i + Sk - Sq``
  (FlashAttention's convention), or with ``top_left=True`` to the top-left one (``j <= i``,
  PyTorch SDPA's; ``qflash.sdpa`` uses it).
- ``attn_mask`` is boolean (True = attend) or float (added to the scaled scores), broadcastable
  to (B, Hq, Sq, Sk).
- A row whose keys are all masked returns zeros, and its log-sum-exp is -inf.
- NaN/Inf in q, k or v reach the rows that use them as in PyTorch SDPA (math backend): a NaN
  score or a +Inf one (Inf·finite) makes its row NaN, a NaN/Inf in v the columns it feeds.
- An additive mask of ``torch.finfo(dtype).min`` swamps the scores in fp32 (as in SDPA): a row
  masked with it entirely is the mean of v, and its gradient that of the uniform softmax.
- ``lse`` is the natural-log log-sum-exp of the scaled, masked scores, shape (B, Hq, Sq), fp32.
"""

from __future__ import annotations

import math

import torch

from .config import Granularity, OperandQuant, Precision, QuantConfig, resolve_quant
from .quant.core import block_mean, dequantize, expand_scales, quantize, token_mean

__all__ = ["exact_attention", "fake_quant_attention", "fake_quant_attention_kv", "keep_mask", "expand_kv", "reference_backward"]


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """Repeat key/value heads (B, Hkv, S, D) so there are ``hq`` of them (GQA/MQA)."""
    hkv = x.shape[1]
    return x if hkv == hq else x.repeat_interleave(hq // hkv, dim=1)


def keep_mask(sq: int, sk: int, causal: bool, attn_mask: torch.Tensor | None, device,
              top_left: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split masking into (keep, additive): keep is bool broadcastable to (B,H,Sq,Sk) or None."""
    keep = None
    additive = None
    if causal:
        i = torch.arange(sq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        keep = j <= i + (0 if top_left else sk - sq)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            additive = attn_mask
    return keep, additive


def _masked_scores(t: torch.Tensor, keep, additive) -> torch.Tensor:
    if additive is not None:
        t = t + additive.to(t.dtype)
    if keep is not None:
        t = t.masked_fill(~keep, float("-inf"))
    return t


def _softmax_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, lse, has_keys) of scores t (..., Sk): p = softmax (0 on rows with no visible key).

    Normalised by the row sum, not by exp(lse): under a finfo.min mask lse swamps log(Sk) in fp32
    and exp(t - lse) would be 1 per key. A NaN or +Inf score makes its row NaN (SDPA's result).
    """
    m = t.amax(dim=-1, keepdim=True) if t.shape[-1] else t.new_full((*t.shape[:-1], 1), float("-inf"))
    has = m != float("-inf")  # NaN rows count as having keys: they stay NaN
    e = torch.exp(t - torch.where(has, m, torch.zeros_like(m)))
    total = e.sum(dim=-1, keepdim=True)
    p = torch.where(has, e / torch.where(has, total, torch.ones_like(total)), torch.zeros_like(e))
    lse = torch.where(has, m + torch.log(torch.where(has, total, torch.ones_like(total))), m)
    return p, lse.squeeze(-1), has


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
    top_left: bool = False,
):
    """Exact attention in ``compute_dtype`` (fp64 by default); returns out in q's dtype.

    Returns ``out`` (B, Hq, Sq, Dv), or ``(out, lse)`` with ``lse`` fp32 (B, Hq, Sq) when
    ``return_lse``.
    """
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf = q.to(compute_dtype)
    kf = expand_kv(k, Hq).to(compute_dtype)
    vf = expand_kv(v, Hq).to(compute_dtype)
    keep, additive = keep_mask(Sq, Sk, causal, attn_mask, q.device, top_left)
    t = _masked_scores(qf @ kf.transpose(-1, -2) * scale, keep, additive)
    t = t.expand(B, Hq, Sq, Sk)
    p, lse, has = _softmax_rows(t)
    out = torch.where(has, p @ vf, torch.zeros((), dtype=vf.dtype, device=vf.device)).to(q.dtype)
    return (out, lse.float()) if return_lse else out


def fake_quant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    quant: str | QuantConfig = "int8",
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_n: int = 64,
    top_left: bool = False,
    stat_block: int | None = None,
):
    """Attention computed the way the qflash kernels compute it for ``quant``.

    Args:
        q, k, v: HND tensors (fp16, bf16 or fp32).
        quant: preset name or ``QuantConfig``.
        block_n: key-tile width of the online softmax; P is rounded to its precision per tile
            relative to the running row maximum, exactly as a kernel with ``BLOCK_N = block_n``.
        stat_block: K/V token statistics per block of this many keys instead of over all keys
            (the one-launch kernel's split-key mode, one block per split): K and V means per
            block, V's per-channel scales (``channel(0)``) per block; each block's q·mean shift
            is added back to its scores. None: over all keys.

    Returns ``out`` in q's dtype, or ``(out, lse)``.
    """
    cfg = resolve_quant(quant)
    Sk = k.shape[2]
    kf, vf = k.float(), v.float()
    # --- K/V side: smoothing and quantisation -------------------------------------------------
    if stat_block:
        if cfg.quantizes_pv and cfg.v.granularity == Granularity.channel(0):
            cfg = cfg.with_(v=OperandQuant(cfg.v.precision, Granularity.channel(stat_block)), name=cfg.name)
        k_mean = _per_key(block_mean(kf, stat_block), stat_block, Sk) if cfg.smooth_k and Sk else None
    else:
        k_mean = token_mean(kf) if cfg.smooth_k and Sk else None
    ks = kf - k_mean if k_mean is not None else kf
    k_hat = dequantize(quantize(ks, cfg.k), torch.float64) if cfg.quantizes_qk else None
    if stat_block:
        v_mean = _per_key(block_mean(vf, stat_block), stat_block, Sk) if cfg.smooth_v and Sk else None
    else:
        v_mean = token_mean(vf) if cfg.smooth_v and Sk else None
    vs = vf - v_mean if v_mean is not None else vf
    v_codes = v_scale = None
    if cfg.quantizes_pv:
        v_q = quantize(vs, cfg.v)
        v_codes = v_q.data.float()  # fp8 values as fp32, exact
        v_scale = expand_scales(v_q.scale, v_q.granularity, v_q.shape)
    return _fake_quant_core(q, k, v, cfg, k_mean, ks, k_hat, v_mean, v_codes, v_scale, causal=causal,
                            attn_mask=attn_mask, scale=scale, return_lse=return_lse, block_n=block_n,
                            top_left=top_left)


def _per_key(block_stats: torch.Tensor, block: int, sk: int) -> torch.Tensor:
    """(..., ceil(Sk/block), D) per-block statistics repeated to (..., Sk, D), one row per key."""
    return block_stats.repeat_interleave(block, dim=-2)[..., :sk, :]


def fake_quant_attention_kv(
    q: torch.Tensor,
    qkv,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_n: int = 64,
    top_left: bool = False,
):
    """``fake_quant_attention`` on pre-quantised keys and values (a ``qflash.quant.kv.QuantizedKV``):
    Q is quantised here, K and V are the given codes and scales. Bit-identical to
    ``fake_quant_attention(q, k, v, qkv.quant)`` when ``qkv`` holds the codes that function
    would compute (``quantize_kv_reference``)."""
    cfg = qkv.quant
    B, H, Sk, D = qkv.shape
    k_hat = dequantize(qkv.k_tensor(), torch.float64)
    k_mean = qkv.k_mean[:, :, None, :] if qkv.k_mean is not None and Sk else None
    v_codes = v_scale = None
    if cfg.quantizes_pv:
        v_codes = qkv.vt_in_key_order()[..., :Sk].transpose(-1, -2).float()
        v_scale = qkv.v_scale[:, :, None, :].expand(B, H, Sk, D)
        v = v_codes  # shape only
    else:
        v = qkv.v
    return _fake_quant_core(q, None, v, cfg, k_mean, None, k_hat, None, v_codes, v_scale, causal=causal,
                            attn_mask=attn_mask, scale=scale, return_lse=return_lse, block_n=block_n,
                            top_left=top_left, Sk=Sk)


def _fake_quant_core(q, k, v, cfg, k_mean, ks, k_hat, v_mean, v_codes, v_scale, *, causal, attn_mask, scale,
                     return_lse, block_n, top_left, Sk=None):
    """Scores from the quantised operands, then the kernels' tile-wise online softmax and P·V.

    k: the raw keys (only read for unquantised Q·K); ks: the smoothed fp32 keys (only read by
    smooth_q's bias); k_hat: dequantised K codes fp64 (B, Hkv, Sk, D) when Q·K is quantised;
    v_codes / v_scale: FP8 V codes as fp32 and their scales expanded to (B, Hkv, Sk, Dv) when
    P·V is quantised, else ``v`` is used as it is.
    """
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2] if Sk is None else Sk
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf = q.float()

    # --- scores: quantisation of Q, bias restoration -------------------------------------------
    q_mean = block_mean(qf, cfg.q_mean_block) if cfg.smooth_q and Sq else None
    qs = qf - q_mean.repeat_interleave(cfg.q_mean_block, dim=-2)[..., :Sq, :] if q_mean is not None else qf
    if cfg.quantizes_qk:
        q_hat = dequantize(quantize(qs, cfg.q), torch.float64)
        scores = (q_hat @ expand_kv(k_hat, Hq).transpose(-1, -2)).float()
    else:
        # full precision: the kernel feeds the input dtype to the MMA and accumulates in fp32
        scores = q.float() @ expand_kv(k, Hq).float().transpose(-1, -2)
    if q_mean is not None:
        bias = q_mean @ expand_kv(ks, Hq).transpose(-1, -2)  # (B, Hq, nQblocks, Sk), fp32
        scores = scores + bias.repeat_interleave(cfg.q_mean_block, dim=-2)[..., :Sq, :]
    # per-block K means (stat_block): each key's own shift goes back into its score (one mean for
    # all keys shifts every score of a row alike: the softmax drops it, the lse gets it back below)
    block_k_mean = k_mean is not None and k_mean.shape[-2] > 1 and cfg.quantizes_qk
    if block_k_mean:
        scores = scores + qf @ expand_kv(k_mean, Hq).transpose(-1, -2)
    keep, additive = keep_mask(Sq, Sk, causal, attn_mask, q.device, top_left)
    t = _masked_scores(scores * scale, keep, additive)
    t = t.expand(B, Hq, Sq, Sk)

    # --- P·V: tile-wise online softmax ---------------------------------------------------------
    if cfg.quantizes_pv:
        v_codes = expand_kv(v_codes, Hq)
        v_scale = expand_kv(v_scale, Hq)
    else:
        v_lp = expand_kv(v if q.dtype != torch.float32 else v.float(), Hq)

    Dv = v.shape[-1]
    m = torch.full((B, Hq, Sq), float("-inf"), device=q.device)
    l = torch.zeros((B, Hq, Sq), device=q.device)
    acc = torch.zeros((B, Hq, Sq, Dv), device=q.device)
    for n0 in range(0, Sk, block_n):
        tt = t[..., n0:n0 + block_n]
        m_new = torch.maximum(m, tt.amax(dim=-1))
        m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)  # +Inf/NaN stay: NaN rows
        p = torch.exp(tt - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(dim=-1)
        if cfg.quantizes_pv:
            p8 = (p * Precision.FP8_E4M3.qmax).to(torch.float8_e4m3fn).float()
            # one partial product per tile in fp32, scaled per channel: the kernel's two-level sum
            # (the V scale is constant within a tile because the V block is a multiple of block_n)
            vsc = v_scale[..., n0, :] / Precision.FP8_E4M3.qmax  # (B, Hq, Dv)
            pv = (p8 @ v_codes[..., n0:n0 + block_n, :]) * vsc[..., None, :]
        else:
            pv = p.to(v_lp.dtype).float() @ v_lp[..., n0:n0 + block_n, :].float()
        acc = acc * alpha[..., None] + pv
        m = m_new
    has_keys = l != 0  # 0 iff no visible key; a NaN row stays NaN
    out = torch.where(has_keys[..., None], acc / torch.where(has_keys, l, torch.ones_like(l))[..., None], torch.zeros_like(acc))
    if v_mean is not None and v_mean.shape[-2] > 1:  # per-block V means: the softmax's mix of them
        mix = torch.softmax(t, dim=-1) @ expand_kv(v_mean, Hq)  # (fully masked rows: NaN, not used)
        out = torch.where(has_keys[..., None], out + mix, out)
    elif v_mean is not None:
        out = torch.where(has_keys[..., None], out + expand_kv(v_mean, Hq), out)
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(has_keys, m + torch.log(torch.where(has_keys, l, torch.ones_like(l))), torch.full_like(l, float("-inf")))
    if k_mean is not None and not block_k_mean:
        corr = scale * (qf @ expand_kv(k_mean, Hq).transpose(-1, -2)).squeeze(-1)
        lse = lse + torch.where(has_keys, corr, torch.zeros_like(corr))  # -inf stays -inf (NaN q rows)
    return out, lse


def reference_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    top_left: bool = False,
):
    """Gradients of exact attention at (q, k, v), in fp32, returned in the inputs' dtypes.

    Args:
        q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv): HND, Hq a multiple of Hkv.
        grad_out (B, Hq, Sq, Dv): gradient of the output.
        grad_lse (B, Hq, Sq) or None: gradient of the log-sum-exp output (d lse / d s = p).
        causal: bottom-right aligned (``top_left``: top-left). attn_mask: bool (keep) or float (additive).

    Returns ``(dq, dk, dv, dmask)``; ``dmask`` is None unless ``attn_mask`` is floating point,
    in which case it has ``attn_mask``'s shape (summed over broadcast dimensions) and dtype.
    Rows with every key masked contribute nothing.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf = q.float()
    kf = expand_kv(k, Hq).float()
    vf = expand_kv(v, Hq).float()
    keep, additive = keep_mask(Sq, Sk, causal, attn_mask, q.device, top_left)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if additive is not None:
        s = s + additive.float()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    s = s.expand(B, Hq, Sq, Sk)
    p = _softmax_rows(s)[0]  # (B, Hq, Sq, Sk); rows with no key: 0; NaN rows NaN

    do = grad_out.float()
    dv = torch.matmul(p.transpose(-1, -2), do)  # (B, Hq, Sk, Dv)
    dp = torch.matmul(do, vf.transpose(-1, -2))  # (B, Hq, Sq, Sk)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    if grad_lse is not None and grad_lse.numel():
        ds = ds + p * grad_lse.float()[..., None]
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale  # (B, Hq, Sk, D)
    if group > 1:  # GQA: sum the query heads that share a key/value head
        dk = dk.view(B, Hkv, group, Sk, D).sum(dim=2)
        dv = dv.view(B, Hkv, group, Sk, dv.shape[-1]).sum(dim=2)
    dmask = None
    if attn_mask is not None and attn_mask.is_floating_point():
        dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask
