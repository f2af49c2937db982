"""Merging partial attention results with their log-sum-exps (ring attention's combine step).

Attention over the union of key blocks A and B, from each block's own result:
``lse = log(exp(lse_A) + exp(lse_B))`` and ``out = exp(lse_A - lse) · out_A + exp(lse_B - lse) · out_B``.
A block that masked a row entirely has ``lse = -inf`` and a zero output (``qflash.attention``'s
convention): its weight is 0. A row masked in every block keeps ``lse = -inf`` and a zero output.
"""

from __future__ import annotations

import torch

__all__ = ["merge_into"]


def merge_into(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Fold one partial result into the running one, in place, in fp32.

    Args:
        out: fp32 (B, H, S, D), the running output (zeros before the first block).
        lse: fp32 (B, H, S), the running log-sum-exp (-inf before the first block).
        part: (B, H, S, D) any float dtype, one block's output.
        part_lse: (B, H, S) fp32, that block's log-sum-exp (-inf: the block masked the row).
    """
    new = torch.logaddexp(lse, part_lse)
    # -inf - -inf is NaN: rows that are still empty take weight 0 (their reference point is 0).
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w_old = torch.exp(lse - ref).unsqueeze(-1)
    w_new = torch.exp(part_lse - ref).unsqueeze(-1)
    out.mul_(w_old).add_(part.float() * w_new)
    lse.copy_(new)
