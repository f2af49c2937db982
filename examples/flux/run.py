#!/usr/bin/env python
"""Flux end to end with qflash attention: speed, memory and accuracy against diffusers' default SDPA.

Two modes, chosen by ``--weights`` (default ``auto``: real weights when found locally):

random   FluxTransformer2DModel with the real FLUX.1 config (19 double + 38 single blocks, 24 heads of
         128; ``--variant dev`` has guidance embeddings) and deterministic random bf16 weights, fed
         real-shaped inputs (1024px: 4096 image + 512 text tokens; 2048px: 16384 + 512). One
         transformer forward per measurement; per mode: median ms per forward (CUDA events, after
         warm-up), speed-up vs the baseline, peak GPU memory, output cosine / relL2 vs the baseline
         and the cosine of every attention block's output vs the baseline run's.
         Random weights: a timing mode, NOT an image-quality measurement.
         ``--tiny``: 1 double + 1 single block, 2 heads, a few tokens, runs on the CPU in seconds
         (qflash's reference path) — what CI runs.
real     FluxPipeline (FLUX.1-schnell or -dev) from ``--model-path`` or the Hugging Face cache, never
         downloading (HF_HUB_OFFLINE=1, local_files_only): one prompt, seed and sampler per mode;
         wall clock per image and per transformer step, peak memory, PSNR and SSIM against the
         baseline image; the images side by side in one PNG per resolution.

Modes: ``sdpa`` (baseline: diffusers' processors, PyTorch SDPA), qflash presets ``int8``,
``int8-fp8``, ``int4`` (also ``fp8``, ``none``) installed by ``qflash.integrations.diffusers.apply``,
``sage`` (SageAttention, when importable), ``no-attn`` (attention output replaced by zeros: a
ceiling, not a method), and any of these with ``+fused`` (q/k RMSNorm + RoPE + concat in one
Triton launch each: ``qflash.fused.rmsnorm_rope``). Without ``--no-prologue`` the pre-attention work
is also timed on its own, unfused vs fused, per transformer step.

Results: ``<out>/flux_results.json`` (everything), ``<out>/flux_table.md`` (the table), in real mode
``<out>/flux_<res>px_side_by_side.png`` and one PNG per image. ``<out>`` is ``--out``, else $OUT,
else ./results. The table is printed last.

    python examples/flux/run.py                        # random weights on a GPU, 1024 and 2048
    python examples/flux/run.py --tiny                 # CPU, seconds
    python examples/flux/run.py --model-path /models/FLUX.1-schnell --resolution 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers / huggingface_hub are imported: never download

import torch

try:  # qflash from this checkout when it is not installed (e.g. a GPU machine given only the work tree)
    import qflash  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

RANDOM_MODES = ["sdpa", "int8", "int8-fp8", "int4", "sage", "no-attn", "sdpa+fused", "int8-fp8+fused",
                "int8-fp8+fusedq"]
REAL_MODES = ["sdpa", "int8", "int8-fp8", "int4", "sage"]
HF_REPOS = {"schnell": "black-forest-labs/FLUX.1-schnell", "dev": "black-forest-labs/FLUX.1-dev"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_PROMPT = "A photo of a red fox sitting in fresh snow in a pine forest at sunrise, highly detailed"
RANDOM_BANNER = "random weights: not an image-quality measurement (timing mode)"
CPU_CAVEAT = ("CPU run: qflash runs its pure-PyTorch reference path here, not the Triton kernels; "
              "these speed-ups are CPU timings of a small problem and say nothing about a GPU")


def _caveat(result: dict) -> list[str]:
    """The line a table without a GPU carries (issue 14: --tiny printed 1.97x, 6.41x on a CPU, no caveat)."""
    return [] if (result.get("env") or {}).get("gpu_name") else [f"*** {CPU_CAVEAT} ***"]
GiB = 1024 ** 3


def _import_flux_timing():
    try:
        from qflash.bench import flux_timing
    except ImportError as exc:
        sys.exit(f"examples/flux/run.py: cannot import diffusers / qflash ({exc}).\n"
                 "It needs: torch, diffusers (>= 0.35; tested 0.42.1), huggingface_hub, safetensors, numpy, Pillow; "
                 "real-weights mode also needs transformers (and sentencepiece for T5's tokenizer).")
    return flux_timing


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _mode(text: str):
    ft = _import_flux_timing()
    try:
        return ft.parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="examples/flux/run.py",
        description="Flux end to end with qflash attention (random-weights timing, or real weights when local).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--resolution", type=_positive_int, nargs="+", default=[1024, 2048],
                   help="image side(s) in pixels (multiple of 16; of 128 with --tiny)")
    p.add_argument("--modes", type=_mode, nargs="+", default=None,
                   help="attention modes: sdpa (baseline, always run first), int8, int8-fp8, int4, fp8, none, "
                        "sage, no-attn, each optionally +fused. Default: " + " ".join(RANDOM_MODES)
                        + " (random) / " + " ".join(REAL_MODES) + " (real)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="random: timed forwards per mode (median reported; default 5); "
                        "real: sampler steps (default 4 schnell / 28 dev)")
    p.add_argument("--warmup", type=_nonneg_int, default=2,
                   help="random: untimed forwards per mode first; real: untimed 1-step pipeline calls first")
    p.add_argument("--out", default=None, help="results folder (default: $OUT, else ./results)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny config (1 double + 1 single block, 2 heads of 128, 64 image tokens at 1024), CPU-fast")
    p.add_argument("--weights", choices=["auto", "random", "real"], default="auto",
                   help="auto: real weights if found locally, else random")
    p.add_argument("--model-path", default=None, help="a local diffusers FluxPipeline folder (model_index.json)")
    p.add_argument("--variant", choices=["dev", "schnell"], default="dev",
                   help="random: which config (dev has guidance embeddings); real: which HF cache repo to look in")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (random mode)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="weights / inputs / sampler seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="real mode: the prompt")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default 3.5 dev, 0 schnell)")
    p.add_argument("--no-prologue", action="store_true",
                   help="skip the separate RMSNorm+RoPE (unfused vs fused) timing")
    p.add_argument("--breakdown", action="store_true",
                   help="random mode: per mode, also time the parts of the forward with CUDA events (extra "
                        "forwards): outside attention, attention modules, their prologue (q/k RMSNorm + concat + "
                        "RoPE, + K/V quantisation with +fusedq) and the attention call (quantisation inside it "
                        "included)")
    p.add_argument("--no-rerun-baseline", action="store_true",
                   help="do not time the baseline a second time after all modes (a drift check)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device!r}: {exc}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.dtype is None:
        args.dtype = "bf16" if args.device.type == "cuda" else "fp32"
    if args.tiny and args.weights == "real":
        p.error("--tiny is the random-weights tiny config; it cannot be combined with --weights real")
    if args.tiny and args.model_path:
        p.error("--tiny cannot be combined with --model-path")
    if args.model_path and args.weights == "random":
        p.error("--model-path given with --weights random")
    if args.model_path and not Path(args.model_path).is_dir():
        p.error(f"--model-path {args.model_path!r} is not a folder")
    mult = 128 if args.tiny else 16
    bad = [r for r in args.resolution if r % mult]
    if bad:
        p.error(f"--resolution {bad}: each must be a multiple of {mult}{' with --tiny' if args.tiny else ''}")
    if args.modes is not None:  # baseline first, no duplicates
        seen, modes = set(), []
        for m in args.modes:
            if m.name not in seen:
                seen.add(m.name)
                modes.append(m)
        base = [m for m in modes if m.is_baseline]
        if not base:
            print("note: adding the baseline mode 'sdpa' (every ratio is measured against it)", file=sys.stderr)
            base = [_mode("sdpa")]
        args.modes = base + [m for m in modes if not m.is_baseline]
    args.out = Path(args.out or os.environ.get("OUT") or "results")
    args._parser = p
    return args


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _gib(b):
    return None if b is None else b / GiB


def _fmt(v, spec, none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _cos_fmt(c):
    if c is None:
        return "-"
    if c >= 0.9999995:
        return "1.000000"
    return f"{c:.6f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _env(args, ft) -> dict:
    from qflash.bench.env import collect_env

    env = collect_env(args.device)
    env["diffusers"] = ft.diffusers_version()
    return env


# --------------------------------------------------------------------------------------------
# random-weights mode
# --------------------------------------------------------------------------------------------


class _AttnCapture:
    """Forward hooks on every Flux attention module: keeps a token-strided sample (<= 512 tokens)
    of each block's attention output, to compare a mode's blocks with the baseline's."""

    def __init__(self, model):
        self.model = model
        self.outputs: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self):
        for module in self.model.modules():
            if type(module).__name__ == "FluxAttention":
                self.handles.append(module.register_forward_hook(self._hook))
        return self

    def _hook(self, module, args, output):
        for t in output if isinstance(output, tuple) else (output,):
            stride = max(1, t.shape[1] // 512)
            self.outputs.append(t[:, ::stride].detach().clone())

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class _PartTimer:
    """CUDA events (``time.perf_counter`` on a CPU) around the parts of each forward (``--breakdown``):

    - ``attn_module``: each Flux attention module's whole call (projections ... output projection);
    - ``prologue``: q/k RMSNorm + [text, image] concat + RoPE — diffusers' norm modules and
      ``apply_rotary_emb`` (default processor), the hooked processors' ``_prologue`` (qflash,
      ``+fused``), or ``rmsnorm_rope_quantize`` (``+fusedq``, which also writes the quantised K/V);
    - ``attention``: ``dispatch_attention_fn`` / ``_attend`` / ``qflash.attention(q, QuantizedKV)``
      (an unfused qflash call quantises K/V inside it).

    Installed by wrapping (instance attributes, module hooks, two module-level names), all undone
    on exit. Regions never nest within one part. Enter it after the mode's processors are installed.
    """

    PARTS = ("attn_module", "prologue", "attention")

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.pairs = {p: [] for p in self.PARTS}
        self.undo = []

    def _now(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _wrap(self, part, fn):
        def timed(*args, **kwargs):
            start = self._now()
            out = fn(*args, **kwargs)
            self.pairs[part].append((start, self._now()))
            return out
        return timed

    def _hook(self, module, part):
        def pre(mod, args):
            self.pairs[part].append([self._now(), None])

        def post(mod, args, output):
            self.pairs[part][-1][1] = self._now()

        hs = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self.undo += [h.remove for h in hs]

    def _patch(self, owner, name, part):
        real = getattr(owner, name)
        setattr(owner, name, self._wrap(part, real))
        self.undo.append(lambda: setattr(owner, name, real))

    def __enter__(self):
        from diffusers.models.transformers import transformer_flux
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        from qflash.integrations import fused_prologue

        native = False
        for module in self.model.modules():
            if type(module).__name__ != "FluxAttention":
                continue
            self._hook(module, "attn_module")
            proc = module.processor
            if type(proc) is FluxAttnProcessor:
                native = True
                for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                    if getattr(module, name, None) is not None:
                        self._hook(getattr(module, name), "prologue")
            else:
                for name, part in (("_prologue", "prologue"), ("_attend", "attention")):
                    if hasattr(proc, name):
                        setattr(proc, name, self._wrap(part, getattr(proc, name)))
                        self.undo.append(lambda proc=proc, name=name: proc.__dict__.pop(name, None))
        if native:
            self._patch(transformer_flux, "apply_rotary_emb", "prologue")
            self._patch(transformer_flux, "dispatch_attention_fn", "attention")
        self._patch(fused_prologue, "rmsnorm_rope_quantize", "prologue")
        self._patch(fused_prologue, "attention", "attention")
        return self

    def __exit__(self, *exc):
        for fn in reversed(self.undo):
            fn()
        self.undo = []

    def totals_ms(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            ms = lambda a, b: a.elapsed_time(b)
        else:
            ms = lambda a, b: (b - a) * 1e3
        return {p: sum(ms(a, b) for a, b in pairs if b is not None) for p, pairs in self.pairs.items()}


def time_breakdown(model, fwd, device, reps: int) -> dict:
    """Mean ms per forward of each part (``_PartTimer``) over ``reps`` forwards, after one untimed."""
    fwd()
    fw = []
    with _PartTimer(model, device) as pt:
        for _ in range(reps):
            start = pt._now()
            fwd()
            fw.append((start, pt._now()))
        parts = pt.totals_ms()
        calls = {p: len(v) // reps for p, v in pt.pairs.items()}
    if device.type == "cuda":
        total = sum(a.elapsed_time(b) for a, b in fw)
    else:
        total = sum((b - a) * 1e3 for a, b in fw)
    out = {"forward_ms": total / reps, **{f"{p}_ms": v / reps for p, v in parts.items()}, "calls_per_forward": calls,
           "forwards": reps}
    out["outside_attention_ms"] = out["forward_ms"] - out["attn_module_ms"]
    out["attn_other_ms"] = out["attn_module_ms"] - out["prologue_ms"] - out["attention_ms"]
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na == 0.0 or nb == 0.0:
        return 0.0 if na != nb else 1.0
    return (a @ b).item() / (na * nb)


def run_random(args, ft) -> dict:
    from qflash.bench.metrics import compare

    device, dtype = args.device, DTYPES[args.dtype]
    cfg_name = "tiny" if args.tiny else args.variant
    config = ft.FLUX_CONFIGS[cfg_name]
    modes = args.modes or [ft.parse_mode(m) for m in RANDOM_MODES]
    reps = args.steps or 5
    text_tokens = ft.TINY_TEXT_TOKENS if args.tiny else ft.TEXT_TOKENS
    result = {"kind": "random", "config_name": cfg_name, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                                    for k, v in config.items()},
              "banner": RANDOM_BANNER, "dtype": args.dtype, "warmup": args.warmup, "timed_forwards": reps,
              "timer": "CUDA events around each forward" if device.type == "cuda" else "time.perf_counter",
              "resolutions": []}

    t0 = time.perf_counter()
    print(f"building FluxTransformer2DModel ({cfg_name} config, random {args.dtype} weights, seed {args.seed}) "
          f"on {device} ...", file=sys.stderr)
    model = ft.build_random_transformer(config, device, dtype, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    result["params"] = n_params
    result["build_s"] = time.perf_counter() - t0
    print(f"  {n_params / 1e9:.2f} B parameters in {result['build_s']:.1f} s", file=sys.stderr)

    for res in args.resolution:
        grid = ft.token_grid(res, args.tiny)
        inputs = ft.make_inputs(config, grid, text_tokens, batch=args.batch, device=device, dtype=dtype,
                                seed=args.seed)
        entry = {"resolution": res, "image_tokens": grid[0] * grid[1], "text_tokens": text_tokens,
                 "attention_calls_per_forward": config["num_layers"] + config["num_single_layers"], "rows": []}
        result["resolutions"].append(entry)
        base_out, base_blocks, base_ms, no_attn_rel = None, None, None, None
        schedule = list(modes) + ([modes[0]] if not args.no_rerun_baseline else [])
        for i, mode in enumerate(schedule):
            rerun = i > 0 and mode.is_baseline
            name = mode.name + (" (rerun)" if rerun else "")
            row = {"mode": name, "label": mode.label + (" — timed again last (drift check)" if rerun else "")}
            entry["rows"].append(row)
            why = ft.mode_unavailable(mode, device)
            if why:
                row.update(status="skipped", reason=why)
                print(f"  {res}px {name}: skipped ({why})", file=sys.stderr)
                continue
            _free(device)
            try:
                with torch.inference_mode(), ft.installed(model, mode) as how:
                    row["installed"] = how
                    def fwd(inputs=inputs):
                        return model(**inputs)[0]

                    with ft.peak_memory(device) as mem:
                        times, out = ft.time_calls(fwd, device, warmup=args.warmup, reps=reps)
                    blocks = None
                    if not rerun:
                        with _AttnCapture(model) as cap:
                            fwd()
                        blocks = cap.outputs
                    if args.breakdown:
                        row["breakdown"] = time_breakdown(model, fwd, device, reps)
            except Exception as exc:  # one failing mode must not lose the others' numbers
                if device.type == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
                    row.update(status="error", reason="CUDA out of memory")
                else:
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
                if mode.is_baseline and base_out is None:
                    raise RuntimeError(f"the baseline failed at {res}px: {row['reason']}") from exc
                print(f"  {res}px {name}: ERROR {row['reason']}", file=sys.stderr)
                _free(device)
                continue
            med = statistics.median(times)
            row.update(status="ok", times_ms=times, median_ms=med, mean_ms=statistics.mean(times),
                       peak_gib=_gib(mem["peak_bytes"]), extra_gib=_gib(mem["extra_bytes"]))
            if base_out is None:
                base_out, base_blocks, base_ms = out.clone(), blocks, med
            row["speedup"] = base_ms / med
            cmp = compare(out, base_out)
            row.update(out_cosine=cmp["cosine"], out_rel_l2=cmp["rel_l2"], out_nonfinite=cmp["nonfinite"])
            if blocks is not None and base_blocks is not None and len(blocks) == len(base_blocks):
                cos = [_cosine(a, b) for a, b in zip(blocks, base_blocks)]
                row.update(attn_cos_min=min(cos), attn_cos_mean=statistics.mean(cos), attn_blocks=len(cos))
            if mode.base == "no-attn":
                no_attn_rel = cmp["rel_l2"]
            print(f"  {res}px {name}: {med:.2f} ms/forward, x{row['speedup']:.3f}, out cos {cmp['cosine']:.6f}",
                  file=sys.stderr)
            del out
        if no_attn_rel:
            for row in entry["rows"]:
                if row.get("status") == "ok":  # share of attention's contribution to the output that moved
                    row["rel_l2_vs_no_attn"] = row["out_rel_l2"] / no_attn_rel
        if not args.no_prologue:
            try:
                entry["prologue"] = ft.time_prologue(config, grid, text_tokens, batch=args.batch, device=device,
                                                     dtype=dtype, seed=args.seed,
                                                     warmup=3 if device.type == "cuda" else 1,
                                                     reps=20 if device.type == "cuda" else 2)
                entry["prologue"]["baseline_forward_ms"] = base_ms
            except Exception as exc:
                entry["prologue"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        del inputs, base_out, base_blocks
        _free(device)
    return result


def random_tables(result: dict) -> str:
    out = []
    for entry in result["resolutions"]:
        p = entry.get("prologue")
        if p and "error" not in p:
            base = p.get("baseline_forward_ms")
            share = f" ({100 * p['saved_step_ms'] / base:.1f}% of the baseline forward)" if base else ""
            out.append(
                f"pre-attention RMSNorm+RoPE of q,k per forward at {entry['resolution']}px "
                f"({p['shape']['double_blocks']} double + {p['shape']['single_blocks']} single blocks): "
                f"unfused {p['unfused_step_ms']:.2f} ms, fused {p['fused_step_ms']:.2f} ms [{p['fused_impl']}], "
                f"saves {p['saved_step_ms']:.2f} ms{share}; max |diff| {p['max_abs_diff']:.3g}")
            sweep = p.get("fused_step_ms_by_config")
            if sweep:
                best = min(sweep, key=sweep.get)
                out.append("  fused kernel launch configs (ms per forward): "
                           + ", ".join(f"{k} {v:.2f}" for k, v in sweep.items()) + f"; best {best}")
        elif p:
            out.append(f"pre-attention timing at {entry['resolution']}px failed: {p['error']}")
    headers = ["res", "mode", "ms/forward", "speed-up", "peak GiB", "+act GiB", "out cos", "out relL2",
               "relL2/no-attn", "attn-block cos min"]
    rows = []
    for entry in result["resolutions"]:
        for r in entry["rows"]:
            if r.get("status") != "ok":
                rows.append([f"{entry['resolution']}", r["mode"], r.get("status", "?") + ": " + r.get("reason", ""),
                             *["-"] * (len(headers) - 3)])
                continue
            rows.append([
                f"{entry['resolution']}", r["mode"], _fmt(r["median_ms"], ".2f"), _fmt(r["speedup"], ".3f") + "x",
                _fmt(r.get("peak_gib"), ".2f"), _fmt(r.get("extra_gib"), ".2f"), _cos_fmt(r.get("out_cosine")),
                _fmt(r.get("out_rel_l2"), ".2e"), _fmt(r.get("rel_l2_vs_no_attn"), ".3f"),
                _cos_fmt(r.get("attn_cos_min")),
            ])
    cfg = result["config"]
    head = (f"Flux transformer, {result['config_name']} config ({cfg['num_layers']} double + "
            f"{cfg['num_single_layers']} single blocks, {cfg['num_attention_heads']} heads x "
            f"{cfg['attention_head_dim']}), {result['dtype']}, one forward per measurement, median of "
            f"{result['timed_forwards']} after {result['warmup']} warm-up ({result['timer']})\n"
            f"*** {RANDOM_BANNER} ***" + "".join("\n" + c for c in _caveat(result)))
    notes = ("speed-up: baseline (first sdpa row) / mode. +act: peak minus memory held before the forward "
             "(weights, inputs). relL2/no-attn: output relL2 as a share of removing attention entirely "
             "(with random weights attention moves the output little, so out cos is close to 1 for any mode). "
             "attn-block cos min: worst cosine of one attention block's output vs the baseline run's.")
    text = "\n".join([*out, "", head, _table(headers, rows), notes])
    bd = _breakdown_table(result)
    return text if not bd else text + "\n\n" + bd


def _breakdown_table(result: dict) -> str:
    """``--breakdown``: mean ms per forward of each part, per mode (empty without the flag)."""
    headers = ["res", "mode", "forward", "outside attn", "attn modules", "prologue", "attention", "attn other",
               "calls/fwd (prologue, attention)"]
    rows = []
    for entry in result["resolutions"]:
        for r in entry["rows"]:
            b = r.get("breakdown")
            if not b:
                continue
            c = b["calls_per_forward"]
            rows.append([str(entry["resolution"]), r["mode"], *(_fmt(b[k], ".2f") for k in (
                "forward_ms", "outside_attention_ms", "attn_module_ms", "prologue_ms", "attention_ms",
                "attn_other_ms")), f"{c['prologue']}, {c['attention']}"])
    if not rows:
        return ""
    return ("Per-part time, ms per forward (--breakdown: events around each part, separate forwards; "
            "prologue = q/k RMSNorm + concat + RoPE (+ K/V quantisation with +fusedq); attention = the attention "
            "call (an unfused qflash call quantises K/V inside it); attn other = projections, output projection, "
            "V concat)\n" + _table(headers, rows))


# --------------------------------------------------------------------------------------------
# real-weights mode
# --------------------------------------------------------------------------------------------


def find_local_weights(args) -> tuple[str | None, str]:
    """(path, how) of a local diffusers Flux pipeline, or (None, what was looked at). Never downloads."""
    if args.model_path:
        path = Path(args.model_path)
        if not (path / "model_index.json").is_file():
            return None, f"--model-path {path} has no model_index.json (not a diffusers pipeline folder)"
        return str(path), f"--model-path {path}"
    repos = [HF_REPOS[args.variant]] + [r for v, r in HF_REPOS.items() if v != args.variant]
    looked = []
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None, "huggingface_hub is not installed (no Hugging Face cache to look in)"
    for repo in repos:
        try:
            path = snapshot_download(repo, local_files_only=True)
        except Exception as exc:  # LocalEntryNotFoundError, OfflineModeIsEnabled, ...
            looked.append(f"{repo}: not in the Hugging Face cache ({type(exc).__name__})")
            continue
        if (Path(path) / "model_index.json").is_file() and (Path(path) / "transformer").is_dir():
            return path, f"Hugging Face cache, {repo}"
        looked.append(f"{repo}: cached but incomplete ({path})")
    return None, "; ".join(looked)


class _StepTimer:
    """CUDA events around every call of the pipeline's transformer (one per sampler step)."""

    def __init__(self, module, device):
        self.module, self.device, self.pairs, self.handles = module, device, [], []

    def __enter__(self):
        def pre(mod, args, kwargs=None):
            if self.device.type == "cuda":
                e = torch.cuda.Event(enable_timing=True)
                e.record()
            else:
                e = time.perf_counter()
            self.pairs.append([e, None])

        def post(mod, args, output):
            if self.device.type == "cuda":
                e = torch.cuda.Event(enable_timing=True)
                e.record()
            else:
                e = time.perf_counter()
            self.pairs[-1][1] = e

        self.handles = [self.module.register_forward_pre_hook(pre), self.module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def times_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in self.pairs if b is not None]
        return [(b - a) * 1e3 for a, b in self.pairs if b is not None]


def run_real(args, ft, path: str, how: str) -> dict:
    from diffusers import FluxPipeline

    device, dtype = args.device, DTYPES[args.dtype]
    print(f"loading FluxPipeline from {how} (offline) ...", file=sys.stderr)
    t0 = time.perf_counter()
    import diffusers

    major_minor = tuple(int(x) for x in diffusers.__version__.split(".")[:2] if x.isdigit())
    dtype_kw = "dtype" if major_minor >= (0, 42) else "torch_dtype"  # torch_dtype is deprecated from 0.42
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True, **{dtype_kw: dtype})
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    dev = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
    variant = "dev" if dev else "schnell"
    steps = args.steps or (28 if dev else 4)
    guidance = args.guidance if args.guidance is not None else (3.5 if dev else 0.0)
    max_seq = 512 if dev else 256
    modes = args.modes or [ft.parse_mode(m) for m in REAL_MODES]
    result = {"kind": "real", "weights": how, "path": path, "variant": variant, "dtype": args.dtype,
              "prompt": args.prompt, "seed": args.seed, "steps": steps, "guidance": guidance,
              "max_sequence_length": max_seq, "sampler": type(pipe.scheduler).__name__,
              "load_s": time.perf_counter() - t0, "resolutions": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def call(res, n_steps):
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(args.prompt, height=res, width=res, num_inference_steps=n_steps, guidance_scale=guidance,
                    generator=gen, max_sequence_length=max_seq).images[0]

    for res in args.resolution:
        tiled = res > 1024
        if tiled:  # the VAE decode at 2048px is the memory peak otherwise; the same for every mode
            pipe.vae.enable_tiling()
        else:
            pipe.vae.disable_tiling()
        entry = {"resolution": res, "vae_tiling": tiled, "rows": []}
        result["resolutions"].append(entry)
        images, labels, base_img, base_step = [], [], None, None
        for mode in modes:
            row = {"mode": mode.name, "label": mode.label}
            entry["rows"].append(row)
            why = ft.mode_unavailable(mode, device)
            if why:
                row.update(status="skipped", reason=why)
                continue
            _free(device)
            try:
                with torch.inference_mode(), ft.installed(pipe.transformer, mode) as inst:
                    row["installed"] = inst
                    for _ in range(args.warmup):
                        call(res, 1)
                    with ft.peak_memory(device) as mem, _StepTimer(pipe.transformer, device) as st:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t1 = time.perf_counter()
                        image = call(res, steps)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        wall = time.perf_counter() - t1
                    step_ms = st.times_ms()
            except Exception as exc:
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
                if mode.is_baseline:
                    raise
                print(f"  {res}px {mode.name}: ERROR {row['reason']}", file=sys.stderr)
                continue
            fname = args.out / f"flux_{res}px_{mode.name.replace('+', '_')}.png"
            image.save(fname)
            med_step = statistics.median(step_ms) if step_ms else None
            if base_img is None:
                base_img, base_step, base_wall = image, med_step, wall
            row.update(status="ok", image=str(fname), wall_s=wall, step_ms=step_ms, median_step_ms=med_step,
                       speedup_step=(base_step / med_step) if med_step else None, speedup_image=base_wall / wall,
                       peak_gib=_gib(mem["peak_bytes"]), psnr_db=ft.psnr(image, base_img), ssim=ft.ssim(image, base_img))
            images.append(image)
            labels.append(f"{mode.name}  PSNR {row['psnr_db']:.1f} dB  SSIM {row['ssim']:.3f}" if not mode.is_baseline
                          else f"{mode.name} (baseline)")
            print(f"  {res}px {mode.name}: {wall:.2f} s/image, {med_step:.1f} ms/step, PSNR {row['psnr_db']:.2f}, "
                  f"SSIM {row['ssim']:.4f}", file=sys.stderr)
        if images:
            grid_path = args.out / f"flux_{res}px_side_by_side.png"
            ft.side_by_side(images, labels).save(grid_path)
            entry["side_by_side"] = str(grid_path)
    return result


def real_table(result: dict) -> str:
    headers = ["res", "mode", "s/image", "ms/step", "speed-up (step)", "speed-up (image)", "peak GiB", "PSNR dB",
               "SSIM"]
    rows = []
    for entry in result["resolutions"]:
        for r in entry["rows"]:
            if r.get("status") != "ok":
                rows.append([str(entry["resolution"]), r["mode"], r.get("status", "?") + ": " + r.get("reason", ""),
                             *["-"] * (len(headers) - 3)])
                continue
            rows.append([str(entry["resolution"]), r["mode"], _fmt(r["wall_s"], ".2f"), _fmt(r["median_step_ms"], ".1f"),
                         _fmt(r["speedup_step"], ".3f") + "x", _fmt(r["speedup_image"], ".3f") + "x",
                         _fmt(r["peak_gib"], ".2f"), "inf" if r["psnr_db"] == math.inf else f"{r['psnr_db']:.2f}",
                         f"{r['ssim']:.4f}"])
    head = (f"FluxPipeline FLUX.1-{result['variant']} ({result['weights']}), {result['dtype']}, "
            f"{result['sampler']} {result['steps']} steps, guidance {result['guidance']}, seed {result['seed']}; "
            f"PSNR/SSIM vs the baseline (sdpa) image")
    pics = [f"images: {e['side_by_side']}" for e in result["resolutions"] if e.get("side_by_side")]
    return "\n".join([head, *_caveat(result), _table(headers, rows), *pics])


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    ft = _import_flux_timing()
    path, how = None, ""
    if args.weights in ("auto", "real") and not args.tiny:
        path, how = find_local_weights(args)
        if path is None:
            msg = f"no local Flux weights found ({how}); nothing is downloaded"
            if args.weights == "real":
                print(f"error: --weights real: {msg}. Pass --model-path or put the pipeline in the HF cache.",
                      file=sys.stderr)
                return 2
            print(f"note: {msg} -> random-weights timing mode", file=sys.stderr)
    real = path is not None
    if args.device.type != "cuda" and not args.tiny:
        if not real:
            args._parser.error(f"the full-size random-weights transformer needs a CUDA GPU (device is {args.device}); "
                               "use --tiny on the CPU")
        print(f"warning: running the pipeline on {args.device}: fine for a tiny test pipeline, very slow for FLUX.1",
              file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_real(args, ft, path, how) if real else run_random(args, ft)
    result["env"] = _env(args, ft)
    result["command"] = " ".join(["python", "examples/flux/run.py", *(sys.argv[1:] if argv is None else argv)])
    table = real_table(result) if real else random_tables(result)
    result["table"] = table
    (args.out / "flux_results.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "flux_table.md").write_text(f"`{result['command']}`\n\n{table}\n")
    print(f"results: {args.out / 'flux_results.json'}", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
