"""Kept for scripts that still import it: the interpreter fixes now live in the package
(``qflash.kernels.portable.interpreter``) and are applied by the portable family itself whenever
it runs under ``TRITON_INTERPRET=1``."""

from __future__ import annotations


def apply() -> bool:
    """Patch Triton's interpreter as qflash does (see ``qflash.kernels.portable.interpreter``)."""
    from qflash.kernels.portable.interpreter import apply as _apply

    return _apply()
