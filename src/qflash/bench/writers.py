"""Write harness documents as JSON, CSV and Markdown.

JSON has no NaN/Inf: non-finite floats are written as ``null``. CSV files hold one record per
line with the documented keys as columns (nested shape fields flattened for bench rows).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def clean(obj):
    """A JSON-safe copy: non-finite floats become None, tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def write_json(doc: dict, path: Path) -> Path:
    path.write_text(json.dumps(clean(doc), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(rows: list[dict], keys: tuple[str, ...], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in clean(r).items()})
    return path


# ---- number formatting for tables ------------------------------------------------------------

def fmt(x, kind: str) -> str:
    """Format a value for a Markdown cell; None/NaN show as an en dash."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if kind == "ms":
        return f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 100 else f"{x:.1f}"
    if kind == "tops":
        return f"{x:.3g}"
    if kind == "x":
        return f"{x:.2f}×"
    if kind == "pct":
        return f"{100 * x:.3f} %"
    if kind == "cos":
        return f"{x:.6f}"
    if kind == "mib":
        return f"{x:.1f}" if x >= 10 else f"{x:.3g}"
    if kind == "sci":
        return f"{x:.3g}"
    return str(x)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def env_line(env: dict) -> str:
    dev = env.get("gpu_name") or "CPU"
    rev = (env.get("git_revision") or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    return (f"{dev} · torch {env.get('torch')} · triton {env.get('triton')} · CUDA {env.get('cuda')} · "
            f"qflash {env.get('qflash')} @ {rev} · {env.get('date')}")
