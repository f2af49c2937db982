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


def shape_table(doc: dict, shape: dict) -> str:
    rows, notes = [], []
    for r in doc["rows"]:
        if r["shape"] != shape["name"]:
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
    for shape in doc["shapes"]:
        parts += [shape_table(doc, shape), ""]
    return "\n".join(parts)
