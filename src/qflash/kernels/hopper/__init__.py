"""The Hopper (sm_90, Gluon) kernel family — registered, supporting nothing yet.

``FAMILY.supports`` answers False for every call until the family's forward is wired in, so
``backend="auto"`` moves on to the portable family. To enable it (see docs/ARCHITECTURE.md,
"A new kernel family"): widen ``SUPPORT`` to what the kernels run, drop the ``supports``
override (the declared support and ``check_extra`` then decide), and implement ``forward`` (and
``backward``, with ``backward=True``) with the tensor contract of ``qflash.kernels.family``.
"""

from __future__ import annotations

from ..family import Family, FamilySupport

__all__ = ["FAMILY", "SUPPORT"]

SUPPORT = FamilySupport(
    devices=frozenset({"cuda"}),
    min_cc=(9, 0),
    max_cc=(9, 0),
    dtypes=frozenset(),  # nothing yet
    presets=frozenset(),
    masks=frozenset({"none"}),
    causal=frozenset({"none"}),
    lse=False,
    layouts=frozenset({"HND", "NHD"}),
    backward=False,
    notes="stub: registered, no forward wired in yet",
)


class HopperFamily(Family):
    name = "hopper"
    support = SUPPORT

    def supports(self, spec, q, k, v, attn_mask, *, explicit: bool = False) -> tuple[bool, str]:
        return False, "the hopper family is not wired in yet"

    def tuning(self, device) -> str:
        return "hopper tiles (kernels.hopper.tuning), when wired in"


FAMILY = HopperFamily()
