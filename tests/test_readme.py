"""The README's facts, checked against the code and the JSON they cite (CPU, fast; issue 14)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from helpers import rel_l2

import qflash

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_three_ways_in_runs_here():
    """Parts 1 and 2 of the "Three ways in" snippet run as written, on a CPU too (part 3 needs a pipeline)."""
    code = section("Three ways in").split("```python\n", 1)[1].split("```", 1)[0]
    code = code.split("\n# 3.", 1)[0]
    env: dict = {}
    exec(compile(code, "README.md (Three ways in)", "exec"), env)
    assert env["out"].shape == env["q"].shape and torch.isfinite(env["out"].float()).all()


def test_causal_alignment_as_stated():
    """qflash.attention(causal=True) and qflash.sageattn align bottom-right, qflash.sdpa top-left, and with
    Sq != Sk they differ by about what the README says."""
    text = " ".join(section("Three ways in").split())
    assert "`qflash.attention(causal=True)` (and `qflash.sageattn(is_causal=True)`) align the causal diagonal " \
           "bottom-right" in text
    assert "`qflash.sdpa(is_causal=True)` and the patched `F.scaled_dot_product_attention` align it top-left" in text
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 128, 32, generator=g)
    k, v = (torch.randn(1, 2, 512, 32, generator=g) for _ in range(2))
    br = qflash.attention(q, k, v, quant="none", causal=True)
    tl = qflash.sdpa(q, k, v, is_causal=True, quant="none")
    assert rel_l2(tl, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-5
    assert rel_l2(qflash.sageattn(q, k, v, is_causal=True, quant="none"), br) < 1e-6
    keep = torch.arange(512)[None, :] <= torch.arange(128)[:, None] + 512 - 128
    assert rel_l2(br, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)) < 1e-5
    assert 0.91 <= rel_l2(br, tl) <= 1.0  # "91–100 % relative L2 apart"


def _num(cell: str) -> tuple[float, float]:
    """(value, half a unit of its last printed digit) of a table cell like '0.430' or '0.92×'."""
    s = cell.strip().rstrip("×")
    decimals = len(s.split(".")[1]) if "." in s else 0
    return float(s), 0.5 * 10 ** -decimals + 1e-12


def test_performance_table_matches_the_json_it_cites():
    sec = section("Performance (H200, measured)")
    cited = re.search(r"`(docs/perf/runs/[^`]+\.json)`", sec).group(1)
    doc = json.loads((ROOT / cited).read_text())
    rows = {}
    for r in doc["rows"]:
        # "label (1x24x4608x128)" from the default shapes, bare "1x24x4608x128" from --shapes
        m = re.search(r"(?:^|\()(\d+x\d+x\d+x\d+c?)\)?$", r["shape"])
        if r["status"] == "ok" and m:
            rows[(m.group(1), r["impl"])] = r
    lines = [ln for ln in sec.splitlines() if ln.startswith("| ") and re.search(r"\d+,\d+,\d+,\d+", ln)]
    header = [c.strip() for c in next(ln for ln in sec.splitlines() if ln.startswith("| shape")).strip("|").split("|")]
    assert len(lines) == 4
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        dims = re.search(r"(\d+),(\d+),(\d+),(\d+)", cells[0]).groups()
        shape = "x".join(dims) + ("c" if "causal" in cells[0] else "")
        value, tol = _num(cells[1])
        assert abs(rows[(shape, "sdpa")]["median_ms"] - value) <= tol, (shape, "SDPA ms", cells[1])
        for preset, cell in zip(header[2:], cells[2:]):
            value, tol = _num(cell)
            got = rows[(shape, f"qflash {preset}")]["speedup_vs_sdpa"]
            assert abs(got - value) <= tol, (shape, preset, cell, got)


def test_train_tiny_says_how_long_on_a_cpu():
    text = " ".join(section("Training").split())
    assert re.search(r"`examples/train_tiny.py` .{0,120}\(on a CPU [^)]*\d+ minutes", text)
