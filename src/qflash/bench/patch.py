"""Route ``torch.nn.functional.scaled_dot_product_attention`` to ``qflash.attention``, reversibly.

Used by ``qflash accuracy`` to run a real model (MiniLM) with each preset. The harness keeps its
own small context manager so it depends only on ``qflash.attention``; the library's public
drop-in lives in ``qflash.sdpa``.

Calls the qflash path cannot express exactly fall through to the original function and are
counted separately: dropout, GQA flags, or ``is_causal`` with Sq != Sk (PyTorch aligns causal
masks to the top-left corner, qflash to the bottom-right; they agree only when Sq == Sk).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PatchStats:
    """How many SDPA calls went to qflash (``replaced``) and to the original (``passed``)."""

    replaced: int = 0
    passed: int = 0


@contextlib.contextmanager
def sdpa_to_qflash(quant):
    """Within the block, SDPA calls run ``qflash.attention(..., quant=quant)``; yields PatchStats.

    The original function is restored on exit, also when the block raises.
    """
    from .. import attention

    original = F.scaled_dot_product_attention
    stats = PatchStats()

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        gqa = kw.pop("enable_gqa", False)
        unsupported = (kw or dropout_p or query.dim() != 4 or (is_causal and query.shape[-2] != key.shape[-2])
                       or (gqa and query.shape[-3] != key.shape[-3]))
        if unsupported:
            stats.passed += 1
            if gqa:
                kw["enable_gqa"] = gqa
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kw)
        stats.replaced += 1
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(query.dtype)
        return attention(query, key, value, quant=quant, causal=bool(is_causal), attn_mask=attn_mask, scale=scale)

    F.scaled_dot_product_attention = patched
    try:
        yield stats
    finally:
        F.scaled_dot_product_attention = original
