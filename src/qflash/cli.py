"""The ``qflash`` command line: ``info``, ``bench``, ``accuracy``, ``tune`` and ``report``.

Bad arguments are argparse usage errors (exit code 2); each command's work lives in
``qflash.bench`` and is imported only when that command runs, so ``qflash info`` stays light.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices, the kernel families and which family each preset would use here."""
    import torch

    from . import __version__
    from .config import PRESETS
    from .kernels import dispatch
    from .kernels.common import triton_status, triton_usable
    from .spec import AttnSpec

    print(f"qflash {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch {torch.__version__}")
    _, why = triton_status()
    print(f"triton: {why}")
    print("kernel families (backend=\"auto\" tries them in this order):")
    for fam in dispatch.FAMILIES.values():
        s = fam.support
        cc = "" if s.min_cc is None and s.max_cc is None else f", compute capability {s.min_cc}..{s.max_cc}"
        devs = ", ".join(sorted(s.devices)) or "any device"
        print(f"  {fam.name}: {devs}{cc}{', backward' if s.backward else ''}"
              + (f" — {s.notes}" if s.notes else ""))
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else [torch.device("cpu")]
    for dev in devices:
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            usable, reason = triton_usable(dev)
            print(f"{dev} {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB): triton {'available' if usable else 'unavailable: ' + reason}")
        else:
            usable, reason = triton_usable(dev)
            if usable:
                state = "available: " + reason
            elif not triton_status()[0]:
                state = "unavailable: " + triton_status()[1]
            else:  # not triton_usable's per-tensor wording: no tensor is involved here
                state = "not used: they run on CUDA GPUs (TRITON_INTERPRET=1 runs them on the CPU, for debugging)"
            print(f"cpu (no CUDA device visible): triton kernels {state} (backend=\"auto\" uses the reference here)")
        for fam in dispatch.FAMILIES.values():
            try:
                tuning = fam.tuning(dev)
            except Exception as exc:  # a broken tuning file must not break `qflash info`
                tuning = f"unreadable ({type(exc).__name__}: {exc})"
            print(f"  {fam.name} tuning: {tuning}")
        probe = torch.empty((1, 1, 1, 128), dtype=torch.bfloat16, device=dev)
        picks = []
        for name in PRESETS:
            fam = dispatch.select(AttnSpec.build(name), probe, probe, probe, None)
            picks.append(f"{name} -> {fam.name}")
        print(f"  presets (bf16, head dim 128): {', '.join(picks)}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        print("mps: available (reference family)")
    return 0


# ---- argument types: each raises ArgumentTypeError, which argparse turns into a usage error ----

def _shapes(text: str):
    from .bench.shapes import parse_shapes

    try:
        return parse_shapes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _presets(text: str) -> list[str]:
    from .config import PRESETS

    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRESETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {bad or text!r}; choose from {', '.join(PRESETS)}")
    return names


def _positive(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return x


def _nonneg_int(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return x


def _device(text: str) -> str:
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    return text


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--quick", action="store_true", help=f"fewer/smaller shapes and shorter timing: a {what} in seconds")
    p.add_argument("--presets", type=_presets, default=None, metavar="P1,P2",
                   help="comma-separated qflash presets (default: all of them)")
    p.add_argument("--out", default="results", metavar="DIR", help="output directory (default: ./results)")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed of the inputs (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--cpu-threads", type=_nonneg_int, default=0, metavar="N",
                   help="torch CPU threads for this run (0 = torch's default); 1 steadies CPU timings on a busy host")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qflash", description="Quantised flash attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and available backends")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="time every preset and baseline; JSON, CSV, Markdown and a PNG plot",
                       description="Time every qflash preset and every full-precision baseline present "
                                   "(SDPA default, each SDPA backend, SageAttention) and measure their error "
                                   "vs an exact reference. Without a GPU: the reference path at small shapes.")
    _common(p, "smoke run")
    p.add_argument("--shapes", type=_shapes, default=None, metavar="BxHxSxD[c],...",
                   help="comma-separated shapes, 'c' suffix = causal, e.g. 1x24x4608x128,1x32x8192x128c")
    p.add_argument("--warmup", type=_positive, default=None, metavar="MS", help="warm-up time per row in ms")
    p.add_argument("--rep", type=_positive, default=None, metavar="MS", help="timed repetition time per row in ms")
    p.add_argument("--ref-heads", type=_nonneg_int, default=0, metavar="N",
                   help="compare errors on the first N heads only (0 = all, the default)")
    p.set_defaults(func=_run("bench", "cmd_bench"))

    p = sub.add_parser("accuracy", help="error of each preset on named workloads, plus the quantiser table",
                       description="Measure each preset's error vs exact attention on named workloads (N(0,1), "
                                   "outlier K, long sequence, MiniLM attention inputs and embeddings) and the "
                                   "quantiser round-trip RMSE table.")
    _common(p, "check")
    p.set_defaults(func=_run("accuracy", "cmd_accuracy"))

    p = sub.add_parser("tune", help="sweep kernel configurations on this GPU and write a tuning table",
                       description="Sweep the Triton kernels' configurations per shape on the current GPU and "
                                   "write the tuning table they pick up. Needs a CUDA GPU and "
                                   "qflash.kernels.portable.tuning with a tuning API.")
    p.add_argument("--shapes", type=_shapes, default=None, metavar="BxHxSxD[c],...", help="shapes to tune")
    p.add_argument("--presets", type=_presets, default=None, metavar="P1,P2", help="presets to tune")
    p.add_argument("--out", default=None, metavar="FILE", help="tuning table to write (default: the kernels' own)")
    p.add_argument("--no-bwd", action="store_true", help="tune the forward only (skip the backward tiles)")
    p.set_defaults(func=_run("tune", "cmd_tune"))

    p = sub.add_parser("report", help="write a Markdown performance snapshot from harness JSON",
                       description="Generate a performance snapshot (Markdown, measurements only) from a "
                                   "`qflash bench` JSON and optionally a `qflash accuracy` JSON. "
                                   "docs/PERFORMANCE.md is made with `--out docs/PERFORMANCE.md`.")
    p.add_argument("--from", dest="bench_json", required=True, metavar="BENCH_JSON", action="append",
                   help="qflash bench JSON (repeat for several runs: one table per run)")
    p.add_argument("--accuracy", default=None, metavar="ACC_JSON", help="qflash accuracy JSON")
    p.add_argument("--flux", default=None, metavar="FLUX_JSON", help="examples/flux/run.py's flux_results.json")
    p.add_argument("--append", default=None, metavar="MD", help="Markdown appended at the end (e.g. backward tables)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="Markdown file to write, '-' for stdout (default: <BENCH_JSON stem>.report.md "
                        "next to BENCH_JSON, e.g. results/bench.report.md)")
    p.set_defaults(func=_run("report", "cmd_report"))
    return parser


def _run(module: str, func: str):
    """A lazy command: imports ``qflash.bench.<module>`` only when the command runs."""
    def call(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"qflash.bench.{module}"), func)(args)
    return call


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parser = parser
    args.command_line = "qflash " + shlex.join(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
