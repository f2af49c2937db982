"""Tuning tables: which tile sizes, warps and stages the attention kernel uses.

Data, not logic: ``TABLES`` maps a GPU family to rows keyed on (head-dim bucket, P·V kind,
sequence bucket). ``pick_config`` looks up the current GPU, falls back to ``DEFAULT`` for GPUs
not in the table, and launchers accept an explicit ``KernelConfig`` so tests are deterministic.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["KernelConfig", "pick_config", "gpu_key", "TABLES", "DEFAULT", "user_table_path", "load_user_table"]


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the attention forward kernel.

    ``tma``: read K and Vᵀ codes through TMA tensor descriptors (8-bit Q·K with FP8 P·V, power-of-two
    head dims; ignored elsewhere). ``rotate``: issue the next tile's Q·Kᵀ before this tile's softmax
    in the unmasked pass (no mask, no bias, one K scale per tile; ignored elsewhere).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False
    rotate: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


DEFAULT = KernelConfig(64, 64, 4, 2)

# (gpu family) -> {(head-dim bucket, operand kind, seq bucket): KernelConfig}
# operand kind: "fp8" (FP8 P·V), "float" (8/4-bit Q·K, P·V in the input dtype) or "exact" (no
# quantisation; falls back to the "float" row where it has none of its own).
# seq bucket: "short" (Sq * Sk <= 1024 * 1024, a handful of tiles) or "long".
TABLES: dict[str, dict[tuple[int, str, str], KernelConfig]] = {
    "sm90": {
        (64, "float", "short"): KernelConfig(64, 64, 4, 2),
        (64, "float", "long"): KernelConfig(128, 64, 4, 3),
        (64, "fp8", "short"): KernelConfig(64, 64, 4, 2),
        (64, "fp8", "long"): KernelConfig(128, 128, 8, 3),
        (128, "float", "short"): KernelConfig(64, 64, 4, 2),
        # interleaved A/B at Flux 1024 (benchmarks/ab.py, run 18): int8 0.611 ms here vs 0.622 at
        # (64, 128, 4, 2); none 0.612 ms at (128, 64, 4, 2) vs 0.852 at (64, 128, 4, 2)
        (128, "float", "long"): KernelConfig(128, 64, 4, 3),
        (128, "exact", "long"): KernelConfig(128, 64, 4, 2),
        (128, "fp8", "short"): KernelConfig(64, 64, 4, 2),
        # TMA K/Vᵀ loads + rotated loop: 0.507 vs 0.539 ms plain at Flux 1024 (sweep, run 13); interleaved
        # A/B on one machine (run 17): 0.535 vs 0.550 ms
        (128, "fp8", "long"): KernelConfig(64, 128, 4, 3, tma=True, rotate=True),
        (256, "float", "short"): KernelConfig(64, 32, 4, 2),
        (256, "float", "long"): KernelConfig(64, 64, 8, 2),
        (256, "fp8", "short"): KernelConfig(64, 64, 4, 2),
        (256, "fp8", "long"): KernelConfig(64, 64, 8, 2),
    },
}


# When the attention kernel quantises its own tiles instead of a separate quantiser launch:
# every program re-quantises the keys it reads, which is free while the grid is a single wave
# (the GPU is underused anyway) and saves two launches. Keyed like TABLES.
FUSED_QUANT: dict[str, dict[str, int]] = {
    # run 16 (GPU time per call, CUDA-graph replay, int8-fp8): fused 9.2 / 24.5 / 106.9 µs against
    # two launches 14.9 / 20.6 / 35.8 µs at Sk 64 / 512 / 1024 — past ~512 keys every program's
    # re-quantisation of all of K and V costs more than the second launch.
    "sm90": {"max_programs": 132, "max_sk": 512},
}
FUSED_QUANT_DEFAULT = {"max_programs": 64, "max_sk": 512}


def fused_quant_limits(device: torch.device) -> dict[str, int]:
    """Limits under which ``use_fused_quant`` picks the one-launch mode on this GPU."""
    return FUSED_QUANT.get(gpu_key(device), FUSED_QUANT_DEFAULT)


def gpu_key(device: torch.device | None = None) -> str:
    """"sm90" style key of the current CUDA device ("cpu" without one)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return _cuda_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_key(index: int) -> str:
    # cached: get_device_capability costs several µs, and small calls look this up every time
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def user_table_path(device: torch.device) -> Path:
    """Where ``qflash tune`` writes the table for this GPU model (override: QFLASH_TUNE_DIR)."""
    root = Path(os.environ.get("QFLASH_TUNE_DIR", Path.home() / ".cache" / "qflash" / "tuning"))
    name = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    return root / f"{name}.json"


@functools.lru_cache(maxsize=8)
def load_user_table(path: str) -> dict[tuple[int, str, str], KernelConfig]:
    """Rows written by ``qflash tune``: {"128|fp8|long": {"block_m": .., ...}, ...}."""
    p = Path(path)
    if not p.is_file():
        return {}
    raw = json.loads(p.read_text())
    rows = {}
    for key, val in raw.get("configs", {}).items():
        d, pv, bucket = key.split("|")
        rows[(int(d), pv, bucket)] = KernelConfig(**val)
    return rows


def config_key(head_dim: int, pv_fp8: bool, sq: int, sk: int, qk_quant: bool = True) -> tuple[int, str, str]:
    d = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    bucket = "short" if sq * sk <= 1024 * 1024 else "long"
    return d, "fp8" if pv_fp8 else "float" if qk_quant else "exact", bucket


def pick_config(device: torch.device, head_dim: int, pv_fp8: bool, sq: int, sk: int,
                qk_quant: bool = True) -> KernelConfig:
    """The tuned config for this GPU and problem: ``qflash tune``'s table, the built-in one, or ``DEFAULT``."""
    return _pick(device.type, device.index, *config_key(head_dim, pv_fp8, sq, sk, qk_quant))


@functools.lru_cache(maxsize=256)
def _pick(dev_type: str, dev_index: int | None, d: int, pv: str, bucket: str) -> KernelConfig:
    device = torch.device(dev_type, dev_index) if dev_index is not None else torch.device(dev_type)
    keys = [(d, pv, bucket)] + ([(d, "float", bucket)] if pv == "exact" else [])
    tables = [TABLES.get(gpu_key(device), {})]
    if device.type == "cuda":
        tables.insert(0, load_user_table(str(user_table_path(device))))
    for key in keys:
        for table in tables:
            if key in table:
                return table[key]
    return DEFAULT


def config_to_json(rows: dict[tuple[int, str, str], KernelConfig]) -> dict:
    return {"configs": {f"{d}|{pv}|{b}": asdict(c) for (d, pv, b), c in rows.items()}}
