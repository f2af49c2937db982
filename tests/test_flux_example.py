"""examples/flux/run.py and qflash.bench.flux_timing on the CPU: the --tiny random-weights run
end to end, the real-weights path on a tiny saved FluxPipeline, argument errors, PSNR/SSIM, the
image grid, and the fused RMSNorm+RoPE kernel (Triton interpreter) against its references."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from qflash.bench import flux_timing as ft
from qflash.fused.rmsnorm_rope import rmsnorm_rope, rmsnorm_rope_reference, rmsnorm_rope_triton

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "examples" / "flux" / "run.py"
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def run_mod():
    spec = importlib.util.spec_from_file_location("flux_example_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# --tiny end to end
# --------------------------------------------------------------------------------------------


def test_tiny_end_to_end(run_mod, tmp_path, capsys):
    rc = run_mod.main(["--tiny", "--resolution", "1024", "--steps", "2", "--warmup", "1", "--device", "cpu",
                       "--out", str(tmp_path)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "random weights: not an image-quality measurement" in stdout
    if not torch.cuda.is_available():  # CPU speed-ups carry their caveat in the table's head (issue 14)
        assert "CPU run: qflash runs its pure-PyTorch reference path here" in stdout.split("| res ")[0]
    table_lines = [ln for ln in stdout.splitlines() if ln.startswith("| 1024")]
    assert [ln.split("|")[2].strip() for ln in table_lines] == [
        "sdpa", "int8", "int8-fp8", "int4", "sage", "no-attn", "sdpa+fused", "int8-fp8+fused", "int8-fp8+fusedq",
        "sdpa (rerun)"]
    assert stdout.rstrip().splitlines()[-1].startswith("speed-up:")  # the table is the last thing printed

    res = json.loads((tmp_path / "flux_results.json").read_text())
    assert (tmp_path / "flux_table.md").is_file()
    assert res["kind"] == "random" and res["config_name"] == "tiny"
    rows = {r["mode"]: r for r in res["resolutions"][0]["rows"]}
    assert rows["sage"]["status"] == "skipped"
    for name, r in rows.items():
        if name != "sage":
            assert r["status"] == "ok", (name, r.get("reason"))
            assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["speedup"] > 0
    assert rows["sdpa"]["speedup"] == 1.0 and rows["sdpa"]["out_cosine"] == pytest.approx(1.0)
    for name in ("int8", "int8-fp8"):  # the accuracy target, here on the tiny model
        assert rows[name]["out_cosine"] > 0.999
        assert rows[name]["attn_cos_min"] > 0.999  # every attention block's output, not just the final one
    assert rows["int8"]["out_rel_l2"] < rows["int4"]["out_rel_l2"] < rows["no-attn"]["out_rel_l2"]
    assert rows["no-attn"]["attn_cos_min"] == 0.0 and rows["no-attn"]["rel_l2_vs_no_attn"] == pytest.approx(1.0)
    assert rows["sdpa+fused"]["out_rel_l2"] < 1e-5  # fp32: the fused prologue is the same math
    assert rows["int8-fp8+fused"]["out_rel_l2"] == pytest.approx(rows["int8-fp8"]["out_rel_l2"], rel=1e-2, abs=1e-6)
    # issue 16: the fused prologue writing quantised K/V (fp32 CPU: the same numbers as unfused)
    assert rows["int8-fp8+fusedq"]["out_rel_l2"] == pytest.approx(rows["int8-fp8"]["out_rel_l2"], rel=1e-2, abs=1e-6)
    assert rows["int8-fp8+fusedq"]["installed"]["apply_summary"]["flux"] == 2
    assert rows["int8"]["installed"]["how"] == "qflash.integrations.diffusers.apply"
    assert rows["int8"]["installed"]["processors"] == 2
    pro = res["resolutions"][0]["prologue"]
    assert pro["max_abs_diff"] < 1e-4 and pro["unfused_step_ms"] > 0 and pro["fused_step_ms"] > 0
    assert res["env"]["diffusers"] and res["params"] > 0


def test_tiny_breakdown(run_mod, tmp_path, capsys):
    """--breakdown: per-part times per mode; the parts add up and every attention call is counted."""
    rc = run_mod.main(["--tiny", "--resolution", "1024", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--modes", "sdpa", "int8-fp8", "int8-fp8+fusedq", "sdpa+fused", "--no-prologue",
                       "--no-rerun-baseline", "--breakdown", "--out", str(tmp_path)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "Per-part time, ms per forward" in stdout and "| 1024 | int8-fp8+fusedq |" in stdout.split("Per-part")[1]
    rows = {r["mode"]: r for r in json.loads((tmp_path / "flux_results.json").read_text())["resolutions"][0]["rows"]}
    for name, r in rows.items():
        b = r["breakdown"]
        assert b["calls_per_forward"]["attn_module"] == 2 and b["calls_per_forward"]["attention"] == 2, name
        assert b["calls_per_forward"]["prologue"] == (10 if name == "sdpa" else 2), name  # 6 norms + 4 RoPE
        assert 0 < b["prologue_ms"] and 0 < b["attention_ms"] and b["attn_other_ms"] > 0, name
        assert b["outside_attention_ms"] > 0 and b["attn_module_ms"] < b["forward_ms"], name
        assert b["forward_ms"] == pytest.approx(b["outside_attention_ms"] + b["attn_module_ms"])
    assert rows["int8-fp8+fusedq"]["out_rel_l2"] == pytest.approx(rows["int8-fp8"]["out_rel_l2"], rel=1e-2, abs=1e-6)


def test_tiny_as_a_script_writes_to_OUT(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), "--tiny", "--resolution", "2048", "--modes", "int8", "--steps", "1",
         "--warmup", "0", "--no-prologue", "--no-rerun-baseline", "--device", "cpu"],
        check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "adding the baseline mode 'sdpa'" in proc.stderr
    rows = json.loads((tmp_path / "flux_results.json").read_text())["resolutions"][0]["rows"]
    assert [r["mode"] for r in rows] == ["sdpa", "int8"]
    assert rows[1]["out_cosine"] > 0.999
    assert "| 2048 | int8" in proc.stdout


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiny", "--resolution", "1000"], "multiple of 128"),
        (["--resolution", "1000"], "multiple of 16"),
        (["--resolution", "abc"], "positive integer"),
        (["--resolution", "0"], "positive integer"),
        (["--modes", "int9"], "expected one of"),
        (["--modes", "int8+fast"], "+fused"),
        (["--modes", "no-attn+fused"], "ceiling"),
        (["--steps", "0"], "positive integer"),
        (["--warmup", "-1"], "integer >= 0"),
        (["--weights", "bogus"], "invalid choice"),
        (["--tiny", "--weights", "real"], "--tiny"),
        (["--model-path", "/nonexistent/flux"], "is not a folder"),
        (["--dtype", "int8"], "invalid choice"),
    ],
    ids=["tiny-res", "res", "res-text", "res-zero", "mode", "mode-suffix", "no-attn-fused", "steps", "warmup",
         "weights", "tiny-real", "model-path", "dtype"],
)
def test_bad_arguments_are_argparse_errors(run_mod, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        run_mod.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err


def test_full_size_random_on_cpu_is_refused(run_mod, capsys):
    with pytest.raises(SystemExit) as exc:
        run_mod.main(["--weights", "random", "--resolution", "1024", "--device", "cpu"])
    assert exc.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_no_local_weights_is_a_clear_message(run_mod, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(run_mod, "HF_REPOS", {"dev": "qflash-tests/no-such-flux-dev",
                                               "schnell": "qflash-tests/no-such-flux-schnell"})
    assert run_mod.main(["--weights", "real", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no local Flux weights found" in err and "nothing is downloaded" in err
    assert "qflash-tests/no-such-flux-dev: not in the Hugging Face cache" in err
    # a folder that is not a diffusers pipeline
    assert run_mod.main(["--weights", "real", "--model-path", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# real-weights path on a tiny saved pipeline (random weights, tokenizers built offline)
# --------------------------------------------------------------------------------------------


def _tiny_tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "<s>"] + "a photo of red fox in the snow at sunrise".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", model_max_length=max_len)


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        eos_token_id=2, bos_token_id=3, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=16, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    cfg = dict(ft.FLUX_CONFIGS["tiny"], joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False)
    transformer = ft.build_random_transformer(cfg, "cpu", torch.float32, seed=1)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=_tiny_tokenizer(77), text_encoder_2=t5, tokenizer_2=_tiny_tokenizer(256),
                        transformer=transformer)
    path = tmp_path_factory.mktemp("tiny_flux_pipeline")
    pipe.save_pretrained(path)
    return path


def test_real_weights_path_on_a_tiny_pipeline(run_mod, tiny_pipeline_dir, tmp_path, capsys):
    rc = run_mod.main(["--model-path", str(tiny_pipeline_dir), "--resolution", "128", "--steps", "2",
                       "--warmup", "1", "--modes", "sdpa", "int8", "int4", "sage", "--device", "cpu",
                       "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "PSNR/SSIM vs the baseline" in out and "| 128 | int8" in out
    if not torch.cuda.is_available():
        assert "CPU run: qflash runs its pure-PyTorch reference path here" in out.split("| res ")[0]
    res = json.loads((tmp_path / "flux_results.json").read_text())
    assert res["kind"] == "real" and res["variant"] == "schnell" and res["guidance"] == 0.0
    rows = {r["mode"]: r for r in res["resolutions"][0]["rows"]}
    assert rows["sage"]["status"] == "skipped"
    base = rows["sdpa"]
    assert base["psnr_db"] == math.inf and base["ssim"] == pytest.approx(1.0)
    assert len(base["step_ms"]) == 2 and base["wall_s"] > 0
    for name in ("int8", "int4"):
        r = rows[name]
        assert r["status"] == "ok", r.get("reason")
        assert 20.0 < r["psnr_db"] < math.inf and 0.5 < r["ssim"] <= 1.0
        assert Path(r["image"]).is_file()
    assert rows["int8"]["psnr_db"] > rows["int4"]["psnr_db"]
    from PIL import Image

    grid = Image.open(res["resolutions"][0]["side_by_side"])
    assert grid.size == (3 * 128, 128 + 28)


# --------------------------------------------------------------------------------------------
# PSNR, SSIM, image grid
# --------------------------------------------------------------------------------------------


def test_psnr_known_values(gen):
    img = torch.randint(0, 256, (32, 48, 3), generator=gen).numpy().astype(np.uint8)
    assert ft.psnr(img, img) == math.inf
    grey = np.full((64, 64, 3), 128.0)
    signs = np.where((np.indices((64, 64)).sum(0) % 2) == 0, 1.0, -1.0)[..., None]
    assert ft.psnr(grey + 10.0 * signs, grey) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)  # MSE = 100
    assert ft.psnr(grey + 1.0, grey) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE = 1: 48.13 dB
    noisy = 128.0 + 5.0 * torch.randn(512, 512, 3, generator=gen, dtype=torch.float64).numpy()
    assert ft.psnr(noisy, np.full_like(noisy, 128.0)) == pytest.approx(20 * math.log10(255 / 5), abs=0.1)
    with pytest.raises(ValueError, match="differ in shape"):
        ft.psnr(img, img[:-1])


def test_ssim_known_values(gen):
    img = torch.randint(0, 256, (40, 40, 3), generator=gen).numpy().astype(np.uint8)
    assert ft.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    a, b = np.full((20, 20), 100.0), np.full((20, 20), 120.0)  # no structure: the luminance term alone
    c1 = (0.01 * 255) ** 2
    assert ft.ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1), abs=1e-12)
    assert ft.ssim(a, b) == pytest.approx(ft.ssim(b, a), abs=1e-15)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ft.ssim(a[:8, :8], b[:8, :8])


def _ssim_naive(x: np.ndarray, y: np.ndarray, win=11, sigma=1.5) -> float:
    """Independent loop implementation (one channel): explicit 2-D Gaussian windows, valid region."""
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            px, py = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
            cxy = (w * px * py).sum() - mx * my
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_naive_implementation_and_drops_with_noise(gen):
    x = torch.rand(24, 26, generator=gen, dtype=torch.float64).numpy() * 255
    y = np.clip(x + 30 * torch.randn(24, 26, generator=gen, dtype=torch.float64).numpy(), 0, 255)
    assert ft.ssim(x, y) == pytest.approx(_ssim_naive(x, y), abs=1e-10)
    rgb = np.stack([x, y, 255 - x], -1)  # per channel, then the mean
    rgb2 = np.stack([y, x, 255 - y], -1)
    expect = np.mean([_ssim_naive(rgb[..., c], rgb2[..., c]) for c in range(3)])
    assert ft.ssim(rgb, rgb2) == pytest.approx(expect, abs=1e-10)
    base = np.kron(torch.rand(16, 16, generator=gen).numpy(), np.ones((8, 8))) * 200 + 20  # smooth-ish image
    s = [ft.ssim(base + sd * torch.randn(128, 128, generator=gen, dtype=torch.float64).numpy(), base)
         for sd in (1, 5, 20)]
    assert 1.0 > s[0] > s[1] > s[2] > 0.0


def test_ssim_matches_skimage_when_installed(gen):
    metrics = pytest.importorskip("skimage.metrics")
    x = torch.randint(0, 256, (48, 40, 3), generator=gen).numpy().astype(np.uint8)
    y = np.clip(x.astype(int) + torch.randint(-20, 21, (48, 40, 3), generator=gen).numpy(), 0, 255).astype(np.uint8)
    ref = metrics.structural_similarity(x, y, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    assert ft.ssim(x, y) == pytest.approx(ref, abs=1e-6)


def test_side_by_side():
    from PIL import Image

    ims = [Image.new("RGB", (64, 64), "red"), np.zeros((64, 32, 3), np.uint8), Image.new("RGB", (2048, 2048))]
    grid = ft.side_by_side(ims, ["a", "b", "c"], max_side=128)
    assert grid.size == (64 + 32 + 128, 128 + 28)
    assert grid.getpixel((10, 40)) == (255, 0, 0)
    with pytest.raises(ValueError, match="one label per image"):
        ft.side_by_side(ims, ["a"])


# --------------------------------------------------------------------------------------------
# modes, processors, random model
# --------------------------------------------------------------------------------------------


def test_parse_mode():
    assert ft.parse_mode("sdpa").is_baseline and not ft.parse_mode("sdpa+fused").is_baseline
    m = ft.parse_mode("int8-fp8+fused")
    assert (m.base, m.fused, m.name, m.is_qflash) == ("int8-fp8", True, "int8-fp8+fused", True)
    assert not ft.parse_mode("sage").is_qflash and "ceiling" in ft.parse_mode("no-attn").label
    for bad in ("int9", "int8+", "int8+fast", "no-attn+fused", ""):
        with pytest.raises(ValueError):
            ft.parse_mode(bad)


def test_installed_restores_the_same_processors():
    model = ft.build_random_transformer(ft.FLUX_CONFIGS["tiny"], "cpu", torch.float32, seed=3)
    before = dict(model.attn_processors)
    for name in ("int8", "int8+fused", "no-attn", "sdpa+fused"):
        with ft.installed(model, ft.parse_mode(name)) as how:
            assert how["processors"] == 2
            assert all(p is not before[k] for k, p in model.attn_processors.items())
        assert all(p is before[k] for k, p in model.attn_processors.items())
    with pytest.raises(RuntimeError, match="boom"):
        with ft.installed(model, ft.parse_mode("int4+fused")):
            raise RuntimeError("boom")
    assert all(p is before[k] for k, p in model.attn_processors.items())


def test_bench_processor_overrides_only_the_hooks(gen):
    """BenchFluxAttnProcessor reuses the integration's Flux body; qflash.integrations.diffusers.apply
    and remove leave it alone (it is not one of the library's processors)."""
    import qflash.integrations.diffusers as qfd

    assert issubclass(ft.BenchFluxAttnProcessor, qfd.HookedFluxAttnProcessor)
    assert not issubclass(ft.BenchFluxAttnProcessor, qfd.QFlashFluxAttnProcessor)
    assert set(vars(ft.BenchFluxAttnProcessor)) & {"__init__", "_attend", "_prologue", "__call__"} == {
        "__init__", "_attend", "_prologue"}
    model = ft.build_random_transformer(ft.FLUX_CONFIGS["tiny"], "cpu", torch.float32, seed=4)
    attn = model.transformer_blocks[0].attn
    x = torch.randn(1, 16, model.inner_dim, generator=gen)
    ctx = torch.randn(1, 8, model.inner_dim, generator=gen)
    with torch.no_grad(), ft.installed(model, ft.parse_mode("sdpa+fused")):
        with pytest.warns(UserWarning, match="found no FluxAttnProcessor"):
            assert qfd.apply(model, quant="int8")["skipped"] == {"BenchFluxAttnProcessor": 2}
        assert qfd.remove(model) == 0
        with pytest.raises(ValueError, match="does not take an attention mask"):
            attn(x, ctx, attention_mask=torch.ones(1, 24, dtype=torch.bool))


def test_random_transformer_is_deterministic_and_initialised():
    cfg = ft.FLUX_CONFIGS["tiny"]
    a = ft.build_random_transformer(cfg, "cpu", torch.float32, seed=7)
    b = ft.build_random_transformer(cfg, "cpu", torch.float32, seed=7)
    c = ft.build_random_transformer(cfg, "cpu", torch.float32, seed=8)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    lin = a.x_embedder
    assert lin.weight.abs().max() <= 1 / math.sqrt(lin.in_features) and lin.weight.std() > 0
    assert all(torch.isfinite(p).all() for p in pa.values())
    assert torch.equal(a.transformer_blocks[0].attn.norm_q.weight, torch.ones(128))
    assert ft.token_grid(1024, False) == (64, 64) and ft.token_grid(2048, False) == (128, 128)
    assert ft.token_grid(1024, True) == (8, 8)
    inputs = ft.make_inputs(ft.FLUX_CONFIGS["dev"], (64, 64), 512, device="meta")
    assert inputs["hidden_states"].shape == (1, 4096, 64) and inputs["encoder_hidden_states"].shape == (1, 512, 4096)
    assert inputs["img_ids"].shape == (4096, 3) and inputs["guidance"].shape == (1,)


def test_time_calls_cpu():
    calls = []
    times, out = ft.time_calls(lambda: calls.append(1) or len(calls), torch.device("cpu"), warmup=2, reps=3)
    assert len(times) == 3 and out == 5 and len(calls) == 5


# --------------------------------------------------------------------------------------------
# fused RMSNorm + RoPE (qflash.fused.rmsnorm_rope)
# --------------------------------------------------------------------------------------------


def _rope_inputs(gen, B, S_p, S, H, D, dtype, strided):
    xp = (torch.randn(B, S_p, H, D, generator=gen) * 3).to(dtype) if S_p else None
    if strided:  # a view into a wider projection output: heads not adjacent
        x = (torch.randn(B, S, 2 * H, D, generator=gen) * 3).to(dtype)[:, :, ::2]
    else:
        x = (torch.randn(B, S, H, D, generator=gen) * 3).to(dtype)
    w, wp = torch.rand(D, generator=gen) + 0.5, torch.rand(D, generator=gen) + 0.5
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    side = int(math.ceil(math.sqrt(S)))
    img = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                     indexing="ij"), -1).reshape(-1, 3)[:S]
    ids = torch.cat([torch.zeros(S_p, 3), img])
    axes = [16, 56, 56] if D == 128 else [8, 28, 28]
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=axes)(ids)
    return x, w.to(dtype), xp, wp.to(dtype), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_rope_reference_matches_diffusers_ops(gen, dtype):
    from diffusers.models.embeddings import apply_rotary_emb

    x, w, xp, wp, cos, sin = _rope_inputs(gen, 2, 7, 30, 3, 128, dtype, strided=True)
    nq, nt = torch.nn.RMSNorm(128, eps=1e-6).to(dtype), torch.nn.RMSNorm(128, eps=1e-6).to(dtype)
    with torch.no_grad():
        nq.weight.copy_(w)
        nt.weight.copy_(wp)
        unfused = apply_rotary_emb(torch.cat([nt(xp), nq(x)], dim=1), (cos, sin), sequence_dim=1)
    fused = rmsnorm_rope_reference(x, w, cos, sin, 1e-6, x_prefix=xp, weight_prefix=wp)
    assert fused.shape == unfused.shape and fused.dtype == dtype and fused.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    else:  # diffusers rounds to bf16 between norm and rotation; we round once: ~1 ulp apart
        torch.testing.assert_close(fused.float(), unfused.float(), rtol=2 ** -7, atol=2 ** -6)
    assert torch.equal(rmsnorm_rope(x, w, cos, sin, 1e-6, x_prefix=xp, weight_prefix=wp), fused)  # CPU dispatch


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "B, S_p, S, H, D, dtype, strided, rope",
    [
        (1, 5, 12, 3, 128, torch.float32, False, True),
        (2, 0, 17, 24, 128, torch.bfloat16, True, True),
        (1, 3, 9, 5, 64, torch.float16, True, True),
        (2, 4, 1, 2, 64, torch.float32, False, False),
        (1, 1, 63, 8, 128, torch.bfloat16, False, True),
    ],
    ids=["fp32-prefix", "bf16-H24-strided", "fp16-D64", "no-rope-S1", "bf16-S63-Sp1"],
)
def test_rmsnorm_rope_triton_matches_reference(gen, B, S_p, S, H, D, dtype, strided, rope):
    device = "cuda" if HAS_CUDA else "cpu"
    x, w, xp, wp, cos, sin = _rope_inputs(gen, B, S_p, S, H, D, dtype, strided)
    if not rope:
        cos = sin = None
    x, w = x.to(device), w.to(device)
    xp = xp.to(device) if xp is not None else None
    cos = cos.to(device) if cos is not None else None
    sin = sin.to(device) if sin is not None else None
    kw = dict(x_prefix=xp, weight_prefix=wp.to(device) if xp is not None else None)
    got = rmsnorm_rope_triton(x, w, cos, sin, 1e-6, **kw)
    ref = rmsnorm_rope_reference(x, w, cos, sin, 1e-6, **kw)
    assert got.shape == (B, S_p + S, H, D) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # one rounding each; fp32 summation order differs
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        torch.testing.assert_close(got.float(), ref.float(), rtol=ulp, atol=ulp)


def test_rmsnorm_rope_errors(gen):
    x, w, xp, wp, cos, sin = _rope_inputs(gen, 1, 2, 4, 2, 64, torch.float32, False)
    with pytest.raises(ValueError, match="head dim must be even"):
        rmsnorm_rope_reference(torch.randn(1, 4, 2, 63), torch.ones(63), None, None, 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm_rope_reference(x, torch.ones(32), None, None, 1e-6)
    with pytest.raises(ValueError, match="cos and sin must be"):
        rmsnorm_rope_reference(x, w, cos, sin, 1e-6)  # cos covers S_p + S rows, no prefix given
    with pytest.raises(ValueError, match="weight_prefix"):
        rmsnorm_rope_reference(x, w, cos, sin, 1e-6, x_prefix=xp)
    with pytest.raises(ValueError, match="x_prefix must be"):
        rmsnorm_rope_reference(x, w, cos, sin, 1e-6, x_prefix=xp[:, :, :1], weight_prefix=wp)
    with pytest.raises(ValueError, match="both cos and sin"):
        rmsnorm_rope_reference(x, w, None, sin[:4], 1e-6)
