"""Tuning data of the portable family: a written tuning file is used in the same process after
``reload()`` (no lru_cache hiding it), backward rows included; the dispatcher's declared support."""

from __future__ import annotations

import json

import torch

import qflash

from qflash.kernels.portable import tuning


def test_user_table_reload(tmp_path):
    path = tmp_path / "gpu.json"
    rows = {(128, "fp8", "long"): tuning.KernelConfig(64, 128, 8, 2)}
    bwd = {128: tuning.BwdConfig(32, 64, 64, 32, 4, 2, 4, 2)}
    path.write_text(json.dumps(tuning.config_to_json(rows, bwd)))
    tuning.reload()
    assert tuning.load_user_table(str(path)) == rows
    assert tuning._user_tables(str(path))[1] == bwd
    rows2 = {(64, "float", "short"): tuning.KernelConfig(32, 32, 4, 1)}
    path.write_text(json.dumps(tuning.config_to_json(rows2)))
    assert tuning.load_user_table(str(path)) == rows  # cached until reload
    tuning.reload()
    assert tuning.load_user_table(str(path)) == rows2
    assert tuning._user_tables(str(path))[1] == {}


def test_tables_are_per_gpu_data():
    for table in (tuning.TABLES, tuning.BWD_TABLES, tuning.FUSED_QUANT):
        assert "sm90" in table
    assert tuning.pick_config(torch.device("cpu"), 128, True, 4608, 4608) == tuning.DEFAULT
    assert tuning.pick_bwd_config(torch.device("cpu"), 128) == tuning._CPU_DEFAULT


def test_dispatch_auto_never_raises_and_names_force():
    import pytest

    from qflash.config import PRESETS
    from qflash.kernels import dispatch
    from qflash.spec import AttnSpec

    q = torch.randn(1, 2, 8, 300)  # head dim no kernel family runs
    assert dispatch.select(AttnSpec.build("int8"), q, q, q, None) is dispatch.REFERENCE
    with pytest.raises(NotImplementedError, match="hopper"):
        dispatch.select(AttnSpec.build("int8", backend="hopper"), q, q, q, None)
    rows = dispatch.explain(AttnSpec.build(PRESETS["fp8"]), q, q, q)
    assert [r[0] for r in rows] == ["hopper", "portable", "reference"] and rows[-1][1]


def test_one_launch_policy_wide_heads(monkeypatch):
    """sm90: head dims > 64 with more than 64 query tiles of 64 rows take the separate quantiser
    (measured in ``tuning.FUSED_QUANT``: 1x24x256x128, 96 tiles); fewer tiles, or D64, keep the
    one-launch mode. Keys per program past the limit leave it as before."""
    from qflash.kernels.portable import launch

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "gpu_key", lambda device=None: "sm90")
    monkeypatch.setattr(launch, "_SM_COUNT", {0: 132})
    for preset in ("int8", "int8-fp8", "fp8", "int4"):
        cfg = qflash.resolve_quant(preset)
        assert not launch.use_fused_quant(cuda, cfg, 24, 256, 256, 64, None, 64, head_dim=128)  # 96 tiles
        assert launch.use_fused_quant(cuda, cfg, 24, 256, 256, 64, None, 64, head_dim=64)
        assert launch.use_fused_quant(cuda, cfg, 1, 1024, 1024, 64, None, 64, head_dim=128)  # 16 tiles, split
        assert launch.use_fused_quant(cuda, cfg, 128, 77, 77, 64, None, 64, head_dim=64)  # 8x16x77x64
        assert launch.use_fused_quant(cuda, cfg, 8, 1, 4096, 64, None, 64, head_dim=128)  # one query, split
        assert not launch.use_fused_quant(cuda, cfg, 1, 4096, 4096, 64, 0, 64, head_dim=128)  # unsplit 4096 keys


def test_fused_tiles_policy(monkeypatch):
    """The one-launch mode's (rows, warps) on sm90 (measured in ``fused_tiles``' docstring): 8 warps
    at D128, 32 rows for a few queries; at D64 8 warps × 32 rows for a few programs; for many, 8 ×
    128 when one tile holds a head's queries, else 4 × 64. Other GPUs keep the picked config."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "gpu_key", lambda device=None: "sm90")
    assert tuning.fused_tiles(cuda, 128, 16, 1024) == (64, 8)
    assert tuning.fused_tiles(cuda, 128, 8, 1) == (32, 8)
    assert tuning.fused_tiles(cuda, 64, 1, 64) == (32, 8)
    assert tuning.fused_tiles(cuda, 64, 256, 77) == (128, 8)  # one tile per head holds all 77 queries
    assert tuning.fused_tiles(cuda, 64, 256, 300) == (64, 4)
    monkeypatch.setattr(tuning, "gpu_key", lambda device=None: "sm80")
    assert tuning.fused_tiles(cuda, 128, 16, 1024) is None
