"""`qflash bench`, `report`, `tune` and the CLI's argument handling (CPU, fast).

One `qflash bench --quick` run in-process (module fixture) is checked for every output format,
the documented JSON schema, every preset and values that can fail; one more runs through a
subprocess (`python -m qflash.cli`). Bad arguments must be usage errors (exit 2), not tracebacks.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from qflash.bench import schema
from qflash.bench.shapes import parse_shape
from qflash.cli import main
from qflash.config import PRESETS

HAS_CUDA = torch.cuda.is_available()


def run_main(argv):
    """main(argv) with stdout captured: (exit code, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc, text = run_main(["bench", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    return rc, text, out, json.loads((out / "bench.json").read_text())


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG after checking its signature, IHDR and that IDAT inflates."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(data[pos + 4:pos + 8 + n]) & 0xFFFFFFFF == crc
        if tag == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    assert zlib.decompress(idat), "empty image data"
    return w, h


def test_bench_exit_code_and_first_line(bench_run):
    rc, text, _, _ = bench_run
    assert rc == 0, text
    first = text.splitlines()[0]
    assert first.startswith("qflash bench:")
    assert "CPU reference run" in first and "not kernel timings" in first


def test_bench_writes_every_format(bench_run):
    _, _, out, doc = bench_run
    for name in ("bench.json", "bench.csv", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    w, h = png_size((out / "bench.png").read_bytes())
    assert w >= 200 and h >= 200
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert len(rows) == len(doc["rows"])
    assert set(schema.BENCH_ROW_KEYS) <= set(rows[0])
    md = (out / "bench.md").read_text()
    assert "| implementation |" in md and "not kernel timings" in md


def test_bench_lists_a_baseline_skipped_everywhere_once(bench_run):
    """A baseline skipped on every shape for one reason (on a CPU: the CUDA-only SDPA backends) is listed once,
    not once per shape (issue 14)."""
    _, text, out, doc = bench_run
    notes = {}
    for r in doc["rows"]:
        notes.setdefault(r["impl"], set()).add(r["note"] if r["status"] == "skipped" else None)
    everywhere = {impl: n.pop() for impl, n in notes.items() if len(n) == 1 and None not in n}
    if not HAS_CUDA:
        assert everywhere, "a CPU run skips the CUDA-only SDPA backends"
    md = (out / "bench.md").read_text()
    for impl, note in everywhere.items():
        for doc_text in (text, md):
            assert doc_text.count(note) == 1, (impl, note)
            assert sum(impl in ln for ln in doc_text.splitlines() if ln.startswith("- ")) == 1


def test_bench_json_schema(bench_run):
    _, _, _, doc = bench_run
    assert doc["schema_version"] == schema.SCHEMA_VERSION == 1
    assert doc["kind"] == "bench"
    assert tuple(doc) == schema.BENCH_KEYS
    assert tuple(doc["env"]) == schema.ENV_KEYS
    assert tuple(doc["settings"]) == schema.BENCH_SETTINGS_KEYS
    assert doc["command"].startswith("qflash bench --quick")
    for s in doc["shapes"]:
        assert tuple(s) == schema.BENCH_SHAPE_KEYS
        assert set(s["reference"]) == {"method", "heads", "device"}
    for r in doc["rows"]:
        assert tuple(r) == schema.BENCH_ROW_KEYS
    assert doc["settings"]["cpu_reference_run"] is True
    assert doc["env"]["torch"] == torch.__version__


def test_bench_every_preset_and_baseline_appears(bench_run):
    _, _, _, doc = bench_run
    shapes = [s["name"] for s in doc["shapes"]]
    assert len(shapes) >= 2 and any(s["causal"] for s in doc["shapes"])
    for shape in shapes:
        got = {r["impl"]: r for r in doc["rows"] if r["shape"] == shape}
        for p in PRESETS:
            assert got[f"qflash {p}"]["status"] == "ok", got[f"qflash {p}"]["note"]
            assert got[f"qflash {p}"]["preset"] == p
        assert got["sdpa"]["status"] == "ok"
        assert got["sdpa"]["speedup_vs_sdpa"] == pytest.approx(1.0)
        for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            assert f"sdpa {b}" in got  # measured, or skipped with a reason
            assert got[f"sdpa {b}"]["status"] == "ok" or got[f"sdpa {b}"]["note"]
        assert got["sdpa MATH"]["status"] == "ok"


def test_bench_values(bench_run):
    _, _, _, doc = bench_run
    budget = {"none": 0.01, "int8": 0.02, "int8-fp8": 0.06, "fp8": 0.08, "int4": 0.25}
    by = {(r["shape"], r["impl"]): r for r in doc["rows"]}
    for s in doc["shapes"]:
        assert s["ops"] == pytest.approx(4 * s["batch"] * s["heads"] * s["seq_q"] * s["seq_k"] * s["head_dim"]
                                         / (2 if s["causal"] else 1))
        for p, tol in budget.items():
            r = by[(s["name"], f"qflash {p}")]
            assert 0 <= r["rel_l2"] < tol, (p, r["rel_l2"])
            assert r["cosine"] > 1 - tol
            assert r["median_ms"] > 0 and r["mean_ms"] > 0
            assert r["tops"] == pytest.approx(s["ops"] / (r["median_ms"] * 1e-3) / 1e12)
        # SDPA in bf16 and qflash "none" see the same exact reference: same error class
        assert by[(s["name"], "sdpa")]["rel_l2"] < 0.01
    assert all(r["speedup_vs_sdpa"] > 0 for r in doc["rows"] if r["status"] == "ok")


def test_bench_subprocess_and_shapes_flag(tmp_path):
    res = subprocess.run([sys.executable, "-m", "qflash.cli", "bench", "--quick", "--shapes", "1x2x96x32c",
                          "--presets", "none,int8", "--out", str(tmp_path), "--no-progress", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("qflash bench:")
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert [s["name"] for s in doc["shapes"]] == ["1x2x96x32c"] and doc["shapes"][0]["causal"]
    assert {r["preset"] for r in doc["rows"] if r["kind"] == "qflash"} == {"none", "int8"}
    png_size((tmp_path / "bench.png").read_bytes())


BAD_ARGS = [
    pytest.param(["bench", "--shapes", "1x2x3"], id="shape-3-dims"),
    pytest.param(["bench", "--shapes", "1x0x64x64"], id="shape-zero"),
    pytest.param(["bench", "--shapes", ","], id="shape-empty"),
    pytest.param(["bench", "--presets", "int9"], id="preset-unknown"),
    pytest.param(["bench", "--warmup", "-1"], id="warmup-negative"),
    pytest.param(["bench", "--device", "tpu"], id="device-unknown"),
    pytest.param(["bench", "--ref-heads", "x"], id="ref-heads-nan"),
    pytest.param(["bench", "--bogus"], id="unknown-flag"),
    pytest.param(["accuracy", "--presets", ""], id="accuracy-empty-presets"),
    pytest.param(["report"], id="report-missing-from"),
    pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param([], id="no-command"),
]


@pytest.mark.parametrize("argv", BAD_ARGS)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_bad_out_and_missing_json_are_usage_errors(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--out", str(f), "--device", "cpu"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["report", "--from", str(tmp_path / "missing.json")])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message")
def test_device_cuda_without_gpu_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bad_arguments_subprocess_no_traceback():
    res = subprocess.run([sys.executable, "-m", "qflash.cli", "bench", "--shapes", "banana"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "usage:" in res.stderr and "Traceback" not in res.stderr
    assert "BxHxSxD" in res.stderr


def test_parse_shape():
    s = parse_shape("1x24x4608x128c")
    assert (s.batch, s.heads, s.seq, s.head_dim, s.causal) == (1, 24, 4608, 128, True)
    assert s.spec == "1x24x4608x128c"
    assert s.ops == 2 * 24 * 4608 * 4608 * 128


def test_report_from_bench(bench_run, tmp_path):
    _, _, out, _ = bench_run
    target = tmp_path / "docs" / "PERFORMANCE.md"
    rc, _ = run_main(["report", "--from", str(out / "bench.json"), "--out", str(target)])
    assert rc == 0 and target.is_file()
    md = target.read_text()
    for heading in ("## Test Environment", "## Micro-benchmarks", "## Accuracy & Stability",
                    "End-to-End Flux", "CPU reference timings", "qflash bench --quick"):
        assert heading in md
    assert "not measured in this snapshot" in md.lower()  # no --flux given
    for p in PRESETS:
        assert f"qflash {p}" in md


def test_report_from_several_runs(bench_run, tmp_path):
    """Two bench JSONs (say, large and small shapes run apart): one environment and one table per
    run, each titled with its command, and both commands under Reproducing."""
    _, _, out, doc = bench_run
    second = json.loads(json.dumps(doc))
    second["command"] = "qflash bench --shapes 1x1x64x64 (second run)"
    second["rows"] = [dict(r, median_ms=12345.0) if r["status"] == "ok" else r for r in second["rows"]]
    (tmp_path / "b2.json").write_text(json.dumps(second))
    target = tmp_path / "r.md"
    rc, _ = run_main(["report", "--from", str(out / "bench.json"), "--from", str(tmp_path / "b2.json"),
                      "--out", str(target)])
    md = target.read_text()
    assert rc == 0
    assert md.count("### Run 1:") == 2 and md.count("### Run 2:") == 2  # environment and micro-benchmarks
    assert "(second run)" in md.split("## Reproducing")[1] and doc["command"] in md.split("## Reproducing")[1]
    micro = md.split("## Micro-benchmarks")[1].split("## Accuracy")[0]
    run1, run2 = micro.split("### Run 2:")
    assert "12345" not in run1 and "12345" in run2  # each table holds its own run's numbers


def test_report_with_flux_and_appendix(bench_run, tmp_path):
    """--flux renders one row per resolution and mode; --append lands at the end."""
    import json

    _, _, out, _ = bench_run
    flux = {"command": "python examples/flux/run.py", "config_name": "dev", "dtype": "bf16", "timer": "events",
            "timed_forwards": 3, "warmup": 1, "env": {"gpu_name": "GPU"}, "banner": "random weights",
            "resolutions": [{"resolution": 1024, "rows": [
                {"mode": "sdpa", "status": "ok", "median_ms": 180.3, "speedup": 1.0, "peak_gib": 22.7,
                 "out_cosine": 1.0, "attn_cos_min": 1.0},
                {"mode": "int8-fp8", "status": "ok", "median_ms": 170.0, "speedup": 1.06, "peak_gib": 22.8,
                 "out_cosine": 0.99998, "attn_cos_min": 0.9999}]}],
            "table": "pre-attention RMSNorm+RoPE of q,k per forward at 1024px: saves 47 ms"}
    (tmp_path / "flux.json").write_text(json.dumps(flux))
    (tmp_path / "extra.md").write_text("## Backward and training\n\nrows\n")
    target = tmp_path / "P.md"
    rc, _ = run_main(["report", "--from", str(out / "bench.json"), "--flux", str(tmp_path / "flux.json"),
                      "--append", str(tmp_path / "extra.md"), "--out", str(target)])
    md = target.read_text()
    assert rc == 0
    assert "| 1024px | int8-fp8 | 170.0 | 1.060× |" in md
    assert "saves 47 ms" in md
    assert md.rstrip().endswith("rows")
    assert "pass `--flux`" not in md


def test_report_default_out_is_next_to_the_json(bench_run, tmp_path, monkeypatch):
    """Without --out the report lands next to its bench JSON, never in ./docs/PERFORMANCE.md;
    --out - prints it."""
    _, _, out, doc = bench_run
    src = tmp_path / "run" / "bench.json"
    src.parent.mkdir()
    src.write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    rc, text = run_main(["report", "--from", str(src)])
    assert rc == 0
    assert not (tmp_path / "docs").exists()
    target = tmp_path / "run" / "bench.report.md"
    assert target.is_file() and str(target) in text
    rc, text = run_main(["report", "--from", str(src), "--out", "-"])
    assert rc == 0 and text.startswith("# qflash") and "## Micro-benchmarks" in text
    assert sorted(p.name for p in tmp_path.rglob("*.md")) == ["bench.report.md"]


def test_report_states_measurements_only(bench_run, tmp_path):
    """No roadmap prose in a generated report: no plans, design anchors, seed comparisons, open items,
    nor the working tree's state."""
    _, _, out, doc = bench_run
    doc = json.loads(json.dumps(doc))
    doc["env"]["git_dirty"] = True
    (tmp_path / "b.json").write_text(json.dumps(doc))
    rc, _ = run_main(["report", "--from", str(tmp_path / "b.json"), "--out", str(tmp_path / "r.md")])
    md = (tmp_path / "r.md").read_text()
    assert rc == 0
    for phrase in ("will be replaced", "anchor", "seed's", "seed INT4", "uncommitted", "Open Items",
                   "still to be measured", "needed"):
        assert phrase not in md, phrase


def test_report_rejects_wrong_kind(bench_run, tmp_path):
    _, _, out, _ = bench_run
    with pytest.raises(SystemExit) as exc:
        main(["report", "--from", str(out / "bench.json"), "--accuracy", str(out / "bench.json"),
              "--out", str(tmp_path / "x.md")])
    assert exc.value.code == 2


def test_bench_says_when_the_plot_has_no_labels(tmp_path, monkeypatch):
    """Without matplotlib bench.png is the unlabelled fallback, and `qflash bench` says so and how to get
    the labelled one (issue 14)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rc, text = run_main(["bench", "--quick", "--shapes", "1x1x64x64", "--presets", "none", "--out", str(tmp_path),
                         "--no-progress", "--device", "cpu"])
    assert rc == 0
    note = [ln for ln in text.splitlines() if "bench.png" in ln and "matplotlib" in ln]
    assert note and "no axes, labels or legend" in note[0] and "pip install matplotlib" in note[0]
    assert png_size((tmp_path / "bench.png").read_bytes()) == (800, 500)  # the fallback's size


def test_fallback_png_is_valid(bench_run, tmp_path):
    from qflash.bench.plot import _fallback_png

    _, _, _, doc = bench_run
    assert png_size(_fallback_png(doc, tmp_path / "f.png").read_bytes()) == (800, 500)


def test_tune_help_and_no_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0
    assert "tuning table" in capsys.readouterr().out
    if not HAS_CUDA:
        assert main(["tune"]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_info_still_works():
    rc, text = run_main(["info"])
    assert rc == 0 and text.startswith("qflash ")


def test_info_without_interpreter_names_no_tensor(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rc, text = run_main(["info"])
    assert rc == 0
    assert "this tensor" not in text  # no tensor is involved in `qflash info`


def test_import_does_not_load_dynamo():
    """`import qflash` (and so `qflash --help` / `qflash info`) must not import torch._dynamo (~1.5 s of CPU);
    the fallback warning keeps its torch.compile marker without it (issue 14)."""
    res = subprocess.run([sys.executable, "-c", "import sys, qflash; print('torch._dynamo' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    from qflash.dropin import _warn_once

    assert getattr(_warn_once, "_dynamo_marked_constant", False) is True


def test_backend_column_names_the_family_that_runs_the_shape(monkeypatch):
    """A preset the Hopper family takes runs on the portable family below its size threshold; the
    bench row must say so per shape (it said "hopper" for every shape of such a preset)."""
    from qflash.bench import impls
    from qflash.kernels import dispatch
    from qflash.kernels.hopper.family import HopperFamily
    from qflash.kernels.hopper.tuning import SMALL_PROBLEM

    monkeypatch.setattr(dispatch, "select", lambda spec, q, k, v, mask: HopperFamily())
    small = torch.empty((1, 24, 256, 128), device="meta")
    big = torch.empty((1, 24, 4096, 128), device="meta")
    assert 24 * 256 * 256 * 128 <= SMALL_PROBLEM["max_work"] < 24 * 4096 * 4096 * 128
    assert impls.qflash_backend("int8-fp8", small, small, small) == "hopper>portable"
    assert impls.qflash_backend("int8-fp8", big, big, big) == "hopper"
    row_impl = impls._qflash("int8-fp8", torch.device("cpu"))
    assert row_impl.backend_for(small, small, small) == "hopper>portable"


def test_bench_rows_carry_their_own_backend(bench_run):
    rows = bench_run[3]["rows"]
    qrows = [r for r in rows if r["kind"] == "qflash" and r["status"] == "ok"]
    # on the CPU every preset runs on the reference family (the Triton kernels run only when forced)
    assert qrows and all(r["backend"] == "reference" for r in qrows)
