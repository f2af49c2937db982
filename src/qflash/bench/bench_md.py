"""Markdown for a ``qflash bench`` document: a summary pivot plus one detail table per shape."""

from __future__ import annotations

from .writers import env_line, fmt, md_table


def summary_table(doc: dict, metric: str = "median_ms", kind: str = "ms") -> str:
    """Rows: shapes; columns: implementations that ran on at least one shape."""
    impls = []
    for r in doc["rows"]:
        if r["status"] == "ok" and r["impl"] not in impls:
            impls.append(r["impl"])
    cells = {(r["shape"], r["impl"]): r for r in doc["rows"]}
    rows = []
    for s in doc["shapes"]:
        rows.append([s["name"]] + [fmt(cells.get((s["name"], i), {}).get(metric), kind) for i in impls])
    return md_table(["shape"] + impls, rows)


def common_skips(doc: dict) -> dict[str, str]:
    """Implementations skipped on every shape with one and the same reason: {impl: reason}
    (on a CPU, the CUDA-only SDPA backends). The Markdown lists them once, not once per shape."""
    seen: dict[str, set] = {}
    for r in doc["rows"]:
        seen.setdefault(r["impl"], set()).add((r["status"], r["note"]) if r["status"] == "skipped" else None)
    return {impl: next(iter(v))[1] for impl, v in seen.items() if len(v) == 1 and None not in v}


def shape_table(doc: dict, shape: dict, skip: frozenset | set = frozenset()) -> str:
    """One shape's table; rows of ``skip`` (implementations listed once elsewhere) are left out."""
    rows, notes = [], []
    for r in doc["rows"]:
        if r["shape"] != shape["name"] or r["impl"] in skip:
            continue
        if r["status"] != "ok":
            notes.append(f"- {r['impl']}: {r['status']} — {r['note']}")
            if r["status"] == "skipped":
                continue
        rows.append([r["impl"], r["backend"], fmt(r["median_ms"], "ms"), fmt(r["mean_ms"], "ms"),
                     fmt(r["tops"], "tops"), fmt(r["speedup_vs_sdpa"], "x"), fmt(r["peak_mem_mib"], "mib"),
                     fmt(r["rel_l2"], "pct"), fmt(r["cosine"], "cos")])
    ref = shape["reference"]
    halved = ", halved: causal" if shape["causal"] else ""
    head = (f"### {shape['name']}\n\n{shape['ops']:.3g} ops (4·B·H·Sq·Sk·D{halved}); "
            f"errors vs the exact reference ({ref['method']}, {ref['heads']} of {shape['heads']} heads).\n")
    table = md_table(["implementation", "runs on", "median ms", "mean ms", "TOPS", "vs SDPA", "peak MiB",
                      "rel L2", "cosine"], rows)
    return head + "\n" + table + ("\n\n" + "\n".join(notes) if notes else "")


def bench_markdown(doc: dict, notice: str | None = None) -> str:
    s = doc["settings"]
    parts = ["# qflash bench", ""]
    if notice:
        parts += [f"**{notice}**", ""]
    parts += [f"Command: `{doc['command']}`  ", f"Environment: {env_line(doc['env'])}  ",
              f"Inputs: N(0,1) {s['dtype']} on {s['device']}, seed {s['seed']}; timer: {s['timer']}.", "",
              "## Median time (ms)", "", summary_table(doc), "",
              "## Speed-up vs SDPA default (same run)", "", summary_table(doc, "speedup_vs_sdpa", "x"), "",
              "## Per shape", ""]
    common = common_skips(doc)
    if common and len(doc["shapes"]) > 1:
        by_reason: dict[str, list[str]] = {}
        for impl, note in common.items():
            by_reason.setdefault(note, []).append(impl)
        parts += ["Skipped on every shape:", ""]
        parts += [f"- {', '.join(impls)} — {note}" for note, impls in by_reason.items()] + [""]
    else:
        common = {}
    for shape in doc["shapes"]:
        parts += [shape_table(doc, shape, set(common)), ""]
    return "\n".join(parts)
