"""GPU time of the portable forward's modes at small shapes: the data behind ``tuning.FUSED_QUANT``.

    python benchmarks/small_modes.py [--out DIR] [--shapes S1,S2] [--presets P1,P2] [--splits 0,128,256]

For each shape (default: the six small shapes of ``qflash bench``) and preset, the CUDA-graph GPU
time per call (the call captured once, replayed 200 times; no host cost) of
``portable.launch.attention_fwd`` in each mode:

- ``auto``: what the launcher picks (``use_fused_quant``, ``pick_split_keys``);
- ``F/0``, ``F/<n>``: one launch (quantisation inside the attention kernel), unsplit or split
  every ``n`` keys (each split with its own K/V statistics) plus the merge launch; ``@BMxBNxWxS``:
  the same with the tiles of ``--configs`` (the mode may widen BN/BM to its scale blocks);
- ``Q/auto``: the separate quantiser (statistics, quantiser, attention, merge where split);
  ``Q/auto@BMxBNxWxS``: the same with the attention launch's tiles from ``--configs``;

and SDPA's default backend on the same inputs. Splits that do not divide into the mode's key
tiles or that leave a single split are skipped. Prints one table (µs, and × SDPA) and writes
``small_modes.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash
from qflash.bench.shapes import parse_shapes
from qflash.kernels.portable import launch
from qflash.kernels.portable.tuning import KernelConfig

sys.path.insert(0, os.path.dirname(__file__))
from launch_overhead import SMALL, graph_us


def modes(splits: list[int], configs: list[str]) -> list[tuple[str, dict]]:
    out = [("auto", {})]
    for c in [""] + configs:  # the one-launch modes with the picked tiles, then with each given config
        kc = {"kernel_config": KernelConfig(*(int(x) for x in c.split("x")))} if c else {}
        out += [(f"F/{n}" + (f"@{c}" if c else ""), {"fused_quant": True, "split_keys": n, **kc}) for n in [0, *splits]]
    out.append(("Q/auto", {"fused_quant": False}))
    for c in configs:  # the separate quantiser's attention launch with each given config
        out.append((f"Q/auto@{c}", {"fused_quant": False, "kernel_config": KernelConfig(*(int(x) for x in c.split("x")))}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=None, help="BxHxS[:Sk]xD,... (default: the small bench shapes)")
    ap.add_argument("--presets", default="int8,int8-fp8,fp8,int4")
    ap.add_argument("--splits", default="128,256,512", help="keys per split to try in the one-launch mode")
    ap.add_argument("--configs", default="", help="BMxBNxWARPSxSTAGES,... tiles to try in the one-launch mode too")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes) if args.shapes else SMALL
    splits = [int(x) for x in args.splits.split(",") if x]
    configs = [c for c in args.configs.split(",") if c]
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}  (GPU µs per call, CUDA-graph replay)")
    for sh in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(sh.batch, sh.heads, sh.seq, sh.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(sh.batch, sh.heads, sh.keys, sh.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        causal = sh.causal
        sdpa = graph_us(lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c))
        rows.append({"shape": sh.spec, "preset": "sdpa", "mode": "-", "gpu_us": sdpa})
        for preset in args.presets.split(","):
            cfg = qflash.resolve_quant(preset)
            for name, kw in modes(splits, configs):
                try:
                    us = graph_us(lambda q=q, k=k, v=v, cfg=cfg, kw=kw, c=causal:
                                  launch.attention_fwd(q, k, v, cfg, causal=c, **kw))
                except Exception as e:  # noqa: BLE001 - a split the tiles cannot take, tiles over the limits: a row "--"
                    us = None
                    why = str(e).split("\n")[0][:60]
                rows.append({"shape": sh.spec, "preset": preset, "mode": name, "gpu_us": us})
                cell = f"{us:7.1f} {us / sdpa:5.2f}x" if us is not None else f"   -- ({why})"
                print(f"{sh.spec:16s} {preset:9s} {name:7s} {cell}   (sdpa {sdpa:.1f})", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "small_modes.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
