"""Every tuning number of the portable family, per GPU: forward tiles, backward tiles, fused-quant
limits and the shared-memory stage caps of fp32 tiles.

Data, not logic: ``TABLES`` maps a GPU ("sm90") to forward rows keyed on (head-dim bucket, P·V
kind, sequence bucket); ``BWD_TABLES`` to backward tiles per head-dim bucket; ``FUSED_QUANT`` to
the one-launch limits; ``FP32_STAGE_CAPS`` to the pipeline depth fp32 tiles fit in.
``pick_config`` / ``pick_bwd_config`` look up the current GPU (a ``qflash tune`` file first, then
the built-in table, then the defaults); launchers accept an explicit config so tests are
deterministic. Lookups are cached in plain dicts and ``reload()`` forgets them, so a tuning file
written in this process (``qflash tune`` calls ``reload``) is used by the next call.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "BWD_TABLES", "BwdConfig", "DEFAULT", "FP32_STAGE_CAPS", "FUSED_QUANT", "KernelConfig", "TABLES", "describe",
    "FLOAT_PV_MAX_WORK", "INT4_UNPACKED", "float_pv_max_work", "fused_tiles", "int4_packed_codes",
    "gpu_key", "load_user_table", "pick_bwd_config", "pick_config", "reload", "user_table_path",
]


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
    # H200 (session 5, modes.py: CUDA-graph µs, fused / separate quantiser, split-key on): with
    # FP8 P·V the one-launch mode loses past ~128 keys (1x24x256x128 int8-fp8 32.2 / 22.1,
    # 512²x64 18.5 / 15.8; 64² 9.8 / 12.1, 8x16x77x64 13.8 / 19.6); int8 ties at 256-512 keys
    # and wins below (8x16x77x64 10.1 / 14.6, 256 programs of 64 rows); int4's separate path adds
    # torch ops for Q smoothing, so its one-launch mode wins up to 1024 keys (1024²x128 31.7 / 46.3)
    # H200 (session 9, benchmarks/small_modes.py, h200-small-modes-2026-12-02.json): the split
    # one-launch mode (statistics per split) at one or two 128-key tiles per program beats the
    # separate quantiser for every preset at the six small shapes (1024²x128 int8 / int8-fp8 / int4
    # 18.0 / 20.9 / 21.0 µs against 20.2 / 25.3 / 27.1; 1x8x1:4096x128 18.5 / 20.8 / 22.9 against
    # 26.8 / 32.3 / 36.9); unsplit, 512 keys per program lose (512²x64 20.0 / 22.0 / 22.0 against
    # 12.5 / 15.4 / 16.7) and 256 tie or win (1x24x256x128 16.9 / 20.5 / 20.6 against
    # 16.6 / 22.1 / 25.8). The limits count keys per program (per split when split).
    # H200 (session 10, small_modes.py call E, the separate quantiser now taking its own statistics
    # with Q/K/V on a role axis): head dims > 64 with more than 64 query tiles of 64 rows go to
    # the separate quantiser ("max_programs_wide"): 1x24x256x128 int8 / int8-fp8 / fp8 / int4 14.1 /
    # 17.2 / 16.8 / 22.6 µs against the one-launch mode's 16.4 / 20.9 / 19.7 / 24.1; with 16 tiles
    # (1024²x128) the one-launch mode still wins (17.6 / 20.3 against 19.5 / 21.9), and at D64 too
    # (8x16x77x64, 128 tiles: 8.8 / 11.5 / 10.8 / 9.6 against 12.0 / 14.6 / 14.4 / 16.9).
    "sm90": {"max_programs": 256, "max_programs_wide": 64, "max_sk": 256, "max_sk_fp8_pv": 256,
             "max_sk_smooth_q": 256},
}
FUSED_QUANT_DEFAULT = {"max_programs": 64, "max_sk": 512, "max_sk_fp8_pv": 512, "max_sk_smooth_q": 512}

#: The separate quantiser takes the K/V statistics itself (no statistics launch before it) up to
#: this many keys: each of its K (V) programs reads all of its head's keys for the K mean (V's
#: channel maxima), two 64-key tiles per step. Predicted from the launch costs (session 9, H200:
#: statistics launch 5.0 µs at 1x24x256x128, against one program's read of 256 keys, ~1-2 µs).
QUANT_SELF_STATS_MAX_SK = 512


def fused_tiles(device: torch.device, head_dim: int, programs: int, sq: int) -> tuple[int, int] | None:
    """(BLOCK_M, num_warps) of the one-launch mode on this GPU (None: keep the picked config).

    ``programs``: query-tile programs at 64 rows each (before any key split); ``sq`` queries.
    The one-launch tiles hold fp32 copies of the K/V tiles they quantise: at 4 warps, D128 spills
    ~1.9 KB per thread (sm_90a, int8; 3.6 KB int8-fp8), at 8 warps ~0-1.3 KB. Measured (H200,
    session 9, GPU µs at 4 warps × 64 rows / 8 × 64 / 8 × 32): D128 8 warps at every shape
    (1024²x128 int8-fp8 30.7 / 20.9 / 28.7), 32 rows for a few queries (1x8x1:4096 int8-fp8
    split 256: 34.9 / 24.0 / 20.8); D64 with few programs 8 × 32 (64² int8-fp8 9.9 / 9.8 / 8.2,
    512²x64 12.5 / 11.8 / 10.9); with many, one 128-row tile per head where it holds every query
    (8x16x77x64 int8 / int8-fp8 / int4 at 8 × 128: 8.5 / 10.8 / 9.5, against 10.0 / 13.0 / 12.6 at
    4 × 64: each head's keys quantised once, not once per 64 queries), else 4 × 64 (8x16x77x64
    int8-fp8 4 × 64 13.0, 8 × 64 19.3, 8 × 32 22.4). D128 at 128 rows lost (1x24x256x128 int8
    18.0 against 16.2 at 8 × 64).
    """
    if gpu_key(device) != "sm90":
        return None
    if head_dim <= 64:
        return (32, 8) if programs <= 64 else (128, 8) if sq <= 128 else (64, 4)
    return (32 if sq <= 32 else 64), 8


#: Small calls of the FP8 P·V presets keep P·V in the input dtype (``launch.call_quant``): at or
#: below this many multiply-adds per matmul (B·Hq·Sq·Sk·D) the call is a few dependent chains of
#: latency, not tensor-core throughput, and quantising V (its channel maxima, the FP8 codes, Vᵀ
#: through shared memory) only lengthens them. H200 (session 11 call A, CUDA-graph GPU µs, int8
#: against int8-fp8, which differ there only by FP8 P·V): 64² 5.6 / 7.1, 512²x64 10.2 / 11.9,
#: 1024²x128 17.5 / 20.5, 1x24x256x128 13.9 / 16.9, 8x16x77x64 8.6 / 11.4, 1x8x1:4096x128
#: 18.6 / 22.3. The largest of those is 2^27.6 MACs; the crossover above it is not measured.
FLOAT_PV_MAX_WORK: dict[str, int] = {"sm90": 2**28}


def float_pv_max_work(device: torch.device) -> int | None:
    """``FLOAT_PV_MAX_WORK`` for this GPU (None: FP8 P·V presets always quantise P·V)."""
    return FLOAT_PV_MAX_WORK.get(gpu_key(device))


#: GPUs on which the separate quantiser writes INT4 codes one per byte (int8 values in [-7, 7])
#: instead of two per byte: with no INT4 tensor-core MMA (sm_90) the attention kernel multiplies
#: INT4 codes in INT8 MMAs anyway, and unpacking every K tile (shifts, a join and a relayout)
#: costs more than the bytes packing saves. Measured: see docs/perf/NOTES.md, session 11.
INT4_UNPACKED: set[str] = {"sm90"}


def int4_packed_codes(device: torch.device) -> bool:
    """Whether the separate quantiser packs INT4 codes two per byte on this device (the CPU: yes)."""
    return gpu_key(device) not in INT4_UNPACKED


#: Split-key mode (``launch.pick_split_keys``): used only below this many keys per head or above
#: ``min_sk``; at most ``max_splits`` splits (the merge kernel reads them all in one tile).
SPLIT_KEYS = {"min_sk": 256, "max_splits": 64}


def split_limits(device: torch.device) -> dict[str, int]:
    """The split-key mode's limits (``SPLIT_KEYS``; one table for every GPU so far)."""
    return SPLIT_KEYS


def fused_quant_limits(device: torch.device) -> dict[str, int]:
    """Limits under which ``use_fused_quant`` picks the one-launch mode on this GPU."""
    return FUSED_QUANT.get(gpu_key(device), FUSED_QUANT_DEFAULT)


def gpu_key(device: torch.device | None = None) -> str:
    """"sm90" style key of the current CUDA device ("cpu" without one)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return _cuda_key(device.index if device.index is not None else torch.cuda.current_device())


_GPU_KEYS: dict[int, str] = {}


def _cuda_key(index: int) -> str:
    # cached: get_device_capability costs several µs, and small calls look this up every time
    key = _GPU_KEYS.get(index)
    if key is None:
        major, minor = torch.cuda.get_device_capability(index)
        key = _GPU_KEYS[index] = f"sm{major}{minor}"
    return key


def user_table_path(device: torch.device) -> Path:
    """Where ``qflash tune`` writes the table for this GPU model (override: QFLASH_TUNE_DIR)."""
    root = Path(os.environ.get("QFLASH_TUNE_DIR", Path.home() / ".cache" / "qflash" / "tuning"))
    name = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    return root / f"{name}.json"


_USER_TABLES: dict[str, tuple[dict, dict]] = {}  # path -> (forward rows, backward rows)
_PICKS: dict[tuple, KernelConfig] = {}


def reload() -> None:
    """Forget every cached lookup: the next call re-reads the tuning files (``qflash tune`` calls this)."""
    _USER_TABLES.clear()
    _PICKS.clear()
    _BWD_PICKS.clear()
    from ..fastlaunch import forget_plans

    forget_plans()  # recorded calls hold the tiles picked before


def _user_tables(path: str) -> tuple[dict, dict]:
    tables = _USER_TABLES.get(path)
    if tables is None:
        fwd, bwd = {}, {}
        p = Path(path)
        if p.is_file():
            raw = json.loads(p.read_text())
            for key, val in raw.get("configs", {}).items():
                d, pv, bucket = key.split("|")
                fwd[(int(d), pv, bucket)] = KernelConfig(**val)
            for key, val in raw.get("bwd_configs", {}).items():
                bwd[int(key)] = BwdConfig(**val)
        tables = _USER_TABLES[path] = (fwd, bwd)
    return tables


def load_user_table(path: str) -> dict[tuple[int, str, str], KernelConfig]:
    """Forward rows written by ``qflash tune``: {"128|fp8|long": {"block_m": .., ...}, ...}."""
    return _user_tables(str(path))[0]


def config_key(head_dim: int, pv_fp8: bool, sq: int, sk: int, qk_quant: bool = True) -> tuple[int, str, str]:
    d = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    bucket = "short" if sq * sk <= 1024 * 1024 else "long"
    return d, "fp8" if pv_fp8 else "float" if qk_quant else "exact", bucket


def pick_config(device: torch.device, head_dim: int, pv_fp8: bool, sq: int, sk: int,
                qk_quant: bool = True) -> KernelConfig:
    """The tuned config for this GPU and problem: ``qflash tune``'s table, the built-in one, or ``DEFAULT``."""
    key = (device.type, device.index, *config_key(head_dim, pv_fp8, sq, sk, qk_quant))
    kc = _PICKS.get(key)
    if kc is None:
        kc = _PICKS[key] = _pick(device, *key[2:])
    return kc


def _pick(device: torch.device, d: int, pv: str, bucket: str) -> KernelConfig:
    keys = [(d, pv, bucket)] + ([(d, "float", bucket)] if pv == "exact" else [])
    tables = [TABLES.get(gpu_key(device), {})]
    if device.type == "cuda" and torch.cuda.is_available():
        tables.insert(0, _user_tables(str(user_table_path(device)))[0])
    for key in keys:
        for table in tables:
            if key in table:
                return table[key]
    return DEFAULT


def config_to_json(rows: dict[tuple[int, str, str], KernelConfig],
                   bwd_rows: dict[int, BwdConfig] | None = None) -> dict:
    doc = {"configs": {f"{d}|{pv}|{b}": asdict(c) for (d, pv, b), c in rows.items()}}
    if bwd_rows:
        doc["bwd_configs"] = {str(d): asdict(c) for d, c in bwd_rows.items()}
    return doc


# --------------------------------------------------------------------------------------------
# backward tiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BwdConfig:
    """Tile sizes of the two main backward kernels.

    dK/dV kernel: ``block_n1`` keys per program (rows kept in registers), ``block_m1`` queries per
    loop step. dQ kernel: ``block_m2`` queries per program, ``block_n2`` keys per step.
    """

    block_m1: int = 32
    block_n1: int = 64
    block_m2: int = 64
    block_n2: int = 32
    num_warps1: int = 4
    num_stages1: int = 2
    num_warps2: int = 4
    num_stages2: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m1", "block_n1", "block_m2", "block_n2"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        for name in ("num_warps1", "num_warps2"):
            if getattr(self, name) not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name} must be 1, 2, 4, 8 or 16, got {getattr(self, name)}")
        for name in ("num_stages1", "num_stages2"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# Starting points for Hopper (FlashAttention-2 Triton tutorial's shapes of tiles); benchmarks/
# bwd_bench.py sweeps candidates and prints the best — tune here from its output.
# GPUs without a row in BWD_TABLES use DEFAULT_BWD (the sm90 tiles).
DEFAULT_BWD: dict[int, BwdConfig] = {
    64: BwdConfig(32, 128, 128, 32, 4, 4, 4, 4),
    128: BwdConfig(64, 128, 128, 64, 8, 3, 8, 3),  # bwd_bench.py sweep, H100 run 14: 1.861 ms at Flux
    256: BwdConfig(32, 64, 64, 32, 4, 1, 4, 1),
}
BWD_TABLES: dict[str, dict[int, BwdConfig]] = {"sm90": DEFAULT_BWD}
_CPU_DEFAULT = BwdConfig(64, 64, 64, 64, 4, 1, 4, 1)  # the interpreter: fewer, larger tiles are cheapest

# fp32 tiles double every tile's shared memory: the pipeline stages they fit in on sm_90 (227 KB)
# per head-dim bucket, from compiling for sm_90a (benchmarks/sm90_compile_check.py). Forward: one
# stage above D128. Backward: 2 stages at D128 (230 KB), 1 at D256 (3 would need 296 KB).
FP32_STAGE_CAPS: dict[str, dict[int, int]] = {"fwd": {256: 1}, "bwd": {128: 2, 256: 1}}
_BWD_PICKS: dict[tuple, BwdConfig] = {}


def pick_bwd_config(device: torch.device, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> BwdConfig:
    """Tiles for the backward kernels. fp32 inputs double every tile's shared memory: the tuned
    3-stage D128 tiles would need 296 KB (sm_90 has 227 KB), so fp32 uses 2 stages there (230 KB)
    and 1 stage at D256 (sizes from compiling for sm_90a)."""
    if device.type != "cuda":
        return _CPU_DEFAULT
    d = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    key = (device.index, d, dtype)
    kc = _BWD_PICKS.get(key)
    if kc is None:
        user = _user_tables(str(user_table_path(device)))[1] if torch.cuda.is_available() else {}
        kc = user.get(d) or BWD_TABLES.get(gpu_key(device), DEFAULT_BWD)[d]
        stages = FP32_STAGE_CAPS["bwd"].get(d) if dtype == torch.float32 else None
        if stages is not None:
            kc = dataclasses.replace(kc, num_stages1=min(kc.num_stages1, stages), num_stages2=min(kc.num_stages2, stages))
        _BWD_PICKS[key] = kc
    return kc


def describe(device: torch.device) -> str:
    """Which tables ``pick_config`` / ``pick_bwd_config`` use on ``device`` (for ``qflash info``)."""
    if device.type != "cuda":
        return "CPU interpreter defaults"
    path = user_table_path(device)
    if path.is_file():
        return f"{path} (from qflash tune)"
    key = gpu_key(device)
    return f"built-in {key} table" if key in TABLES else f"built-in defaults (no {key} table; run qflash tune)"

