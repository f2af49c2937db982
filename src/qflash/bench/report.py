"""``qflash report``: a performance snapshot (Markdown) from ``qflash bench`` (and ``qflash accuracy``) JSON.

Sections: environment, end-to-end Flux (when given), micro-benchmarks, accuracy and stability,
how to reproduce. Several bench JSONs (``--from`` repeated) give one environment table and one
micro-benchmark table per run. A report states measurements only: every number comes from the
JSON and the commands that made them are quoted; no plans, targets or comparisons with numbers it
did not measure.
Without ``--out`` it writes ``<bench JSON stem>.report.md`` next to the bench JSON (``--out -``: stdout),
never a tracked docs file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import schema
from .writers import fmt, md_table

NOT_KERNEL = ("**CPU reference timings.** These numbers come from a run without a CUDA GPU: every qflash "
              "row is the pure-PyTorch reference path, so the times say nothing about the Triton kernels. "
              "Kernel timings need a CUDA GPU.")


def load(path: str, kind: str) -> dict:
    """Read a harness JSON and check its kind and schema version (ValueError otherwise)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("kind") != kind:
        raise ValueError(f"{path}: expected a `qflash {kind}` JSON (kind={kind!r}), got kind={doc.get('kind')!r}")
    if doc.get("schema_version") != schema.SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {doc.get('schema_version')!r}, "
                         f"this qflash reads {schema.SCHEMA_VERSION}")
    return doc


def environment(bench: dict, acc: dict | None) -> str:
    e, s = bench["env"], bench["settings"]
    rev = (e.get("git_revision") or "unknown")[:12]
    rows = [
        ["Hardware", e.get("gpu_name") or "CPU only (no CUDA GPU): reference path"],
        ["Host", f"{e.get('platform')}, Python {e.get('python')}, {e.get('cpu_threads')} torch CPU threads"],
        ["PyTorch / Triton / CUDA", f"{e.get('torch')} / {e.get('triton')} / {e.get('cuda')}"],
        ["qflash", f"{e.get('qflash')} @ {rev}"],
        ["SageAttention", e.get("sageattention") or "not installed"],
        ["Date (UTC)", e.get("date")],
        ["Timer", s["timer"]],
        ["Inputs", f"N(0,1) {s['dtype']}, fresh per shape (seed {s['seed']}); quantisation inside the timed call"],
        ["Benchmark command", f"`{bench['command']}`"],
    ]
    if acc is not None:
        rows.append(["Accuracy command", f"`{acc['command']}`"])
    return md_table(["Component", "Value"], rows)


def micro(bench: dict) -> str:
    impls = []
    for r in bench["rows"]:
        if r["status"] == "ok" and r["impl"] not in impls:
            impls.append(r["impl"])
    cell = {(r["shape"], r["impl"]): r for r in bench["rows"]}
    metrics = [("median ms", "median_ms", "ms"), ("TOPS", "tops", "tops"), ("vs SDPA", "speedup_vs_sdpa", "x"),
               ("rel L2", "rel_l2", "pct")]
    rows = []
    for sh in bench["shapes"]:
        for label, key, kind in metrics:
            rows.append([sh["name"], label] + [fmt((cell.get((sh["name"], i)) or {}).get(key), kind) for i in impls])
    skipped = sorted({r["impl"] for r in bench["rows"] if r["status"] == "skipped"})
    errors = [f"{r['impl']} @ {r['shape']}: {r['note']}" for r in bench["rows"] if r["status"] == "error"]
    notes = []
    if skipped:
        notes.append(f"Baselines skipped here (no kernel for this device or shape): {', '.join(skipped)}.")
    if errors:
        notes.append("Errors: " + "; ".join(errors) + ".")
    refs = {f"{s['reference']['method']}" for s in bench["shapes"]}
    notes.append(f"TOPS = 4·B·H·Sq·Sk·D / median time (halved for causal). rel L2 vs exact attention "
                 f"({', '.join(sorted(refs))}; see `qflash.bench.metrics`).")
    return md_table(["Shape", "Metric"] + impls, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _by(acc: dict, workload: str, preset: str) -> dict:
    return next((r for r in acc["rows"] if r["workload"] == workload and r["preset"] == preset), {})


def accuracy(acc: dict) -> str:
    presets = acc["settings"]["presets"]
    wls = [w["name"] for w in acc["workloads"]]
    model = {r["preset"]: r for r in (acc["model"] or {}).get("rows", [])}
    rows = []
    for p in presets:
        rs = [_by(acc, w, p) for w in wls]
        ok = [r for r in rs if r.get("status") == "ok"]
        weights = "yes" if ok and len(ok) == len(rs) and all(r["weights_in_unit_interval"] for r in ok) else "**no**"
        rows.append([p] + [fmt(r.get("rel_l2"), "pct") for r in rs]
                    + [fmt(min((r["cosine"] for r in ok if r["cosine"] is not None), default=None), "cos"),
                       fmt(model.get(p, {}).get("embedding_cosine_min"), "cos"),
                       str(sum(r["nonfinite"] or 0 for r in ok)), weights])
    table = md_table(["Preset"] + [f"rel L2 ({w})" for w in wls]
                     + ["worst cosine", "MiniLM embedding cos (min)", "NaN/Inf", "weights in [0,1]"], rows)
    wl = "\n".join(f"- `{w['name']}`: {w['description']} ({w['batch']}x{w['heads']}x{w['seq_q']}x{w['head_dim']}"
                   f"{', causal' if w['causal'] else ''})" for w in acc["workloads"])
    m = acc["model"] or {}
    model_note = (f"- MiniLM end to end: every attention call of {m.get('name')} routed to `qflash.attention`; "
                  f"cosine of the sentence embeddings vs the unquantised model ({m.get('sentences')} sentences)."
                  if m.get("status") == "ok" else f"- MiniLM end to end: {m.get('status')} — {m.get('note')}")
    return "\n\n".join([table, "Workloads:\n\n" + wl, "Additional checks:\n\n"
                        + f"- Attention weights: {acc['settings']['weights_check']}.\n" + model_note,
                        "Quantiser round trip (RMSE / RMS of dequantize(quantize(x)), N(0,1) input):\n\n"
                        + quantizer_pivot(acc)])


def quantizer_pivot(acc: dict, source: str = "N(0,1)") -> str:
    rows = [r for r in acc["quantizer"] if r["input"] == source]
    grans = list(dict.fromkeys(r["granularity"] for r in rows))
    combos = list(dict.fromkeys((r["precision"], r["strategy"]) for r in rows))
    cell = {(r["precision"], r["strategy"], r["granularity"]): r["rel_rmse"] for r in rows}
    return md_table(["precision", "strategy"] + grans,
                    [[p, s] + [fmt(cell.get((p, s, g)), "pct") for g in grans] for p, s in combos])


def flux_section(flux: dict | None) -> str:
    """The end-to-end table from ``examples/flux/run.py``'s JSON (one row per resolution and mode)."""
    if flux is None:
        return "Not measured in this snapshot (pass `--flux` with `examples/flux/run.py`'s JSON)."
    head = (f"`{flux.get('command', '')}` — FLUX.1 {flux.get('config_name', '')} transformer, {flux.get('dtype', '')}, "
            f"{flux.get('timer', '')}, median of {flux.get('timed_forwards', '?')} forwards after "
            f"{flux.get('warmup', '?')} warm-up; {flux.get('env', {}).get('gpu_name', '')}.")
    if flux.get("banner"):
        head += f" **{flux['banner']}.**"
    rows = []
    for res in flux.get("resolutions", []):
        for r in res.get("rows", []):
            ok = r.get("status") == "ok"
            rows.append([f"{res['resolution']}px", r.get("mode", ""),
                         fmt(r.get("median_ms"), "ms") if ok else r.get("status", ""),
                         f"{r['speedup']:.3f}×" if ok and r.get("speedup") else "–",
                         f"{r['peak_gib']:.2f}" if ok and r.get("peak_gib") is not None else "–",
                         f"{r['out_cosine']:.6f}" if ok and r.get("out_cosine") is not None else "–",
                         f"{r['attn_cos_min']:.6f}" if ok and r.get("attn_cos_min") is not None else "–"])
    table = md_table(["resolution", "mode", "ms / forward", "speed-up vs SDPA", "peak GiB", "output cos",
                      "worst attention-block cos"], rows)
    notes = ("`no-attn` replaces attention by zeros: the ceiling of any attention speed-up. `+fused` runs "
             "the fused RMSNorm+RoPE prologue (`qflash.fused.rmsnorm_rope`) instead of diffusers' eager ops.")
    extra = flux.get("table", "")
    prologue = [ln.strip() for ln in extra.splitlines() if ln.startswith("pre-attention")]
    return "\n\n".join([head, table, notes] + (["Pre-attention fusion:\n\n" + "\n".join(f"- {p}" for p in prologue)]
                                               if prologue else []))


def _runs(benches: list[dict], body) -> str:
    """``body(bench)`` for one run; for several, one titled subsection per run (each table holds
    one run's numbers: speed-ups divide by the SDPA of the same run)."""
    if len(benches) == 1:
        return body(benches[0])
    return "\n\n".join(f"### Run {i}: {b['env'].get('gpu_name') or 'CPU'}, {b['env'].get('date')}\n\n"
                        f"`{b['command']}`\n\n{body(b)}" for i, b in enumerate(benches, 1))


def render(bench: dict | list[dict], acc: dict | None, report_command: str, flux: dict | None = None,
           appendix: str | None = None) -> str:
    """The snapshot's Markdown. ``bench``: one ``qflash bench`` JSON, or several runs (say, the
    large shapes and the small ones run apart): then the environment and the micro-benchmarks
    come once per run."""
    benches = bench if isinstance(bench, list) else [bench]
    cpu = any(b["settings"]["cpu_reference_run"] for b in benches)
    parts = [
        "# qflash – Performance Snapshot", "",
        f"Generated by `{report_command}` from harness JSON; do not edit by hand — rerun the commands below.", "",
    ]
    if cpu:
        parts += ["> " + NOT_KERNEL, ""]
    parts += ["## Test Environment", "", _runs(benches, lambda b: environment(b, acc)), "",
              "## End-to-End Flux Benchmarks", "", flux_section(flux), "",
              "## Micro-benchmarks (`qflash bench`)", "", _runs(benches, micro), "",
              "## Accuracy & Stability (`qflash accuracy`)", "",
              accuracy(acc) if acc is not None else "Not measured in this snapshot (pass `--accuracy`).", "",
              "## Reproducing", "",
              "```", *(b["command"] for b in benches), *([acc["command"]] if acc is not None else []),
              report_command, "```", "",
              "- Shapes: `--shapes 1x24x4608x128,1x32x8192x128c` (`c` = causal); presets: `--presets int8,fp8`.",
              "- Every run writes JSON (schema in `qflash.bench.schema`), CSV, Markdown and a PNG plot under `--out`.",
              "- Compare timings only within one run: speed-ups divide by SDPA measured in the same run.", ""]
    if appendix:
        parts += [appendix.rstrip(), ""]
    return "\n".join(parts)


def cmd_report(args) -> int:
    paths = args.bench_json if isinstance(args.bench_json, list) else [args.bench_json]
    try:
        bench = [load(p, "bench") for p in paths]
        acc = load(args.accuracy, "accuracy") if args.accuracy else None
        flux = json.loads(Path(args.flux).read_text()) if getattr(args, "flux", None) else None
        appendix = Path(args.append).read_text() if getattr(args, "append", None) else None
    except (OSError, ValueError) as exc:
        args.parser.error(str(exc))
    text = render(bench, acc, args.command_line, flux, appendix)
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out) if args.out else default_out(paths[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"qflash report: wrote {out}")
    return 0


def default_out(bench_json: str) -> Path:
    """Where a report goes without ``--out``: next to its bench JSON (``results/bench.json`` ->
    ``results/bench.report.md``), so a report never overwrites a tracked docs file by default."""
    p = Path(bench_json)
    return p.with_name(p.stem + ".report.md")
