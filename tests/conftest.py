"""Test configuration shared by the whole suite.

Without a CUDA GPU, Triton code runs through its CPU interpreter: ``TRITON_INTERPRET=1`` must be
in the environment *before* ``triton`` is first imported (Triton reads it at import time), so it
is set here, at conftest import, which pytest does before importing any test module. The
interpreter needs NumPy < 2.4 (see DESIGN.md); ``interpreter`` tests are skipped otherwise.

Markers (declared in pyproject.toml): ``gpu`` tests are skipped without CUDA; ``interpreter``
tests are skipped when no GPU is present and the interpreter cannot run; ``slow`` is informational.
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest

_TRITON_IMPORTED_EARLY = "triton" in sys.modules

import torch

HAS_CUDA = torch.cuda.is_available()

# pytest-xdist (the README's test command runs one worker per core): share the cores between the
# workers' torch thread pools instead of each worker spinning one thread per core
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from test modules

from helpers import cosine, rel_l2  # noqa: F401  (re-exported for tests that prefer conftest)


def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter can't run here, or None if it can."""
    if _TRITON_IMPORTED_EARLY:
        return "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1"
    try:
        import numpy
    except ImportError:
        return "numpy is not installed"
    major, minor = (int(p) for p in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        return f"Triton's interpreter needs numpy < 2.4, found {numpy.__version__}"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "gpu: needs a CUDA GPU (skipped without one)",
        "interpreter: runs Triton kernels through the CPU interpreter (TRITON_INTERPRET=1)",
        "slow: long-running",
    ):
        config.addinivalue_line("markers", line)


def pytest_report_header(config: pytest.Config) -> str:
    where = "cuda" if HAS_CUDA else "cpu, TRITON_INTERPRET=" + os.environ.get("TRITON_INTERPRET", "")
    return f"qflash tests: torch {torch.__version__}, {where}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    interp_problem = None if HAS_CUDA else _interpreter_problem()
    skip_interp = pytest.mark.skip(reason=f"no GPU and no Triton interpreter: {interp_problem}")
    for item in items:
        if not HAS_CUDA and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if interp_problem is not None and "interpreter" in item.keywords:
            item.add_marker(skip_interp)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A per-test seed: stable across runs, different for every test (and parametrization)."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded per test: fresh, reproducible random inputs."""
    return torch.Generator().manual_seed(seed)
