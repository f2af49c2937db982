"""The ``qflash`` command line: ``qflash info`` (and the harness commands)."""

from __future__ import annotations

import argparse
import platform
import sys


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices and which backends can run here (and why not)."""
    import torch

    from . import __version__
    from .backend import kernels_usable, triton_status

    print(f"qflash {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch {torch.__version__}")
    ok, why = triton_status()
    print(f"triton: {why}")
    print("backends:")
    print("  reference (pure PyTorch): available on every device")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            usable, reason = kernels_usable(torch.device("cuda", i))
            print(f"  cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB): triton kernels {'available' if usable else 'unavailable: ' + reason}")
    else:
        usable, reason = kernels_usable(torch.device("cpu"))
        print(f"  cuda: no CUDA device visible; triton kernels on cpu: {'available: ' + reason if usable else 'unavailable: ' + reason}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        print("  mps: available (reference path)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qflash", description="Quantised flash attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and available backends")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
