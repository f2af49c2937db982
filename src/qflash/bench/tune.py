"""``qflash tune``: sweep the portable family's forward and backward tiles on this GPU, write a tuning table.

Needs a CUDA GPU and the kernels' tuning API: ``qflash.kernels.portable.tuning`` with ``KernelConfig``,
``config_key``, ``config_to_json`` and ``user_table_path``, and ``qflash.kernels.portable.launch.attention_fwd``
accepting ``kernel_config=``. Without either it says so and exits 1.

For every (shape, preset) each candidate config is run once (rejected if it fails or its output
differs from the default config's by more than ``MAX_DIFF`` relative L2), then timed with
``triton.testing.do_bench``. Candidates are ranked per tuning key (``config_key``) by their total
median time over the problems that map to the key. The backward (``--no-bwd`` skips it) sweeps
``BwdConfig`` candidates per head-dim bucket the same way (gradients of the ``none`` preset against
the default tiles', ranked by total time). The winners are written as JSON (``config_to_json``) to
``--out`` or the table ``pick_config`` / ``pick_bwd_config`` read for this GPU model, and
``tuning.reload()`` makes the running process use them.
"""

from __future__ import annotations

import inspect
import itertools
import json
import sys

import torch

MAX_DIFF = 1e-2
NEEDED = ("KernelConfig", "config_key", "config_to_json", "user_table_path")
DEFAULT_SHAPES = "1x1x1024x128,1x24x4608x128,1x32x8192x128c,1x8x4096x64"
DEFAULT_PRESETS = ["int8", "int8-fp8", "fp8"]


def _api():
    """(configs module, attention_fwd) or raise RuntimeError saying what is missing."""
    try:
        from ..kernels.portable import tuning as configs
        from ..kernels.portable.launch import attention_fwd
    except Exception as exc:
        raise RuntimeError(f"qflash.kernels is not importable ({type(exc).__name__}: {exc})") from None
    missing = [n for n in NEEDED if not hasattr(configs, n)]
    if "kernel_config" not in inspect.signature(attention_fwd).parameters:
        missing.append("launch.attention_fwd(kernel_config=...)")
    if missing:
        raise RuntimeError(f"qflash.kernels.portable.tuning lacks the tuning API: {', '.join(missing)}")
    return configs, attention_fwd


def candidates(configs) -> list:
    """The sweep space: the kernels' own ``TUNE_SPACE`` if they define one, else a small grid."""
    space = getattr(configs, "TUNE_SPACE", None)
    if space:
        return list(space)
    out = []
    for bm, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        try:
            out.append(configs.KernelConfig(bm, bn, w, s))
        except ValueError:
            pass
    return out


def bwd_candidates(configs) -> list:
    """Backward tiles to try: the family's ``BWD_TUNE_SPACE`` if it defines one, else a small grid."""
    space = getattr(configs, "BWD_TUNE_SPACE", None)
    if space:
        return list(space)
    out = []
    for m1, n1, w, st in itertools.product((32, 64), (64, 128), (4, 8), (2, 3)):
        try:
            out.append(configs.BwdConfig(m1, n1, n1, m1, w, st, w, st))
        except ValueError:
            pass
    return out


def tune_backward(configs, shapes, device, time_gpu, compare) -> dict:
    """{head-dim bucket: best BwdConfig} over ``shapes`` (bf16, the exact backward)."""
    from ..config import PRESETS
    from ..kernels.portable.bwd_launch import attention_bwd
    from ..kernels.portable.launch import attention_fwd
    from .bench import make_inputs

    totals: dict = {}
    space = bwd_candidates(configs)
    for i, shape in enumerate(shapes):
        d = 64 if shape.head_dim <= 64 else 128 if shape.head_dim <= 128 else 256
        q, k, v = make_inputs(shape, device, torch.bfloat16, 100 + i)
        out, lse = attention_fwd(q, k, v, PRESETS["none"], causal=shape.causal, return_lse=True)
        do = torch.randn_like(out)
        ref = attention_bwd(q, k, v, out, lse, do, causal=shape.causal)[:3]
        for kc in space:
            def fn(kc=kc, q=q, k=k, v=v, out=out, lse=lse, do=do, causal=shape.causal):
                return attention_bwd(q, k, v, out, lse, do, causal=causal, kernel_config=kc)
            try:
                if max(compare(g, r)["rel_l2"] for g, r in zip(fn()[:3], ref)) > MAX_DIFF:
                    continue
                med, _, _ = time_gpu(fn, 10, 50)
            except Exception:  # a config that does not compile or fit here: not a candidate
                continue
            slot = totals.setdefault(d, {}).setdefault(kc, [0.0, 0])
            slot[0] += med
            slot[1] += 1
        print(f"  {shape.spec} backward: {len(totals.get(d, {}))} configs ran", flush=True)
    best = {}
    for d, res in totals.items():
        full = max(n for _, n in res.values())
        best[d] = min((c for c, (t, n) in res.items() if n == full), key=lambda c: res[c][0])
    return best


def cmd_tune(args) -> int:
    if not torch.cuda.is_available():
        print("qflash tune: needs a CUDA GPU and none is visible; nothing tuned.", file=sys.stderr)
        return 1
    try:
        configs, attention_fwd = _api()
    except RuntimeError as exc:
        print(f"qflash tune: {exc}; nothing tuned.", file=sys.stderr)
        return 1
    from ..config import PRESETS
    from .bench import make_inputs
    from .metrics import compare
    from .shapes import parse_shapes
    from .timing import time_gpu

    device = torch.device("cuda", torch.cuda.current_device())
    shapes = args.shapes or parse_shapes(DEFAULT_SHAPES)
    presets = args.presets or DEFAULT_PRESETS
    space = candidates(configs)
    print(f"qflash tune: {torch.cuda.get_device_name(device)}, {len(shapes)} shape(s) x {len(presets)} preset(s) "
          f"x {len(space)} configs", flush=True)
    totals: dict = {}  # key -> {config: [total ms, problems]}
    for i, shape in enumerate(shapes):
        q, k, v = make_inputs(shape, device, torch.bfloat16, i)
        for p in presets:
            cfg = PRESETS[p]
            key = configs.config_key(shape.head_dim, cfg.quantizes_pv, shape.seq, shape.keys, cfg.quantizes_qk)
            ref, _ = attention_fwd(q, k, v, cfg, causal=shape.causal)
            for kc in space:
                def fn(kc=kc, q=q, k=k, v=v, cfg=cfg, causal=shape.causal):
                    return attention_fwd(q, k, v, cfg, causal=causal, kernel_config=kc)
                try:
                    if compare(fn()[0], ref)["rel_l2"] > MAX_DIFF:
                        continue
                    med, _, _ = time_gpu(fn, 10, 50)
                except Exception:  # a config the kernel cannot compile or launch here: not a candidate
                    continue
                slot = totals.setdefault(key, {}).setdefault(kc, [0.0, 0])
                slot[0] += med
                slot[1] += 1
            print(f"  {shape.spec} {p}: {len(totals.get(key, {}))} configs ran", flush=True)
    best = {}
    for key, res in totals.items():
        full = max(n for _, n in res.values())
        best[key] = min((c for c, (t, n) in res.items() if n == full), key=lambda c: res[c][0])
    best_bwd = {} if getattr(args, "no_bwd", False) else tune_backward(configs, shapes, device, time_gpu, compare)
    path = args.out or str(configs.user_table_path(device))
    doc = configs.config_to_json(best, best_bwd)
    doc["gpu"] = torch.cuda.get_device_name(device)
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    configs.reload()  # this process now picks the new table (when it is the one for this GPU)
    for key, c in sorted(best.items()):
        print(f"  {key}: {c}")
    for d, c in sorted(best_bwd.items()):
        print(f"  backward D{d}: {c}")
    print(f"qflash tune: wrote {path}")
    return 0
