"""Do the attention weights stay in [0, 1]? Checked from the quantised scores and the lse.

Method: ``qflash.attention(..., return_lse=True)`` returns the log-sum-exp ``lse`` of each row
as the kernel (or reference) computed it. We rebuild the score matrix the quantised path uses —
the same smoothing, the same codes and scales (``qflash.quant``), the same block-bias
restoration, the K-mean shift that the lse includes — in fp32 with TF32 off, and form
``P = exp(Ŝ − lse)``. Those are the weights the output was normalised with, so:

- every ``P`` lies in [0, 1] iff ``lse >= max_j Ŝ_ij`` (checked: ``p_max <= 1 + tol``), and
- every row sums to 1 iff ``lse = logsumexp_j Ŝ_ij`` (checked: ``row_sum_max_err <= tol``).

``tol`` (``TOLERANCE``, by the Q/K precision) allows for a quantiser that agrees with
``qflash.quant`` only to the last ulp: an input that sits within an ulp of a rounding boundary
may get the neighbouring code, which moves row sums by ~1e-6 (int4), ~1e-3 (int8) and ~1e-2
(fp8) on N(0,1) inputs — measured by perturbing the inputs by 2e-7 relative. A wrong
normaliser, a missing K-mean shift or a NaN moves them by far more. Masked positions (causal,
boolean masks) are excluded (weight 0).
"""

from __future__ import annotations

import math

import torch

from ..config import QuantConfig
from ..quant import block_mean, dequantize, quantize, token_mean
from ..reference import expand_kv, keep_mask
from .metrics import _ieee_fp32

#: allowed |row sum - 1| and P above 1, by the precision of Q and K
TOLERANCE = {"float": 1e-3, "int8": 1e-2, "int4": 1e-2, "fp8_e4m3": 5e-2}
BUDGET = 2**24  # score elements per step


def _operands(q, k, cfg: QuantConfig):
    """(q_hat, k_hat, q_mean_rows or None, ks, k_mean or None), fp32, as the kernels quantise."""
    Sq = q.shape[-2]
    qf, kf = q.float(), k.float()
    k_mean = token_mean(kf) if cfg.smooth_k else None
    ks = kf - k_mean if k_mean is not None else kf
    q_rows = None
    if cfg.smooth_q:
        q_rows = block_mean(qf, cfg.q_mean_block).repeat_interleave(cfg.q_mean_block, dim=-2)[..., :Sq, :]
    qs = qf - q_rows if q_rows is not None else qf
    if cfg.quantizes_qk:
        q_hat = dequantize(quantize(qs, cfg.q), torch.float32)
        return q_hat, dequantize(quantize(ks, cfg.k), torch.float32), q_rows, ks, k_mean
    return qf, kf, None, ks, None


@torch.no_grad()
def check_weights(q, k, lse, cfg: QuantConfig, *, causal=False, attn_mask=None, scale=None) -> dict:
    """{"p_min", "p_max", "row_sum_max_err", "weights_in_unit_interval"} for HND q, k and lse (B, Hq, Sq)."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_hat, k_hat, q_rows, ks, k_mean = _operands(q, k, cfg)
    k_hat, ks = expand_kv(k_hat, Hq), expand_kv(ks, Hq)
    k_mean = expand_kv(k_mean, Hq) if k_mean is not None else None
    keep, additive = keep_mask(Sq, Sk, causal, attn_mask, q.device)
    q_shift = scale * (q.float() @ k_mean.transpose(-1, -2)) if k_mean is not None else None  # (B, Hq, Sq, 1)
    p_min, p_max, sum_err, nan = math.inf, -math.inf, 0.0, False
    step = max(1, min(Sq, BUDGET // max(1, B * Hq * Sk)))
    with _ieee_fp32():
        for i0 in range(0, Sq, step):
            rows = slice(i0, min(i0 + step, Sq))
            s = q_hat[..., rows, :] @ k_hat.transpose(-1, -2)
            if q_rows is not None:
                s = s + q_rows[..., rows, :] @ ks.transpose(-1, -2)
            t = s * scale
            if q_shift is not None:  # the lse includes the K-mean shift scale * q·mean(k)
                t = t + q_shift[..., rows, :]
            if additive is not None:
                t = t + _rows(additive, rows).to(t.dtype)
            if keep is not None:
                t = t.masked_fill(~_rows(keep, rows), float("-inf"))
            l = lse[..., rows].float()
            ok = torch.isfinite(l)  # rows with every key masked have lse = -inf and no weights
            p = torch.exp(t[ok] - l[ok][:, None])
            if p.numel():
                nan |= bool(torch.isnan(p).any())
                p_min, p_max = min(p_min, p.min().item()), max(p_max, p.max().item())
                sum_err = max(sum_err, (p.sum(-1) - 1).abs().max().item())
    tol = tolerance(cfg)
    good = not nan and p_min >= 0 and p_max <= 1 + tol and sum_err <= tol
    return {"p_min": p_min, "p_max": p_max, "row_sum_max_err": sum_err, "weights_in_unit_interval": good}


def tolerance(cfg: QuantConfig) -> float:
    """The check's tolerance for this config (see ``TOLERANCE``)."""
    return TOLERANCE["float" if cfg.q.precision.is_float else cfg.q.precision.value]


def _rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """The query rows ``rows`` of a mask broadcastable to (B, H, Sq, Sk)."""
    return mask[..., rows, :] if mask.dim() >= 2 and mask.shape[-2] > 1 else mask
