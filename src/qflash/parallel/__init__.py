"""Sequence-parallel attention on ``torch.distributed``: ``qflash.parallel.attention``.

Modules: ``api`` (the public function, validation, mode dispatch), ``ulysses`` (all-to-all
heads <-> sequence), ``ring`` (K/V blocks around the ring, blockwise backward), ``merge``
(log-sum-exp combine), ``comm`` (the collectives: rank check, all-to-all, ring exchange,
zig-zag redistribution, hybrid sub-groups).
"""

from .api import MODES, ParallelConfig, attention

__all__ = ["MODES", "ParallelConfig", "attention"]
