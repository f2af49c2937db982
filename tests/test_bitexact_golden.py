"""Outputs are bit-identical to the recorded golden ones (issue 12: refactors change no numbers).

The grid and the recorder are ``benchmarks/golden_outputs.py``; the digests in
``tests/data/golden_cpu.json`` were written at the commit before the refactor. A change that
means to move numbers re-records them (``python benchmarks/golden_outputs.py --write
tests/data/golden_cpu.json``) and says why in its commit.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.interpreter

_HERE = os.path.dirname(__file__)
_SCRIPT = os.path.join(_HERE, "..", "benchmarks", "golden_outputs.py")
_GOLDEN = os.path.join(_HERE, "data", "golden_cpu.json")


def _module():
    spec = importlib.util.spec_from_file_location("golden_outputs", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="the golden digests are CPU-interpreter numbers")
def test_outputs_bit_identical_to_golden():
    mod = _module()
    with open(_GOLDEN) as f:
        golden = json.load(f)
    now = mod.compute()
    bad = mod.compare_digests(golden, now)
    assert not bad, f"{len(bad)} of {len(golden)} tensors differ from the golden ones:\n" + "\n".join(bad[:40])
