"""The benchmark plot: median time (log scale) and speed-up vs SDPA, per shape and implementation.

With matplotlib: a labelled two-panel figure. Without it: the same bars drawn by a tiny built-in
PNG writer (no text; the colours follow the implementation order of the Markdown table), so
every run still produces a valid image, and ``qflash bench`` says so (``FALLBACK_NOTE``).
matplotlib is the ``plot`` extra (``pip install -e ".[plot]"`` or ``pip install matplotlib``).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path


def _series(doc: dict):
    shapes = [s["name"] for s in doc["shapes"]]
    impls = []
    for r in doc["rows"]:
        if r["status"] == "ok" and r["impl"] not in impls:
            impls.append(r["impl"])
    cell = {(r["shape"], r["impl"]): r for r in doc["rows"] if r["status"] == "ok"}
    get = lambda key: [[(cell.get((s, i)) or {}).get(key) for s in shapes] for i in impls]
    return shapes, impls, get("median_ms"), get("speedup_vs_sdpa")


FALLBACK_NOTE = ("{path} has bars only (no axes, labels or legend): matplotlib is not installed. "
                 "`pip install matplotlib` (the `plot` extra) draws the labelled figure; the numbers are in bench.md.")


def have_matplotlib() -> bool:
    """Whether plot_bench will draw the labelled figure (matplotlib importable)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_bench(doc: dict, path: Path) -> Path:
    """Write the PNG; matplotlib if importable, else the built-in fallback."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _fallback_png(doc, path)
    shapes, impls, times, speed = _series(doc)
    n = max(len(impls), 1)
    width = 0.8 / n
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(shapes) + 4), 8), constrained_layout=True)
    for ax, data, title, log in ((axes[0], times, "median time (ms, log scale)", True),
                                 (axes[1], speed, "speed-up vs SDPA default (same run)", False)):
        for j, (impl, vals) in enumerate(zip(impls, data)):
            xs = [i + (j - (n - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=impl)
        ax.set_xticks(range(len(shapes)), [s.replace(" (", "\n(") for s in shapes], fontsize=8)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="black", lw=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(n, 5), fontsize=8)
    dev = doc["env"].get("gpu_name") or "CPU reference run (not kernel timings)"
    fig.suptitle(f"qflash bench — {dev}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _fallback_png(doc: dict, path: Path, w: int = 800, h: int = 500) -> Path:
    shapes, impls, times, speed = _series(doc)
    img = [[[255, 255, 255] for _ in range(w)] for _ in range(h)]

    def bar(x0, x1, y0, y1, c):
        for y in range(max(0, min(y0, y1)), min(h, max(y0, y1))):
            for x in range(max(0, x0), min(w, x1)):
                img[y][x] = list(c)

    n, m = max(len(impls), 1), max(len(shapes), 1)
    gw = (w - 40) // m
    bw = max(1, (gw - 10) // n)
    half = h // 2
    logs = [math.log10(v) for vals in times for v in vals if v]
    lo, hi = (min(logs) - 0.5, max(logs) + 0.1) if logs else (0.0, 1.0)
    smax = max([v for vals in speed for v in vals if v] + [1.0]) * 1.1
    for j, (tv, sv) in enumerate(zip(times, speed)):
        c = _PALETTE[j % len(_PALETTE)]
        for i in range(len(shapes)):
            x0 = 20 + i * gw + 5 + j * bw
            if tv[i]:
                bar(x0, x0 + bw - 1, half - 10, half - 10 - int((math.log10(tv[i]) - lo) / (hi - lo) * (half - 30)), c)
            if sv[i]:
                bar(x0, x0 + bw - 1, h - 10, h - 10 - int(sv[i] / smax * (half - 30)), c)
    y1 = h - 10 - int(1.0 / smax * (half - 30))
    bar(10, w - 10, y1, y1 + 1, (0, 0, 0))
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in img)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path.write_bytes(png)
    return path
