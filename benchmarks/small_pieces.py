"""GPU time of each launch of the separate-quantiser path at small shapes, one CUDA graph per piece.

    python benchmarks/small_pieces.py [--shapes 1x24x256x128] [--presets int8,int4] [--configs 64x64x8x2]

For each shape and preset (``portable.launch`` directly, ``fused_quant=False``), the CUDA-graph
GPU time per replay (``launch_overhead.graph_us``) of:

- ``one kernel``: a one-element ``add_`` (what a graph replay of a single tiny kernel costs);
- ``whole``: ``attention_fwd`` (quantiser, Q smoothing's bias where the preset has it, attention);
- ``quantise``: ``quantize_qkv`` alone; ``bias``: ``smooth_terms.q_bias`` alone (int4);
- ``attention``: ``attention_fwd`` on codes made beforehand (and ``attention@<config>`` with each
  ``--configs`` tile), which still includes the bias launch for Q-smoothing presets;
- INT4 presets: ``whole`` and ``attention`` again with the codes in the other layout
  (``packed``: two per byte; ``flat``: one per byte), whichever ``tuning.int4_packed_codes`` does not pick;

and SDPA's default backend on the same inputs. Says where the separate path's time goes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qflash
from qflash.config import Precision
from qflash.bench.shapes import parse_shapes
from qflash.kernels.common import LOG2E
from qflash.kernels.portable import launch, smooth_terms
from qflash.kernels.portable.tuning import KernelConfig

sys.path.insert(0, os.path.dirname(__file__))
from launch_overhead import graph_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x24x256x128")
    ap.add_argument("--presets", default="int8,int4")
    ap.add_argument("--configs", default="")
    args = ap.parse_args()
    tiny = torch.zeros(1, device="cuda")
    print(f"one kernel {graph_us(lambda: tiny.add_(1)):.1f} us")
    for s in parse_shapes(args.shapes):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(s.batch, s.heads, s.seq, s.head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(s.batch, s.heads, s.keys, s.head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
                for _ in range(2))
        sdpa = graph_us(lambda: F.scaled_dot_product_attention(q, k, v))
        print(f"{s.name}: sdpa {sdpa:.1f} us")
        for preset in args.presets.split(","):
            cfg = qflash.resolve_quant(preset)
            pack = launch.int4_packed_codes(q.device)  # the launcher's INT4 code layout
            row = {"whole": graph_us(lambda: launch.attention_fwd(q, k, v, cfg, fused_quant=False)),
                   "quantise": graph_us(lambda: launch.quantize_qkv(q, k, v, cfg, pack_int4=pack))}
            codes = launch.quantize_qkv(q, k, v, cfg, pack_int4=pack)
            if cfg.smooth_q:
                mult = s.head_dim ** -0.5 * LOG2E
                row["bias"] = graph_us(lambda: smooth_terms.q_bias(k, codes.q_mean, codes.k_mean, mult,
                                                                   k_partials=codes.k_partials))
            row["attention"] = graph_us(lambda: launch.attention_fwd(q, k, v, cfg, codes=codes))
            for c in filter(None, args.configs.split(",")):
                kc = KernelConfig(*(int(x) for x in c.split("x")))
                row[f"attention@{c}"] = graph_us(lambda: launch.attention_fwd(q, k, v, cfg, codes=codes,
                                                                              kernel_config=kc))
            if cfg.q.precision is Precision.INT4:  # the other INT4 code layout than the default
                other = not launch.int4_packed_codes(q.device)
                tag = "packed" if other else "flat"
                saved, saved_plans = launch.int4_packed_codes, launch._PLANS
                # a fresh plan cache: a plan key does not include the code layout, so the cached plan of
                # the default layout would be replayed
                launch.int4_packed_codes, launch._PLANS = (lambda device: other), type(saved_plans)()
                try:
                    row[f"whole {tag}"] = graph_us(lambda: launch.attention_fwd(q, k, v, cfg, fused_quant=False))
                finally:
                    launch.int4_packed_codes, launch._PLANS = saved, saved_plans
                codes_o = launch.quantize_qkv(q, k, v, cfg, pack_int4=other)
                row[f"attention {tag}"] = graph_us(lambda: launch.attention_fwd(q, k, v, cfg, codes=codes_o))
            print(f"  {preset:9s} " + "  ".join(f"{name} {us:.1f}" for name, us in row.items()), flush=True)


if __name__ == "__main__":
    main()
