"""Opt-in input checks: ``qflash.check_inputs(q, k, quant=...)`` (issue 14 item 5).

Quantised attention degrades with the size of the logits: once one quantisation step of Q or K
moves a logit by about one unit, the softmax (one-hot at such scales) can pick another key and
the output error jumps (README, "Reliability": int8 0.8 % at logit std 1, 9 % at 100, 18 % at 1e4).
Nothing on the attention call path looks at the data (that would cost a host synchronisation on
every call); call this where you want to know, e.g. once per model on real activations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .config import Precision, QuantConfig, resolve_quant

__all__ = ["QFlashAccuracyWarning", "InputReport", "check_inputs"]


class QFlashAccuracyWarning(UserWarning):
    """``check_inputs`` found inputs for which the preset's quantisation error is large."""


@dataclass(frozen=True)
class InputReport:
    """What ``check_inputs`` measured (Python floats / ints; the check synchronises once).

    logit_step: the largest change of a logit caused by one quantisation step of one Q element
        (or one K element) at the largest |K| (|Q|) of its head: ``scale * step(q) * max|k|``,
        ``step`` being ``amax / qmax`` for INT8/INT4 (per token) and the e4m3 spacing at ``amax``
        (``amax / 14``) for FP8. 0 for presets that do not quantise Q/K.
    logit_max: ``|scale| * max_i ||q_i|| * max_j ||k_j||`` per head, the largest: a bound on the
        logits (beyond ~1e2 the softmax is nearly one-hot).
    nonfinite: number of NaN/Inf elements in q and k (they propagate to the output, as in SDPA).
    ok: ``logit_step <= max_step and nonfinite == 0``.
    """

    logit_step: float
    logit_max: float
    nonfinite: int
    ok: bool


def _step_fraction(cfg: QuantConfig, which: str) -> float:
    """One quantisation step as a fraction of the group's absmax."""
    p = getattr(cfg, which).precision
    if p is Precision.FP8_E4M3:
        return 32.0 / 448.0  # e4m3 spacing in the top binade [256, 448]
    return 1.0 / p.qmax


def check_inputs(q: torch.Tensor, k: torch.Tensor, quant: str | QuantConfig = "int8", *, scale: float | None = None,
                 layout: str = "HND", max_step: float = 1.0, warn: bool = True) -> InputReport:
    """Say whether ``quant`` suits these q, k (opt-in; one host synchronisation).

    Args:
        q: (B, Hq, Sq, D) for layout "HND" or (B, Sq, Hq, D) for "NHD"; any float dtype.
        k: (B, Hkv, Sk, D) / (B, Sk, Hkv, D).
        quant: the preset (or ``QuantConfig``) you intend to run.
        scale: the softmax scale (default ``1 / sqrt(D)``).
        max_step: the largest acceptable ``logit_step`` (see ``InputReport``); 1 logit by default.
        warn: emit a ``QFlashAccuracyWarning`` when the report is not ok.

    Returns:
        An ``InputReport``. K smoothing (``smooth_k``) is taken into account (K's token mean is
        removed before its absmax is taken, as the kernels do).
    """
    if layout not in ("HND", "NHD"):
        raise ValueError(f"layout must be 'HND' or 'NHD', got {layout!r}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise TypeError(f"{name} must be a 4-D floating-point torch.Tensor, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")
    if layout == "NHD":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    cfg = resolve_quant(quant)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf, kf = q.float(), k.float()
    nonfinite = (~torch.isfinite(qf)).sum() + (~torch.isfinite(kf)).sum()
    ks = kf - kf.mean(dim=2, keepdim=True) if cfg.smooth_k and kf.shape[2] else kf
    # per head: the largest |q| element and |k| element (after smoothing), and the largest norms
    q_amax = qf.abs().amax(dim=(2, 3)) if qf.numel() else qf.new_zeros(qf.shape[:2])
    k_amax = ks.abs().amax(dim=(2, 3)) if ks.numel() else ks.new_zeros(ks.shape[:2])
    group = q.shape[1] // max(k.shape[1], 1)
    k_amax = k_amax.repeat_interleave(group, dim=1) if group > 1 else k_amax
    q_norm = qf.norm(dim=-1).amax(dim=2) if qf.numel() else q_amax
    k_norm = kf.norm(dim=-1).amax(dim=2) if kf.numel() else k_amax
    k_norm = k_norm.repeat_interleave(group, dim=1) if group > 1 else k_norm
    if cfg.quantizes_qk:
        step = torch.maximum(q_amax * _step_fraction(cfg, "q") * k_amax, k_amax * _step_fraction(cfg, "k") * q_amax)
        logit_step = scale * step.amax()
    else:
        logit_step = torch.zeros((), device=q.device)
    logit_max = abs(scale) * (q_norm * k_norm).amax() if q_norm.numel() else torch.zeros((), device=q.device)
    vals = torch.stack([torch.nan_to_num(logit_step.float(), nan=math.inf), torch.nan_to_num(logit_max.float(), nan=math.inf),
                        nonfinite.float()]).tolist()  # the one synchronisation
    report = InputReport(abs(vals[0]), vals[1], int(vals[2]), abs(vals[0]) <= max_step and vals[2] == 0)
    if warn and not report.ok:
        why = []
        if report.nonfinite:
            why.append(f"{report.nonfinite} NaN/Inf elements in q/k (they propagate to the output)")
        if report.logit_step > max_step:
            why.append(f"one {cfg.name} quantisation step moves a logit by up to {report.logit_step:.3g} "
                       f"(> {max_step:g}; logits up to ~{report.logit_max:.3g}): the softmax is nearly one-hot "
                       "and quantisation can pick the wrong key (README: Reliability); consider quant='none' "
                       "or 'int8' over coarser presets, or normalise q/k")
        warnings.warn("qflash.check_inputs: " + "; ".join(why), QFlashAccuracyWarning, stacklevel=2)
    return report
