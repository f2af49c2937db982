"""``qflash bench``: time every implementation on every shape and measure its error.

For each shape: fresh N(0,1) inputs (seeded per shape), the exact reference (see
``metrics.exact_reference``), then for each implementation one call for correctness, one for
peak memory (CUDA), then timing. Quantisation is inside the timed call (``qflash.attention``
quantises its inputs). The result is a dict following ``schema.BENCH_KEYS``.
"""

from __future__ import annotations

import sys

import torch

from . import schema
from .impls import Impl, build_impls
from .metrics import compare, exact_reference
from .progress import Progress
from .shapes import Shape
from .timing import describe_timer, time_fn
from .timing import sync as _sync

CPU_NOTICE = "no CUDA GPU — CPU reference run at small shapes; timings are not kernel timings"
CPU_ASKED = "--device cpu — CPU reference run; timings are not kernel timings"


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int):
    """q (B, H, Sq, D) and k, v (B, H, Sk, D) ~ N(0, 1), generated in fp32 from ``seed`` and cast
    to ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = [(shape.batch, shape.heads, s, shape.head_dim) for s in (shape.seq, shape.keys, shape.keys)]
    return tuple(torch.randn(size, generator=g, device=device, dtype=torch.float32).to(dtype) for size in sizes)


def _peak_mib(fn, device: torch.device) -> float | None:
    """Peak CUDA allocation of one call above what was allocated before it, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:200]


def run_row(impl: Impl, shape: Shape, q, k, v, ref, heads: int, device, warmup_ms, rep_ms) -> dict:
    """Measure one implementation on one shape; never raises (failures become status/note)."""
    row = {key: None for key in schema.BENCH_ROW_KEYS}
    row.update(shape=shape.name, impl=impl.name, kind=impl.kind, preset=impl.preset, backend=impl.backend,
               status="ok", note="")
    try:
        if impl.backend_for is not None:
            row["backend"] = impl.backend_for(q, k, v)
        with impl.context():
            fn = impl.build(q, k, v, shape.causal)
            out = fn()
            _sync(device)
            m = compare(out[:, :heads], ref)
            row.update(rel_l2=m["rel_l2"], cosine=m["cosine"], max_abs=m["max_abs"])
            if m["nonfinite"]:
                row["note"] = f"{m['nonfinite']} NaN/Inf output values"
            del out
            row["peak_mem_mib"] = _peak_mib(fn, device)
            med, mean, _ = time_fn(fn, device, warmup_ms, rep_ms)
    except Exception as exc:  # a baseline without a kernel here is skipped; a qflash failure is an error
        row.update(status="error" if impl.kind == "qflash" else "skipped", note=_short(exc))
        for key in ("rel_l2", "cosine", "max_abs", "peak_mem_mib"):
            row[key] = None
        return row
    row.update(median_ms=med, mean_ms=mean, tops=shape.ops / (med * 1e-3) / 1e12 if med > 0 else None)
    return row


def run_bench(shapes: list[Shape], presets: list[str], device: torch.device, *, dtype=torch.bfloat16,
              quick=False, warmup_ms=25.0, rep_ms=100.0, seed=0, ref_heads=0, progress=True,
              command="") -> dict:
    """Run the benchmark; returns the results document (``schema.BENCH_KEYS``)."""
    from .env import collect_env

    impls = build_impls(presets, device)
    doc = {
        "schema_version": schema.SCHEMA_VERSION, "kind": "bench", "command": command, "env": collect_env(device),
        "settings": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "quick": quick,
                     "warmup_ms": warmup_ms, "rep_ms": rep_ms, "seed": seed,
                     "timer": describe_timer(device, warmup_ms, rep_ms),
                     "cpu_reference_run": device.type != "cuda", "presets": list(presets)},
        "shapes": [], "rows": [],
    }
    with Progress(len(shapes) * len(impls), "qflash bench", enabled=progress) as bar:
        for i, shape in enumerate(shapes):
            q, k, v = make_inputs(shape, device, dtype, seed + i)
            bar.set(f"{shape.spec}: exact reference")
            ref, info = exact_reference(q, k, v, causal=shape.causal, heads=ref_heads)
            doc["shapes"].append({**shape.as_dict(), "reference": info})
            rows = []
            for impl in impls:
                bar.set(f"{shape.spec}: {impl.name}")
                rows.append(run_row(impl, shape, q, k, v, ref, info["heads"], device, warmup_ms, rep_ms))
                bar.step()
            base = next((r["median_ms"] for r in rows if r["impl"] == "sdpa" and r["status"] == "ok"), None)
            for r in rows:
                r["speedup_vs_sdpa"] = base / r["median_ms"] if base and r["median_ms"] else None
            doc["rows"].extend(rows)
            del q, k, v, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return doc



def cmd_bench(args) -> int:
    """``qflash bench``: run, print the Markdown table, write bench.{json,csv,md,png} under --out."""
    from ..config import PRESETS
    from .bench_md import bench_markdown
    from .command import DTYPES, apply_threads, out_dir, resolve_device
    from .plot import FALLBACK_NOTE, have_matplotlib, plot_bench
    from .shapes import default_shapes
    from .writers import write_csv, write_json

    device = resolve_device(args)
    out = out_dir(args)
    apply_threads(args)
    cpu = device.type != "cuda"
    notice = None
    if cpu:
        notice = CPU_NOTICE if not torch.cuda.is_available() else CPU_ASKED
    shapes = args.shapes or default_shapes(device.type, args.quick)
    presets = args.presets or list(PRESETS)
    first = notice or f"{torch.cuda.get_device_name(device)}, {len(shapes)} shape(s), presets {', '.join(presets)}"
    print(f"qflash bench: {first}", flush=True)
    if cpu:
        warmup, rep = (1.0, 20.0) if args.quick else (20.0, 200.0)
    else:
        warmup, rep = (10.0, 40.0) if args.quick else (25.0, 100.0)
    doc = run_bench(shapes, presets, device, dtype=DTYPES[args.dtype], quick=args.quick,
                    warmup_ms=args.warmup or warmup, rep_ms=args.rep or rep, seed=args.seed,
                    ref_heads=args.ref_heads, progress=not args.no_progress, command=args.command_line)
    md = bench_markdown(doc, notice=notice)
    paths = [write_json(doc, out / "bench.json"), write_csv(_flat_rows(doc), _CSV_KEYS, out / "bench.csv")]
    (out / "bench.md").write_text(md + "\n")
    paths += [out / "bench.md", plot_bench(doc, out / "bench.png")]
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths))
    if not have_matplotlib():
        print("note: " + FALLBACK_NOTE.format(path=out / "bench.png"))
    failed = [r["impl"] + " @ " + r["shape"] for r in doc["rows"] if r["status"] == "error"]
    if failed:
        print("errors: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


_CSV_KEYS = ("shape_spec", "batch", "heads", "seq_q", "seq_k", "head_dim", "causal", "reference",
             *schema.BENCH_ROW_KEYS)


def _flat_rows(doc: dict) -> list[dict]:
    """Bench rows with their shape's fields inlined (for CSV)."""
    shapes = {s["name"]: s for s in doc["shapes"]}
    flat = []
    for r in doc["rows"]:
        s = shapes[r["shape"]]
        flat.append({**{k: s[k] for k in ("batch", "heads", "seq_q", "seq_k", "head_dim", "causal")},
                     "shape_spec": Shape(s["batch"], s["heads"], s["seq_q"], s["head_dim"], s["causal"],
                                           seq_k=None if s["seq_k"] == s["seq_q"] else s["seq_k"]).spec,
                     "reference": s["reference"]["method"], **r})
    return flat
