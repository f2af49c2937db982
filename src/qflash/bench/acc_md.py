"""Markdown for a ``qflash accuracy`` document."""

from __future__ import annotations

from .writers import env_line, fmt, md_table


def attention_table(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            rows.append([r["workload"], r["preset"], f"{r['status']}: {r['note']}"] + ["–"] * 6)
            continue
        w = "yes" if r["weights_in_unit_interval"] else "**no**"
        detail = f" (max {r['p_max']:.6f}, Σ−1 ≤ {r['row_sum_max_err']:.1e})" if r["p_max"] is not None else ""
        rows.append([r["workload"], r["preset"], fmt(r["rel_l2"], "pct"), fmt(r["rel_l1"], "pct"),
                     fmt(r["cosine"], "cos"), fmt(r["max_abs"], "sci"), str(r["nonfinite"]), w + detail])
    header = ["workload", "preset", "rel L2", "rel L1", "cosine", "max abs", "NaN/Inf", "weights in [0,1]"]
    return md_table(header, rows)


def model_table(doc: dict) -> str:
    m = doc["model"]
    if m["status"] != "ok":
        return f"{m['name']}: {m['status']} — {m['note']}"
    rows = [[r["preset"], str(r["attention_calls"]), fmt(r["embedding_cosine_mean"], "cos"),
             fmt(r["embedding_cosine_min"], "cos"), r["note"] or ("" if r["status"] == "ok" else r["status"])]
            for r in m["rows"]]
    return (f"{m['name']}, {m['sentences']} sentences: sentence embeddings with every attention call routed to "
            f"qflash.attention, cosine vs the unquantised model.\n\n"
            + md_table(["preset", "attention calls", "cosine (mean)", "cosine (min)", "note"], rows))


def quantizer_table(doc: dict) -> str:
    rows = [[r["input"], r["precision"], r["granularity"], r["strategy"], fmt(r["rmse"], "sci"),
             fmt(r["rel_rmse"], "pct")] for r in doc["quantizer"]]
    return md_table(["input", "precision", "granularity", "strategy", "RMSE", "RMSE / RMS"], rows)


def accuracy_markdown(doc: dict) -> str:
    s = doc["settings"]
    wl = [f"- `{w['name']}`: {w['description']} — {w['batch']}x{w['heads']}x{w['seq_q']}x{w['head_dim']}"
          f"{' causal' if w['causal'] else ''}" for w in doc["workloads"]]
    return "\n".join([
        "# qflash accuracy", "",
        f"Command: `{doc['command']}`  ", f"Environment: {env_line(doc['env'])}  ",
        f"Inputs {s['dtype']} on {s['device']}, seed {s['seed']}. Reference: {s['reference']}.", "",
        "Workloads:", "", *wl, "",
        "## Attention error vs exact", "", f"Weights check: {s['weights_check']}.", "", attention_table(doc), "",
        "## Model end to end", "", model_table(doc), "",
        "## Quantiser round trip", "", quantizer_table(doc), "",
    ])
