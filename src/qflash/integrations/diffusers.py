"""qflash in diffusers: quantised attention for Flux and for every model on the generic SDPA processor.

Usage::

    import qflash.integrations.diffusers as qfd

    qfd.apply(pipe, quant="int8")      # a pipeline (all its models) or one model
    image = pipe(prompt).images[0]
    qfd.remove(pipe)                   # the original processor objects are back

    with qfd.applied(pipe.transformer, quant="int8-fp8"):
        ...

What is replaced, through diffusers' public per-module ``set_processor``:

- ``FluxAttnProcessor`` (Flux, Chroma, ... double- and single-stream blocks) by
  ``QFlashFluxAttnProcessor``, a subclass that computes the same projections, QK-norms and
  rotary embeddings and calls ``qflash.sdpa`` where diffusers calls ``dispatch_attention_fn``
  (its body lives in ``HookedFluxAttnProcessor``, whose ``_prologue``/``_attend`` steps subclasses
  override);
- ``AttnProcessor2_0`` (UNets, VAEs, DiT/PixArt/SD-style transformers) by ``QFlashAttnProcessor2_0``,
  the same with ``qflash.sdpa`` in place of ``F.scaled_dot_product_attention``.

Only processors of exactly those classes are replaced (a subclass, an IP-adapter or a LoRA
processor may do something else); everything else is left alone and counted in the summary
``apply`` returns. Each qflash processor keeps the processor it replaced (``.qflash_original``),
so ``remove`` puts back the very same objects and the model computes bit-identical outputs again.

Calls that ``qflash.sdpa`` cannot run quantised (for example a VAE's head dim of 512) go to
PyTorch's SDPA with a one-time ``QFlashFallbackWarning``. Context parallelism
(``processor._parallel_config``) is left to diffusers' own dispatch, with a one-time warning,
unless ``apply(..., parallel=...)`` asked for qflash's (``qflash.parallel``): then the Flux
processors run ``qflash.parallel.attention`` on each rank's token shard, whoever sharded them.

A diffusers *attention backend* named "qflash" (``model.set_attention_backend``) is not
registered: in diffusers 0.42 backend names are members of a closed ``AttentionBackendName``
Enum that ``dispatch_attention_fn`` converts every name through, so a new name cannot be added
without patching diffusers; use ``apply`` (attention processors) or ``qflash.patch_sdpa``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import Counter

import torch

try:
    import diffusers
    from diffusers.models.attention_processor import AttnProcessor2_0
except ImportError as _exc:  # pragma: no cover - exercised by a test that hides diffusers
    raise ImportError(
        "qflash.integrations.diffusers needs the optional dependency diffusers (>=0.42,<0.43, the version "
        "its processors mirror), which is not "
        "installed: pip install 'qflash[diffusers]'  (or: pip install diffusers transformers accelerate)"
    ) from _exc

from ..config import QuantConfig, resolve_quant
from ..dropin import sdpa

__all__ = [
    "FLUX_SUPPORTED",
    "HookedFluxAttnProcessor",
    "QFlashAttnProcessor2_0",
    "QFlashFluxAttnProcessor",
    "applied",
    "apply",
    "remove",
]

try:  # deprecate() is used by AttnProcessor2_0's body, which QFlashAttnProcessor2_0 mirrors
    from diffusers.utils import deprecate as _deprecate
except ImportError:  # pragma: no cover
    _deprecate = None

# --- Flux: the processor body is mirrored from diffusers 0.42; support it only where it matches ---
_FLUX_CALL_PARAMS = ("self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
try:
    from diffusers.models.embeddings import apply_rotary_emb as _apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections as _flux_qkv_projections

    FLUX_SUPPORTED = tuple(inspect.signature(FluxAttnProcessor.__call__).parameters) == _FLUX_CALL_PARAMS
except (ImportError, AttributeError, TypeError, ValueError):  # an older or much newer diffusers
    FluxAttnProcessor = None
    FLUX_SUPPORTED = False

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


class _QFlashProcessorMixin:
    """Bookkeeping shared by the qflash processors: the quant preset and the replaced processor."""

    def __init__(self, quant: str | QuantConfig = "int8", *, fallback: bool = True, original=None, parallel=None,
                 fuse_prologue: bool = False):
        super().__init__()  # the diffusers processor's own __init__ (next in the MRO)
        self._qflash_init(quant, fallback, original)
        self.qflash_parallel = parallel  # a qflash.parallel.ParallelConfig (Flux processors only) or None
        self.qflash_fuse_prologue = fuse_prologue  # qflash.integrations.fused_prologue where the pattern matches

    def _qflash_init(self, quant: str | QuantConfig, fallback: bool, original) -> None:
        resolve_quant(quant)
        self.qflash_quant = quant
        self.qflash_fallback = fallback
        self.qflash_original = original
        for attr in ("_attention_backend", "_parallel_config"):  # carry diffusers' per-instance settings
            if original is not None and attr in getattr(original, "__dict__", {}):
                setattr(self, attr, getattr(original, attr))

    def _sdpa(self, query, key, value, attn_mask=None):
        """qflash.sdpa on (B, H, S, D) tensors with this processor's settings."""
        return sdpa(query, key, value, attn_mask=attn_mask, quant=self.qflash_quant, fallback=self.qflash_fallback)

    def __repr__(self) -> str:
        fused = ", fuse_prologue=True" if getattr(self, "qflash_fuse_prologue", False) else ""
        return f"{type(self).__name__}(quant={self.qflash_quant!r}{fused})"


class QFlashAttnProcessor2_0(_QFlashProcessorMixin, AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` with ``qflash.sdpa(quant=...)`` as the attention.

    Same inputs and outputs as ``AttnProcessor2_0``: hidden states (B, S, C) or (B, C, H, W),
    optional encoder hidden states (B, S_enc, C_enc) and attention mask (prepared by
    ``attn.prepare_attention_mask`` into (B, heads, S_q|1, S_k)).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Mirrors diffusers 0.42 AttnProcessor2_0.__call__; only the attention call differs.
        if (len(args) > 0 or kwargs.get("scale", None) is not None) and _deprecate is not None:
            _deprecate(
                "scale", "1.0.0",
                "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise "
                "an error in the future. `scale` should directly be passed while calling the underlying pipeline "
                "component i.e., via `cross_attention_kwargs`.",
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch, heads, source_length, target_length), as SDPA expects
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        fused = None
        if getattr(self, "qflash_fuse_prologue", False):  # q/k norm + K/V quantisation in one prologue
            from . import fused_prologue

            fused = fused_prologue.generic_attention(attn, query, key, value, self.qflash_quant, attention_mask)
        if fused is not None:
            hidden_states = fused
        else:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            hidden_states = self._sdpa(query, key, value, attn_mask=attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


if FLUX_SUPPORTED:

    class HookedFluxAttnProcessor(FluxAttnProcessor):
        """diffusers 0.42 ``FluxAttnProcessor.__call__``, mirrored once, with two overridable steps.

        - ``_prologue(attn, query, key, encoder_query, encoder_key, image_rotary_emb) -> (query, key)``:
          q/k RMSNorm, the text/image concat ([text, image] along the sequence) and RoPE, on
          (B, S, H, D) tensors; ``encoder_query``/``encoder_key`` are None in single-stream blocks.
          Default: diffusers' own ops, in diffusers' order.
        - ``_attend(query, key, value, attn_mask) -> out``: the attention on (B, S, H, D) tensors
          (diffusers calls ``dispatch_attention_fn`` here). No default.

        With context parallelism (``_parallel_config`` set) the whole call is diffusers' own, with
        a one-time warning.

        Used by ``QFlashFluxAttnProcessor`` (``_attend`` = ``qflash.sdpa``) and by the benchmark
        processor of ``qflash.bench.flux_timing`` (SageAttention, zeros, fused prologue).
        """

        def __call__(
            self,
            attn,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor = None,
            attention_mask: torch.Tensor | None = None,
            image_rotary_emb: torch.Tensor | None = None,
        ) -> torch.Tensor:
            if self._parallel_config is not None and getattr(self, "qflash_parallel", None) is None:
                # context parallel without qflash's: diffusers' own dispatch
                _warn_once(
                    "flux-cp",
                    "qflash: context parallelism is enabled on a Flux attention; it runs diffusers' own attention "
                    "backend (not quantised)",
                )
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

            query, key, value, encoder_query, encoder_key, encoder_value = _flux_qkv_projections(
                attn, hidden_states, encoder_hidden_states
            )

            query = query.unflatten(-1, (-1, attn.head_dim))  # (B, S, H, D)
            key = key.unflatten(-1, (-1, attn.head_dim))
            value = value.unflatten(-1, (-1, attn.head_dim))

            if attn.added_kv_proj_dim is not None:
                encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
                encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
                encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            else:
                encoder_query = encoder_key = encoder_value = None

            hidden_states = self._prologue_attend(attn, query, key, value, encoder_query, encoder_key, encoder_value,
                                                  image_rotary_emb, attention_mask)
            hidden_states = hidden_states.flatten(2, 3)
            hidden_states = hidden_states.to(query.dtype)

            if encoder_hidden_states is not None:
                encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                    [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
                )
                hidden_states = attn.to_out[0](hidden_states.contiguous())
                hidden_states = attn.to_out[1](hidden_states)
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
                return hidden_states, encoder_hidden_states
            return hidden_states

        def _prologue_attend(self, attn, query, key, value, encoder_query, encoder_key, encoder_value,
                             image_rotary_emb, attn_mask):
            """The [text, image] concat of v, ``_prologue`` and ``_attend``: (B, S, H, D) parts in (encoder_*
            None in single-stream blocks), (B, S_txt + S_img, H, D) out. A processor that fuses all three
            (``fuse_prologue=True``) overrides this one step."""
            if encoder_value is not None:
                value = torch.cat([encoder_value, value], dim=1)
            query, key = self._prologue(attn, query, key, encoder_query, encoder_key, image_rotary_emb)
            return self._attend(query, key, value, attn_mask)

        def _prologue(self, attn, query, key, encoder_query, encoder_key, image_rotary_emb):
            """diffusers' q/k RMSNorm, [text, image] concat and RoPE; (B, S, H, D) in and out."""
            query = attn.norm_q(query)
            key = attn.norm_k(key)
            if encoder_query is not None:
                encoder_query = attn.norm_added_q(encoder_query)
                encoder_key = attn.norm_added_k(encoder_key)
                query = torch.cat([encoder_query, query], dim=1)
                key = torch.cat([encoder_key, key], dim=1)
            if image_rotary_emb is not None:
                query = _apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = _apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            return query, key

        def _attend(self, query, key, value, attn_mask):
            raise NotImplementedError(f"{type(self).__name__} must define _attend")

    class QFlashFluxAttnProcessor(_QFlashProcessorMixin, HookedFluxAttnProcessor):
        """diffusers' ``FluxAttnProcessor`` with ``qflash.sdpa(quant=...)`` as the attention.

        Same inputs and outputs: image tokens (B, S_img, C), optional text tokens (B, S_txt, C)
        (double-stream blocks: joint attention over [text, image]), optional attention mask
        ((B, S_k) key padding, or anything SDPA broadcasts to (B, H, S_q, S_k)), rotary
        embeddings (cos, sin). Returns image (and text) hidden states.
        """

        def _prologue_attend(self, attn, query, key, value, encoder_query, encoder_key, encoder_value,
                             image_rotary_emb, attn_mask):
            if getattr(self, "qflash_fuse_prologue", False) and getattr(self, "qflash_parallel", None) is None:
                from . import fused_prologue

                out = fused_prologue.flux_attention(attn, query, key, value, encoder_query, encoder_key,
                                                    encoder_value, image_rotary_emb, self.qflash_quant, attn_mask)
                if out is not None:
                    return out
            return super()._prologue_attend(attn, query, key, value, encoder_query, encoder_key, encoder_value,
                                            image_rotary_emb, attn_mask)

        def _prologue(self, attn, query, key, encoder_query, encoder_key, image_rotary_emb):
            if getattr(self, "qflash_fuse_prologue", False):  # presets quantising K/V inside attention
                from . import fused_prologue

                fused = fused_prologue.flux_norm_rope(attn, query, key, encoder_query, encoder_key, image_rotary_emb)
                if fused is not None:
                    return fused
            return super()._prologue(attn, query, key, encoder_query, encoder_key, image_rotary_emb)

        def _attend(self, query, key, value, attn_mask):
            """(B, S, H, D) in and out — what diffusers' "native" backend does, with qflash.sdpa."""
            if getattr(self, "qflash_parallel", None) is not None:
                return _parallel_attend(self.qflash_parallel, self.qflash_quant, query, key, value, attn_mask)
            if (
                attn_mask is not None
                and attn_mask.ndim == 2
                and attn_mask.shape[0] == query.shape[0]
                and attn_mask.shape[1] == key.shape[1]
            ):
                attn_mask = attn_mask[:, None, None, :]  # (B, S_k) key padding -> (B, 1, 1, S_k)
            q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
            # q is an (B, S, H, D) buffer seen as (B, H, S, D): qflash.sdpa writes its output in the
            # same memory order, so the permute back below is contiguous.
            return self._sdpa(q, k, v, attn_mask=attn_mask).permute(0, 2, 1, 3)

else:  # pragma: no cover - depends on the installed diffusers
    HookedFluxAttnProcessor = None
    QFlashFluxAttnProcessor = None


_QFLASH_TYPES = tuple(t for t in (QFlashAttnProcessor2_0, QFlashFluxAttnProcessor) if t is not None)


def _replacement_for(proc):
    """The qflash processor class for a native processor, or None if qflash leaves it alone."""
    if type(proc) is AttnProcessor2_0:
        return QFlashAttnProcessor2_0
    if FLUX_SUPPORTED and type(proc) is FluxAttnProcessor:
        return QFlashFluxAttnProcessor
    return None


def _roots(model_or_pipeline) -> list[torch.nn.Module]:
    if isinstance(model_or_pipeline, torch.nn.Module):
        return [model_or_pipeline]
    components = getattr(model_or_pipeline, "components", None)
    if isinstance(components, dict):
        return [c for c in components.values() if isinstance(c, torch.nn.Module)]
    raise TypeError(
        "model_or_pipeline must be a torch.nn.Module (e.g. FluxTransformer2DModel) or a diffusers pipeline "
        f"(an object with a .components dict), got {type(model_or_pipeline).__name__}"
    )


def _attention_modules(model_or_pipeline):
    seen: set[int] = set()
    for root in _roots(model_or_pipeline):
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            if hasattr(module, "set_processor") and hasattr(module, "processor"):
                yield module


def _register_hook_metadata() -> None:
    """diffusers' layer-skip hooks look processors up by exact class in a registry; give ours the
    entries of the classes they replace. Guarded: a private diffusers API that may change."""
    try:
        from diffusers.hooks._helpers import AttentionProcessorRegistry
    except ImportError:
        return
    pairs = [(QFlashAttnProcessor2_0, AttnProcessor2_0)]
    if FLUX_SUPPORTED:
        pairs.append((QFlashFluxAttnProcessor, FluxAttnProcessor))
    for ours, theirs in pairs:
        try:
            AttentionProcessorRegistry.register(ours, AttentionProcessorRegistry.get(theirs))
        except Exception as exc:  # noqa: BLE001 - optional nicety; never break apply()
            _warn_once("hook-registry", f"qflash: diffusers' layer-skip hooks will not know qflash processors ({exc})")


def _parallel_attend(parallel, quant, query, key, value, attn_mask):
    """Sequence-parallel Flux attention: this rank's [text shard, image shard] tokens, (B, S, H, D).

    Joint attention without a mask is order-free over keys, so the global sequence may be the
    ranks' local [text, image] pieces one after the other (how diffusers' context-parallel plan
    for Flux shards ``hidden_states`` and ``encoder_hidden_states``)."""
    from ..parallel import attention as parallel_attention

    if attn_mask is not None:
        raise NotImplementedError("qflash.integrations.diffusers: parallel= does not take an attention mask")
    return parallel_attention(query, key, value, group=parallel.group, mode=parallel.mode, quant=quant,
                              layout="NHD", ulysses_size=parallel.ulysses_size, check_ranks=parallel.check_ranks)


def _parallel_config(parallel):
    """``apply``'s ``parallel=``: None, a mode name, or a ``qflash.parallel.ParallelConfig``."""
    if parallel is None:
        return None
    from ..parallel import ParallelConfig

    if isinstance(parallel, str):
        return ParallelConfig(mode=parallel)
    if not isinstance(parallel, ParallelConfig):
        raise TypeError("parallel must be None, 'ulysses' / 'ring' / 'hybrid' or a qflash.parallel.ParallelConfig, "
                        f"got {type(parallel).__name__}")
    return parallel


def apply(model_or_pipeline, quant: str | QuantConfig = "int8", *, fallback: bool = True, parallel=None,
          fuse_prologue: bool = False) -> dict:
    """Install qflash attention into a diffusers model or pipeline; returns a summary.

    Args:
        model_or_pipeline: a diffusers model (any ``torch.nn.Module`` containing attention
            modules), or a pipeline, whose ``torch.nn.Module`` components are all processed.
        quant: qflash preset name or ``QuantConfig`` (see ``qflash.sdpa``).
        fallback: passed to ``qflash.sdpa`` (True: unsupported calls use PyTorch's SDPA).
        parallel: None, or sequence parallelism for the Flux attentions: a mode name ("ulysses",
            "ring", "hybrid"; the default process group) or a ``qflash.parallel.ParallelConfig``.
            Each rank then runs the model on its shard of the image and text tokens (and of
            ``img_ids`` / ``txt_ids``), and the Flux processors call ``qflash.parallel.attention``
            (README "Sequence parallel"). Generic SDPA processors (VAE, UNets) stay local.
        fuse_prologue: the q/k RMSNorm + RoPE + [text, image] concat before each attention done by
            one fused prologue that also writes the preset's quantised K/V
            (``qflash.integrations.fused_prologue``: three Triton launches, then
            ``qflash.attention(q, QuantizedKV)``), for Flux blocks and for generic processors with
            RMSNorm q/k norms; calls that do not match that pattern (a mask, gradients, other
            norms, ``parallel=``) run unfused. Presets whose K/V cannot be pre-quantised (``none``,
            ``int4``) get the fused RMSNorm + RoPE only (Flux). Forward only.

    Applying again changes ``quant`` in place and still remembers the first originals.

    Returns:
        ``{"flux": n, "sdpa": n, "updated": n, "skipped": {processor class name: count}}``.
    """
    resolve_quant(quant)
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback must be a bool, got {type(fallback).__name__}")
    parallel = _parallel_config(parallel)
    if not isinstance(fuse_prologue, bool):
        raise TypeError(f"fuse_prologue must be a bool, got {type(fuse_prologue).__name__}")
    replaced: Counter = Counter()
    skipped: Counter = Counter()
    updated = 0
    for module in _attention_modules(model_or_pipeline):
        proc = module.processor
        if isinstance(proc, _QFLASH_TYPES):
            cls = type(proc)
            module.set_processor(cls(quant, fallback=fallback, original=proc.qflash_original,
                                     parallel=parallel if cls is QFlashFluxAttnProcessor else None,
                                     fuse_prologue=fuse_prologue))
            updated += 1
            continue
        cls = _replacement_for(proc)
        if cls is None:
            skipped[type(proc).__name__] += 1
            continue
        module.set_processor(cls(quant, fallback=fallback, original=proc,
                                 parallel=parallel if cls is QFlashFluxAttnProcessor else None,
                                 fuse_prologue=fuse_prologue))
        replaced["flux" if cls is QFlashFluxAttnProcessor else "sdpa"] += 1
    if not replaced and not updated:
        hint = ""
        if FluxAttnProcessor is None or not FLUX_SUPPORTED:
            hint = f" (FluxAttnProcessor of diffusers {diffusers.__version__} is not supported by this qflash)"
        warnings.warn(
            "qflash.integrations.diffusers.apply found no FluxAttnProcessor or AttnProcessor2_0 to replace"
            f"{hint}; processors seen: {dict(skipped) or 'none'}",
            UserWarning,
            stacklevel=2,
        )
    _register_hook_metadata()
    return {"flux": replaced["flux"], "sdpa": replaced["sdpa"], "updated": updated, "skipped": dict(skipped)}


def remove(model_or_pipeline) -> int:
    """Put back the processors ``apply`` replaced (the same objects); returns how many."""
    n = 0
    for module in _attention_modules(model_or_pipeline):
        proc = module.processor
        if isinstance(proc, _QFLASH_TYPES):
            module.set_processor(proc.qflash_original)
            n += 1
    return n


@contextlib.contextmanager
def applied(model_or_pipeline, quant: str | QuantConfig = "int8", *, fallback: bool = True, parallel=None,
            fuse_prologue: bool = False):
    """``apply`` on entry, ``remove`` on exit (also on an exception); yields ``apply``'s summary."""
    summary = apply(model_or_pipeline, quant, fallback=fallback, parallel=parallel, fuse_prologue=fuse_prologue)
    try:
        yield summary
    finally:
        remove(model_or_pipeline)
