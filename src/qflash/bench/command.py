"""Shared plumbing of the harness commands: device choice, output directory, dtype names."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The requested device, or cuda when visible else cpu; a usage error if cuda is absent."""
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            args.parser.error(f"--device {args.device}: no CUDA GPU is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            args.parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def apply_threads(args: argparse.Namespace) -> None:
    """``--cpu-threads N``: set torch's intra-op thread count for this process (0: leave it)."""
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)


def out_dir(args: argparse.Namespace) -> Path:
    """Create ``--out`` (a usage error if it exists and is not a directory)."""
    path = Path(args.out)
    if path.exists() and not path.is_dir():
        args.parser.error(f"--out {args.out}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path
