"""Flux end to end: the pieces behind ``examples/flux/run.py``.

- ``FLUX_CONFIGS`` / ``build_random_transformer`` / ``make_inputs``: diffusers'
  ``FluxTransformer2DModel`` with the real FLUX.1 config (or a tiny one) and deterministic random
  weights, built on the meta device and initialised in place (fast, no fp32 copy), and real-shaped
  inputs.
- ``Mode`` / ``parse_mode`` / ``installed``: the attention variants compared — diffusers' own
  SDPA (the baseline), qflash presets (through ``qflash.integrations.diffusers.apply``/``remove``),
  SageAttention, "attention removed" (a ceiling: attention output replaced by zeros), and
  ``+fused`` variants whose processor runs ``qflash.fused.rmsnorm_rope.rmsnorm_rope`` (RMSNorm +
  RoPE + text/image concat of q and k in one launch each) instead of diffusers' unfused ops.
- ``time_calls`` / ``peak_memory``: CUDA-event timing (wall clock on CPU) and peak memory.
- ``time_prologue``: the pre-attention cost (RMSNorm + RoPE of q, k) per transformer step, unfused
  (diffusers' ops) vs fused, at the real shapes, outside the model.
- ``psnr`` / ``ssim`` / ``side_by_side``: image quality against the baseline image and the PNG.

Nothing here downloads anything or changes global state; processors are restored by ``installed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

try:
    import diffusers
    from diffusers import FluxTransformer2DModel
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "qflash.bench.flux_timing needs diffusers (>= 0.35, tested with 0.42): "
        "pip install diffusers transformers accelerate"
    ) from _exc

from ..config import PRESETS
from ..dropin import sdpa as qflash_sdpa
from ..fused.rmsnorm_rope import rmsnorm_rope
from ..integrations.diffusers import FLUX_SUPPORTED, HookedFluxAttnProcessor
from .timing import median_ms, time_calls  # noqa: F401  (time_calls re-exported)
from .timing import sync as _sync

if not FLUX_SUPPORTED:  # pragma: no cover - depends on the installed diffusers
    raise ImportError(
        f"qflash.bench.flux_timing: FluxAttnProcessor of diffusers {diffusers.__version__} is not supported "
        "by qflash.integrations.diffusers (tested with 0.42)"
    )

__all__ = [
    "FLUX_CONFIGS",
    "TINY_TEXT_TOKENS",
    "token_grid",
    "build_random_transformer",
    "make_inputs",
    "Mode",
    "parse_mode",
    "mode_unavailable",
    "installed",
    "BenchFluxAttnProcessor",
    "time_calls",
    "time_prologue",
    "psnr",
    "ssim",
    "side_by_side",
]

_REAL = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)

#: FluxTransformer2DModel configs: FLUX.1-dev / -schnell (as in their transformer/config.json) and
#: a tiny one for CPU tests (1 double + 1 single block, 2 heads of 128).
FLUX_CONFIGS: dict[str, dict] = {
    "dev": dict(_REAL, guidance_embeds=True),
    "schnell": dict(_REAL, guidance_embeds=False),
    "tiny": dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}

TEXT_TOKENS = 512  # T5 max_sequence_length of FLUX.1-dev
TINY_TEXT_TOKENS = 32


def token_grid(resolution: int, tiny: bool) -> tuple[int, int]:
    """(rows, cols) of image tokens: resolution / 16 per side (VAE /8, 2x2 patches): 64x64 = 4096 at
    1024px, 128x128 = 16384 at 2048px. Tiny: resolution / 128 per side (64 tokens at 1024px)."""
    side = resolution // (128 if tiny else 16)
    if side < 1 or resolution % (128 if tiny else 16):
        raise ValueError(f"resolution {resolution} must be a positive multiple of {128 if tiny else 16}")
    return side, side


# --------------------------------------------------------------------------------------------
# random-weights model and inputs
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_random_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default init, drawn from ``gen`` in module order: Linear weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scales 1, shifts 0. Every parameter is covered."""
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            for p in (module.weight, module.bias):
                if p is not None:
                    p.uniform_(-bound, bound, generator=gen)
                    done.add(id(p))
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)) or (
            type(module).__name__ in ("RMSNorm", "LayerNorm", "FP32LayerNorm")
        ):
            for name, p in module.named_parameters(recurse=False):
                (p.fill_(1.0) if name == "weight" else p.zero_())
                done.add(id(p))
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise RuntimeError(f"random init does not cover these parameters: {missed[:5]} ({len(missed)} in all)")


def build_random_transformer(config: dict, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """``FluxTransformer2DModel(**config)`` with deterministic random weights, in ``dtype`` on ``device``.

    Built on the meta device, moved with ``to_empty`` (no fp32 copy, no CPU round trip) and
    initialised in place by a ``torch.Generator`` on ``device`` seeded with ``seed``: the same
    weights every run on the same kind of device.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    if any(True for _ in model.buffers()):  # to_empty would leave them uninitialised
        raise RuntimeError("FluxTransformer2DModel has buffers; build_random_transformer cannot initialise them")
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    _init_random_(model, gen)
    return model.eval().requires_grad_(False)


def make_inputs(config: dict, grid: tuple[int, int], text_tokens: int, *, batch: int = 1,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                guidance: float = 3.5) -> dict:
    """Keyword arguments for ``FluxTransformer2DModel.forward`` shaped as FluxPipeline makes them.

    hidden_states (B, rows*cols, in_channels) ~ N(0, 1) (packed latents); encoder_hidden_states
    (B, text_tokens, joint_attention_dim) ~ N(0, 1) (T5 output); pooled_projections (B, pooled)
    (CLIP); timestep (B,) = 1.0 (the first sampler step, pipeline scale t/1000); img_ids
    (rows*cols, 3) = (0, row, col); txt_ids zeros; guidance (B,) for guidance-distilled models.
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows, cols = grid
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    inputs = dict(
        hidden_states=torch.randn(batch, rows * cols, config["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=gen),
        timestep=torch.ones(batch),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    out = {k: v.to(device=device, dtype=dtype if k not in ("img_ids", "txt_ids") else torch.float32)
           for k, v in inputs.items()}
    if config.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), guidance, device=device, dtype=torch.float32)
    out["return_dict"] = False
    return out


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------

NON_QFLASH = ("sdpa", "sage", "no-attn")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One attention variant. ``base``: "sdpa" (diffusers' default), a qflash preset name,
    "sage" (SageAttention) or "no-attn" (attention output zeros: a ceiling, not a method);
    ``fused``: q/k RMSNorm + RoPE by ``rmsnorm_rope`` instead of diffusers' unfused ops;
    ``fusedq`` (qflash presets): ``apply(..., fuse_prologue=True)`` — the prologue also writes the
    quantised K/V (``qflash.fused.qkv_prologue``) and attention reads them (issue 16)."""

    base: str
    fused: bool = False
    fusedq: bool = False

    @property
    def name(self) -> str:
        return self.base + ("+fused" if self.fused else "") + ("+fusedq" if self.fusedq else "")

    @property
    def is_baseline(self) -> bool:
        return self.base == "sdpa" and not self.fused

    @property
    def is_qflash(self) -> bool:
        return self.base not in NON_QFLASH

    @property
    def label(self) -> str:
        if self.base == "sdpa":
            what = "SDPA default (diffusers native)"
        elif self.base == "sage":
            what = "SageAttention sageattn"
        elif self.base == "no-attn":
            what = "attention removed (output zeros; ceiling)"
        else:
            what = f"qflash {self.base}"
        if self.fusedq:
            return what + " + fused RMSNorm/RoPE/K-V quantisation prologue"
        return what + (" + fused RMSNorm/RoPE" if self.fused else "")


def parse_mode(text: str) -> Mode:
    """"sdpa", "int8", "int8-fp8", "int4", "fp8", "none", "sage", "no-attn", each optionally with
    "+fused" (qflash presets also "+fusedq"); raises ValueError naming the choices otherwise."""
    base, plus, suffix = str(text).strip().partition("+")
    if suffix == "fusedq":
        if base not in PRESETS:
            raise ValueError(f"mode {text!r}: '+fusedq' applies to qflash presets {sorted(PRESETS)}")
        return Mode(base, fusedq=True)
    if plus and suffix != "fused":
        raise ValueError(f"mode {text!r}: the suffixes are '+fused' and (qflash presets) '+fusedq'")
    choices = list(NON_QFLASH) + sorted(PRESETS)
    if base not in choices:
        raise ValueError(f"mode {text!r}: expected one of {choices}, optionally with '+fused'")
    if base == "no-attn" and plus:
        raise ValueError("mode 'no-attn+fused' is not offered: 'no-attn' is a ceiling for the attention alone")
    return Mode(base, bool(plus))


def mode_unavailable(mode: Mode, device: torch.device) -> str | None:
    """Why ``mode`` cannot run here (shown in the table), or None."""
    if mode.base == "sage":
        if device.type != "cuda":
            return "SageAttention needs CUDA"
        if importlib.util.find_spec("sageattention") is None:
            return "sageattention not installed"
    return None


def _attend_fn(mode: Mode) -> Callable:
    """(q, k, v) as (B, S, H, D), no mask -> (B, S, H, D): the attention of ``mode``."""
    if mode.base == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if mode.base == "no-attn":
        return lambda q, k, v: torch.zeros_like(v)
    if mode.base == "sage":
        from sageattention import sageattn

        return lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    quant = mode.base
    return lambda q, k, v: qflash_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       quant=quant).transpose(1, 2)


def _norm_params(norm: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    w = getattr(norm, "weight", None)
    if w is None:
        w = torch.ones(like.shape[-1], device=like.device, dtype=like.dtype)
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = torch.finfo(like.dtype).eps
    return w, float(eps)


class BenchFluxAttnProcessor(HookedFluxAttnProcessor):
    """diffusers 0.42 ``FluxAttnProcessor`` with a pluggable attention and, with ``fused``, the
    q/k RMSNorm + text/image concat + RoPE done by ``rmsnorm_rope`` (one launch per tensor).

    The processor body is ``qflash.integrations.diffusers.HookedFluxAttnProcessor``'s (diffusers'
    own); this class only overrides its ``_attend`` and ``_prologue`` steps. Attention masks are
    not supported (Flux pipelines pass none) and raise.
    """

    def __init__(self, mode: Mode, original=None):
        super().__init__()
        self.mode = mode
        self.attend = _attend_fn(mode)
        self.original = original

    def _attend(self, query, key, value, attn_mask):
        if attn_mask is not None:
            raise ValueError(f"{type(self).__name__} ({self.mode.name}) does not take an attention mask")
        return self.attend(query, key, value)

    def _prologue(self, attn, query, key, encoder_query, encoder_key, image_rotary_emb):
        if not self.mode.fused:  # diffusers' own sequence of ops
            return super()._prologue(attn, query, key, encoder_query, encoder_key, image_rotary_emb)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        wq, eps_q = _norm_params(attn.norm_q, query)
        wk, eps_k = _norm_params(attn.norm_k, key)
        if encoder_query is None:
            return rmsnorm_rope(query, wq, cos, sin, eps_q), rmsnorm_rope(key, wk, cos, sin, eps_k)
        waq, eps_aq = _norm_params(attn.norm_added_q, encoder_query)
        wak, eps_ak = _norm_params(attn.norm_added_k, encoder_key)
        if eps_aq != eps_q or eps_ak != eps_k:
            raise ValueError("rmsnorm_rope needs one eps for the text and image norms")
        query = rmsnorm_rope(query, wq, cos, sin, eps_q, x_prefix=encoder_query, weight_prefix=waq)
        key = rmsnorm_rope(key, wk, cos, sin, eps_k, x_prefix=encoder_key, weight_prefix=wak)
        return query, key


def _flux_attention_modules(model: torch.nn.Module):
    for module in model.modules():
        if hasattr(module, "set_processor") and isinstance(getattr(module, "processor", None), FluxAttnProcessor):
            yield module


@contextlib.contextmanager
def installed(model: torch.nn.Module, mode: Mode) -> Iterator[dict]:
    """Run ``model`` (a FluxTransformer2DModel) with ``mode``'s attention inside the block.

    - baseline ("sdpa"): nothing is changed;
    - a qflash preset (unfused, or ``+fusedq``): ``qflash.integrations.diffusers.apply(model,
      quant=..., fuse_prologue=...)``, then ``remove`` — the library's own integration, as a user
      would run it;
    - everything else: ``BenchFluxAttnProcessor`` on every Flux attention, originals put back.

    Yields a summary dict (``{"processors": n, "how": ...}``).
    """
    if mode.is_baseline:
        yield {"processors": 0, "how": "diffusers default processors"}
        return
    if mode.is_qflash and not mode.fused:
        from ..integrations import diffusers as qfd

        summary = qfd.apply(model, quant=mode.base, fuse_prologue=mode.fusedq)
        try:
            if summary["flux"] + summary["updated"] == 0:
                raise RuntimeError(f"qflash.integrations.diffusers.apply replaced no Flux processor: {summary}")
            yield {"processors": summary["flux"] + summary["updated"], "how": "qflash.integrations.diffusers.apply",
                   "apply_summary": summary}
        finally:
            qfd.remove(model)
        return
    originals = []
    for module in _flux_attention_modules(model):
        originals.append((module, module.processor))
        module.set_processor(BenchFluxAttnProcessor(mode, original=module.processor))
    if not originals:
        raise RuntimeError("no FluxAttnProcessor found in the model (already replaced?)")
    try:
        yield {"processors": len(originals), "how": "BenchFluxAttnProcessor"}
    finally:
        for module, proc in originals:
            module.set_processor(proc)


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict filled on exit: ``peak_bytes`` (max allocated inside the block),
    ``base_bytes`` (allocated on entry) and ``extra_bytes`` = peak - base. CUDA only (None on CPU)."""
    rec: dict = {"peak_bytes": None, "base_bytes": None, "extra_bytes": None}
    if device.type != "cuda":
        yield rec
        return
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try:
        yield rec
    finally:
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        rec.update(peak_bytes=peak, base_bytes=base, extra_bytes=peak - base)


def time_prologue(config: dict, grid: tuple[int, int], text_tokens: int, *, batch: int = 1,
                  device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                  warmup: int = 3, reps: int = 20) -> dict:
    """The pre-attention work of one transformer step — RMSNorm of q and k (text and image parts),
    the text/image concat and RoPE, as Flux's processor does it — unfused (diffusers' ops) vs
    ``rmsnorm_rope`` (one launch per tensor), at the real shapes, outside the model. CUDA timing
    by ``triton.testing.do_bench`` (median); ``warmup``/``reps`` are for the CPU wall-clock loop.

    One step = ``num_layers`` double-stream blocks (text + image parts, concatenated) +
    ``num_single_layers`` single-stream blocks (already concatenated). Returns ms per block and per
    step (medians), and the largest difference between the two outputs.
    """
    device = torch.device(device)
    H, D = config["num_attention_heads"], config["attention_head_dim"]
    rows, cols = grid
    S_img, S_txt = rows * cols, text_tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):  # a projection output (B, S, H*D) seen as (B, S, H, D), like the processor's
        return torch.randn(*shape[:2], shape[2] * shape[3], generator=gen).to(device, dtype).unflatten(-1, (H, D))

    norms = [torch.nn.RMSNorm(D, eps=1e-6).to(device, dtype) for _ in range(4)]
    for n in norms:
        with torch.no_grad():
            n.weight.copy_(torch.rand(D, generator=gen) + 0.5)
    nq, nk, naq, nak = norms
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    ids = torch.cat([torch.zeros(S_txt, 3), img_ids.reshape(-1, 3)]).to(device)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(config["axes_dims_rope"]))(ids)
    q_i, k_i, q_t, k_t = rnd(batch, S_img, H, D), rnd(batch, S_img, H, D), rnd(batch, S_txt, H, D), rnd(batch, S_txt, H, D)
    q_s, k_s = rnd(batch, S_img + S_txt, H, D), rnd(batch, S_img + S_txt, H, D)

    def unfused_double():
        q = apply_rotary_emb(torch.cat([naq(q_t), nq(q_i)], dim=1), (cos, sin), sequence_dim=1)
        k = apply_rotary_emb(torch.cat([nak(k_t), nk(k_i)], dim=1), (cos, sin), sequence_dim=1)
        return q, k

    def fused_double():
        q = rmsnorm_rope(q_i, nq.weight, cos, sin, 1e-6, x_prefix=q_t, weight_prefix=naq.weight)
        k = rmsnorm_rope(k_i, nk.weight, cos, sin, 1e-6, x_prefix=k_t, weight_prefix=nak.weight)
        return q, k

    def unfused_single():
        return (apply_rotary_emb(nq(q_s), (cos, sin), sequence_dim=1),
                apply_rotary_emb(nk(k_s), (cos, sin), sequence_dim=1))

    def fused_single():
        return rmsnorm_rope(q_s, nq.weight, cos, sin, 1e-6), rmsnorm_rope(k_s, nk.weight, cos, sin, 1e-6)

    res: dict = {}
    with torch.no_grad():
        for name, fn in (("unfused_double", unfused_double), ("fused_double", fused_double),
                         ("unfused_single", unfused_single), ("fused_single", fused_single)):
            res[name + "_ms"] = median_ms(fn, device, warmup, reps)
        if device.type == "cuda":  # launch-config sweep of the fused kernel (the default is block_h=8, 4 warps)
            from ..fused.rmsnorm_rope import rmsnorm_rope_triton

            sweep = {}
            for bh, nw in ((4, 2), (8, 4), (8, 8), (16, 4), (32, 8)):
                kw = {"block_h": bh, "num_warps": nw}

                def fd(kw=kw):
                    return (rmsnorm_rope_triton(q_i, nq.weight, cos, sin, 1e-6, x_prefix=q_t,
                                                weight_prefix=naq.weight, **kw),
                            rmsnorm_rope_triton(k_i, nk.weight, cos, sin, 1e-6, x_prefix=k_t,
                                                weight_prefix=nak.weight, **kw))

                def fs(kw=kw):
                    return (rmsnorm_rope_triton(q_s, nq.weight, cos, sin, 1e-6, **kw),
                            rmsnorm_rope_triton(k_s, nk.weight, cos, sin, 1e-6, **kw))

                td, ts = median_ms(fd, device, warmup, reps), median_ms(fs, device, warmup, reps)
                sweep[f"block_h={bh},num_warps={nw}"] = config["num_layers"] * td + config["num_single_layers"] * ts
            res["fused_step_ms_by_config"] = sweep
        diff = 0.0
        for a, b in zip(unfused_double() + unfused_single(), fused_double() + fused_single()):
            diff = max(diff, (a.float() - b.float()).abs().max().item())
    nd, ns = config["num_layers"], config["num_single_layers"]
    res["unfused_step_ms"] = nd * res["unfused_double_ms"] + ns * res["unfused_single_ms"]
    res["fused_step_ms"] = nd * res["fused_double_ms"] + ns * res["fused_single_ms"]
    res["saved_step_ms"] = res["unfused_step_ms"] - res["fused_step_ms"]
    res["max_abs_diff"] = diff
    res["fused_impl"] = "triton" if device.type == "cuda" else "torch reference (no CUDA: not a kernel timing)"
    res["shape"] = {"batch": batch, "heads": H, "head_dim": D, "image_tokens": S_img, "text_tokens": S_txt,
                    "double_blocks": nd, "single_blocks": ns}
    # bytes the fused version moves: read q, k once (+ cos/sin), write once
    elt = torch.tensor([], dtype=dtype).element_size()
    S = S_img + S_txt
    res["fused_min_bytes_step"] = (nd + ns) * 2 * 2 * batch * S * H * D * elt
    return res


# --------------------------------------------------------------------------------------------
# image quality
# --------------------------------------------------------------------------------------------


def _as_float_image(img) -> np.ndarray:
    """PIL image or array (H, W) / (H, W, C) -> float64 array (H, W, C)."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"an image must be (H, W) or (H, W, C), got shape {a.shape}")
    return a


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(data_range² / MSE) over all pixels and channels;
    ``inf`` for identical images."""
    x, y = _as_float_image(a), _as_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, data_range: float = 255.0, *, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window (11, sigma 1.5), K1 0.01, K2 0.03,
    population statistics, computed per channel over the valid region and averaged — the
    convention of ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)``. 1.0 for identical images."""
    x, y = _as_float_image(a), _as_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if min(x.shape[:2]) < win_size:
        raise ValueError(f"images of {x.shape[:2]} are smaller than the SSIM window {win_size}")
    g = _gaussian_window(win_size, sigma)
    C = x.shape[2]
    wx = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)

    def blur(t):  # (1, C, H, W) -> valid-region Gaussian mean
        return F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)

    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    ty = torch.from_numpy(np.ascontiguousarray(y.transpose(2, 0, 1)))[None]
    mx, my = blur(tx), blur(ty)
    vx = blur(tx * tx) - mx * mx
    vy = blur(ty * ty) - my * my
    cxy = blur(tx * ty) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def side_by_side(images: list, labels: list[str], *, max_side: int | None = 1024, label_height: int = 28):
    """One PIL image: ``images`` left to right (each scaled to ``max_side`` if larger), a caption
    strip with each label above its image."""
    from PIL import Image, ImageDraw

    if len(images) != len(labels) or not images:
        raise ValueError(f"need one label per image and at least one image (got {len(images)} images, "
                         f"{len(labels)} labels)")
    tiles = []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        im = im.convert("RGB")
        if max_side and max(im.size) > max_side:
            f = max_side / max(im.size)
            im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.LANCZOS)
        tiles.append(im)
    W = sum(t.width for t in tiles)
    H = max(t.height for t in tiles) + label_height
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for t, label in zip(tiles, labels):
        canvas.paste(t, (x, label_height))
        draw.text((x + 6, 6), str(label), fill="black")
        x += t.width
    return canvas


def diffusers_version() -> str:
    return diffusers.__version__
