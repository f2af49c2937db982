"""Route ``torch.nn.functional.scaled_dot_product_attention`` through qflash, reversibly, counting calls.

Used by ``qflash accuracy`` to run a real model (MiniLM) with each preset. It is the library's
one SDPA patcher, ``qflash.patch_sdpa`` (``qflash.sdpa``: PyTorch's semantics, top-left causal,
GQA), whose handle counts the calls it routed to qflash (``replaced``) and the ones it handed to
PyTorch's own SDPA (``passed``: dropout, float64, ...; each reason warns once).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def sdpa_to_qflash(quant):
    """Within the block, SDPA calls run ``qflash.sdpa(..., quant=quant)``; yields the patch handle
    (``.replaced`` / ``.passed`` counts). The original function is restored on exit, also when the
    block raises."""
    from ..dropin import patch_sdpa

    with patch_sdpa(quant, fallback=True) as handle:
        yield handle
