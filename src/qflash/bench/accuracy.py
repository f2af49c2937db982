"""``qflash accuracy``: each preset's error vs exact attention, on named workloads.

Workloads (inputs bf16 unless ``--dtype``; errors vs ``metrics.exact_reference``):

- ``normal``: q, k, v ~ N(0, 1).
- ``normal-causal``: the same, causal.
- ``outlier-k``: K + 5·N(0,1) per channel — every token of a (batch, head) gets the same large
  offset in each channel, the pattern K smoothing removes.
- ``long``: N(0, 1) at a long sequence.
- ``minilm``: the q, k, v (and key-padding mask) MiniLM's 6 layers feed to SDPA for a few
  sentences (``minilm.capture_qkv``); errors over all layers together, vs fp64 exact attention.

Per row: relL2, relL1, cosine, max abs error, NaN/Inf count, and the attention-weight check of
``weights.check_weights``. Then the model end to end: sentence embeddings with every SDPA call
routed to ``qflash.sdpa`` (``qflash.patch_sdpa`` via ``patch.sdpa_to_qflash``), cosine vs the unquantised model.
Then the quantiser round-trip table: RMSE of dequantize(quantize(x)) per precision x granularity
x strategy on N(0,1) and outlier-K tensors.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from .. import attention
from ..config import PRESETS, Granularity, OperandQuant, Precision, Strategy
from ..quant import dequantize, quantize
from ..reference import exact_attention
from . import schema
from .bench import _short, make_inputs
from .metrics import compare, exact_reference
from .progress import Progress
from .shapes import Shape
from .weights import TOLERANCE, check_weights


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shape: Shape
    outlier_k: bool = False

    def as_dict(self) -> dict:
        s = self.shape
        return {"name": self.name, "description": self.description, "batch": s.batch, "heads": s.heads,
                "seq_q": s.seq, "seq_k": s.keys, "head_dim": s.head_dim, "causal": s.causal}

    def inputs(self, device, dtype, seed):
        q, k, v = make_inputs(self.shape, device, dtype, seed)
        if self.outlier_k:
            g = torch.Generator(device=device).manual_seed(seed + 1000)
            s = self.shape
            off = 5 * torch.randn((s.batch, s.heads, 1, s.head_dim), generator=g, device=device)
            k = (k.float() + off).to(dtype)
        return q, k, v


def workloads(device_type: str, quick: bool) -> list[Workload]:
    """The synthetic workloads; sizes depend on device and --quick."""
    if quick:
        n, long = (1, 2, 256, 64), (1, 1, 2048, 64)
    elif device_type == "cuda":
        n, long = (1, 8, 4096, 128), (1, 8, 16384, 128)
    else:
        n, long = (1, 4, 1024, 64), (1, 1, 8192, 64)
    return [
        Workload("normal", "q, k, v ~ N(0,1)", Shape(*n)),
        Workload("normal-causal", "q, k, v ~ N(0,1), causal", Shape(*n, causal=True)),
        Workload("outlier-k", "N(0,1) with K + 5·N(0,1) per-channel offset (same for every token)", Shape(*n),
                 outlier_k=True),
        Workload("long", "q, k, v ~ N(0,1), long sequence", Shape(*long)),
    ]


def _row(workload: str, preset: str) -> dict:
    row = {key: None for key in schema.ACC_ROW_KEYS}
    row.update(workload=workload, preset=preset, status="ok", note="")
    return row


def measure(preset, q, k, v, ref, *, causal=False, attn_mask=None, scale=None) -> dict:
    """Metrics of one preset on one input set (ref: exact output of the same shape)."""
    out, lse = attention(q, k, v, quant=preset, causal=causal, attn_mask=attn_mask, scale=scale, return_lse=True)
    res = compare(out, ref)
    res.update(check_weights(q, k, lse, PRESETS[preset], causal=causal, attn_mask=attn_mask, scale=scale))
    return res


def run_synthetic(wl: Workload, presets, device, dtype, seed, bar) -> list[dict]:
    q, k, v = wl.inputs(device, dtype, seed)
    bar.set(f"{wl.name}: exact reference")
    ref, _ = exact_reference(q, k, v, causal=wl.shape.causal)
    rows = []
    for p in presets:
        bar.set(f"{wl.name}: {p}")
        row = _row(wl.name, p)
        try:
            row.update(measure(p, q, k, v, ref, causal=wl.shape.causal))
        except Exception as exc:
            row.update(status="error", note=_short(exc))
        rows.append(row)
        bar.step()
    return rows


def run_minilm(presets, device, bar) -> tuple[dict | None, list[dict], dict]:
    """(workload dict, attention rows, model section); rows are empty when the model is absent."""
    from . import minilm
    from .patch import sdpa_to_qflash

    model_doc = {"name": minilm.NAME, "status": "ok", "note": "", "sentences": len(minilm.SENTENCES), "rows": []}
    ok, why = minilm.available()
    if not ok:
        model_doc.update(status="skipped", note=why)
        for _ in range(2 * len(presets)):
            bar.step()
        return None, [], model_doc
    bar.set("minilm: load")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tok, model = minilm.load(device, dtype)
    calls = minilm.capture_qkv(tok, model)
    q0 = calls[0][0]
    wl = {"name": "minilm", "description": f"q/k/v captured from {len(calls)} MiniLM layers, {len(minilm.SENTENCES)} "
          f"sentences, key-padding mask, {str(dtype).removeprefix('torch.')}", "batch": q0.shape[0],
          "heads": q0.shape[1], "seq_q": q0.shape[2], "seq_k": calls[0][1].shape[2], "head_dim": q0.shape[3],
          "causal": False}
    refs = [_exact64(q, k, v, m, s) for q, k, v, m, s in calls]
    rows = []
    for p in presets:
        bar.set(f"minilm: {p}")
        row = _row("minilm", p)
        try:
            per = []
            for (q, k, v, m, s), ref in zip(calls, refs):
                out, lse = attention(q, k, v, quant=p, attn_mask=m, scale=s, return_lse=True)
                per.append((out, check_weights(q, k, lse, PRESETS[p], attn_mask=m, scale=s)))
            row.update(compare(torch.cat([o.flatten() for o, _ in per]), torch.cat([r.flatten() for r in refs])))
            w = [c for _, c in per]
            row.update(p_min=min(c["p_min"] for c in w), p_max=max(c["p_max"] for c in w),
                       row_sum_max_err=max(c["row_sum_max_err"] for c in w),
                       weights_in_unit_interval=all(c["weights_in_unit_interval"] for c in w))
        except Exception as exc:
            row.update(status="error", note=_short(exc))
        rows.append(row)
        bar.step()
    base = minilm.embeddings(tok, model)
    for p in presets:
        bar.set(f"minilm embeddings: {p}")
        mrow = {key: None for key in schema.ACC_MODEL_ROW_KEYS}
        mrow.update(preset=p, status="ok", note="")
        try:
            with sdpa_to_qflash(p) as stats:
                emb = minilm.embeddings(tok, model)
            cos = (emb * base).sum(-1)
            mrow.update(attention_calls=stats.replaced, embedding_cosine_mean=cos.mean().item(),
                        embedding_cosine_min=cos.min().item())
            if stats.passed or not stats.replaced:
                mrow["note"] = f"{stats.passed} SDPA call(s) not routed to qflash"
        except Exception as exc:
            mrow.update(status="error", note=_short(exc))
        model_doc["rows"].append(mrow)
        bar.step()
    return wl, rows, model_doc


def _exact64(q, k, v, mask, scale):
    return exact_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                           attn_mask=None if mask is None else mask.cpu(), scale=scale)


GRANULARITIES = [Granularity.tensor(), Granularity.token(), Granularity.block(64), Granularity.group(32),
                 Granularity.channel(0)]


def quantizer_table(device, dtype, seed, shape: Shape) -> list[dict]:
    """RMSE of dequantize(quantize(x)) per input x precision x granularity x strategy."""
    rows = []
    inputs = {"N(0,1)": Workload("n", "", shape).inputs(device, dtype, seed)[1],
              "outlier K": Workload("o", "", shape, outlier_k=True).inputs(device, dtype, seed)[1]}
    for name, x in inputs.items():
        xf = x.float()
        rms = xf.pow(2).mean().sqrt().item()
        for prec in (Precision.INT8, Precision.INT4, Precision.FP8_E4M3):
            for g in GRANULARITIES:
                for strat in (Strategy.SYMMETRIC, Strategy.ASYMMETRIC):
                    try:
                        spec = OperandQuant(prec, g, strat)
                    except ValueError:
                        continue  # combination not defined (int4 per channel, asymmetric fp8)
                    err = (dequantize(quantize(x, spec), torch.float32) - xf).pow(2).mean().sqrt().item()
                    rows.append({"input": name, "precision": prec.value, "granularity": str(g),
                                 "strategy": strat.value, "rmse": err, "rel_rmse": err / rms if rms else math.nan})
    return rows


def run_accuracy(presets, device, *, dtype=torch.bfloat16, quick=False, seed=0, progress=True, command="") -> dict:
    """Run every workload, the model and the quantiser table; returns ``schema.ACC_KEYS``."""
    from .env import collect_env

    wls = workloads(device.type, quick)
    doc = {
        "schema_version": schema.SCHEMA_VERSION, "kind": "accuracy", "command": command, "env": collect_env(device),
        "settings": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "quick": quick, "seed": seed,
                     "presets": list(presets),
                     "reference": "fp64 exact attention on the CPU per head for S <= 4096, else fp32 per head in "
                                  "query chunks with TF32 off (qflash.bench.metrics); MiniLM: fp64 exact",
                     "weights_check": "P = exp(S_hat - lse) with S_hat the quantised scores rebuilt by qflash.quant "
                                      "and lse from qflash.attention(return_lse=True); in [0,1] means min P >= 0, "
                                      "max P <= 1 + tol, |row sum - 1| <= tol, no NaN; tol by Q/K precision "
                                      + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items())
                                      + " (allows ulp-level quantiser differences; qflash.bench.weights)"},
        "workloads": [w.as_dict() for w in wls], "rows": [], "model": None, "quantizer": [],
    }
    total = (len(wls) + 2) * len(presets) + 1
    with Progress(total, "qflash accuracy", enabled=progress) as bar:
        for i, wl in enumerate(wls):
            doc["rows"] += run_synthetic(wl, presets, device, dtype, seed + i, bar)
        wl, rows, model = run_minilm(presets, device, bar)
        if wl is not None:
            doc["workloads"].append(wl)
        doc["rows"] += rows
        doc["model"] = model
        bar.set("quantiser round trip")
        doc["quantizer"] = quantizer_table(device, dtype, seed, wls[0].shape)
        bar.step()
    return doc


def cmd_accuracy(args) -> int:
    """``qflash accuracy``: print the tables, write accuracy.{json,csv,md} (+ model/quantizer CSV)."""
    from .acc_md import accuracy_markdown
    from .command import DTYPES, apply_threads, out_dir, resolve_device
    from .writers import write_csv, write_json

    device = resolve_device(args)
    out = out_dir(args)
    apply_threads(args)
    presets = args.presets or list(PRESETS)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (reference path)"
    print(f"qflash accuracy: {where}, presets {', '.join(presets)}{', quick' if args.quick else ''}", flush=True)
    doc = run_accuracy(presets, device, dtype=DTYPES[args.dtype], quick=args.quick, seed=args.seed,
                       progress=not args.no_progress, command=args.command_line)
    md = accuracy_markdown(doc)
    paths = [write_json(doc, out / "accuracy.json"),
             write_csv(doc["rows"], schema.ACC_ROW_KEYS, out / "accuracy.csv"),
             write_csv(doc["model"]["rows"], schema.ACC_MODEL_ROW_KEYS, out / "accuracy-model.csv"),
             write_csv(doc["quantizer"], schema.QUANTIZER_ROW_KEYS, out / "accuracy-quantizer.csv")]
    (out / "accuracy.md").write_text(md + "\n")
    paths.append(out / "accuracy.md")
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths))
    bad = [f"{r['preset']} @ {r['workload']}" for r in doc["rows"] if r["status"] == "error"]
    bad += [f"{r['preset']} @ minilm embeddings" for r in doc["model"]["rows"] if r["status"] == "error"]
    if bad:
        print("errors: " + "; ".join(bad), file=sys.stderr)
    return 1 if bad else 0
