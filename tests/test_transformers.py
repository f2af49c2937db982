"""qflash.integrations.transformers: transformers' AttentionInterface on a tiny random Llama and on MiniLM.

Bounds below were measured on CPU (the reference path), torch 2.13, transformers 5.24:

- tiny Llama (GQA 4/2 heads, 2 layers, fp32, random weights with initializer_range 0.1 so that
  attention is far from uniform, left-padded batch of 2, 8 greedy tokens): ``qattn-none`` tokens
  == SDPA's; ``qattn-int8`` logits relL2 vs SDPA 3.9e-3 at the prefill step and 4.4e-3 over the
  whole SDPA sequence teacher-forced (asserted < 1e-2 each).
- MiniLM (all-MiniLM-L6-v2, 32 sentences, one padded batch), min cosine per sentence vs the
  model's eager fp32 attention: none 0.99999994, int8 0.999991, int8-fp8 0.99981, int4 0.99743,
  fp8 0.99960 (asserted: 0.999999, 0.99998, 0.9996, 0.995, 0.9992 — the issue's targets are
  none >= 0.99999, int8 >= 0.9999, int8-fp8 >= 0.999).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from helpers import rel_l2
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import qflash.integrations.transformers as qft
from qflash.bench import minilm

NAMES = qft.register()
PRESETS = ("none", "int8", "int8-fp8", "int4", "fp8")


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(qft, "_WARNED", set())


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the integration's calls into qflash.sdpa (so a test can tell qflash actually ran)."""
    calls = []
    real = qft.sdpa

    def spy(*args, **kwargs):
        calls.append(kwargs.get("quant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(qft, "sdpa", spy)
    return calls


# ----------------------------------------------------------------------------------------- registration

def test_register_names():
    assert NAMES == ["qattn"] + [f"qattn-{p}" for p in PRESETS]
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    for n in NAMES:
        assert n in AttentionInterface._global_mapping and n in AttentionMaskInterface._global_mapping
    assert AttentionInterface._global_mapping["qattn-int8-fp8"].qflash_quant == "int8-fp8"
    assert AttentionInterface._global_mapping["qattn"].qflash_quant == "int8"


def test_register_other_name_and_unregister():
    from transformers import AttentionInterface
    names = qft.register("myq", quant="fp8", fallback=False)
    try:
        assert names[0] == "myq" and "myq-int4" in names
        assert AttentionInterface._global_mapping["myq"].qflash_quant == "fp8"
    finally:
        assert sorted(qft.unregister("myq")) == sorted(names)
    assert "myq" not in AttentionInterface._global_mapping
    assert "qattn-int8" in AttentionInterface._global_mapping  # the other registration is untouched


@pytest.mark.parametrize("bad", ["qflash", "my-flash", "sdpa", "a/b", ""])
def test_register_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="flash|name"):
        qft.register(bad)


def test_register_rejects_bad_preset():
    with pytest.raises((ValueError, KeyError)):
        qft.register("qbad", quant="int3")


# ------------------------------------------------------------------------- the attention function itself

class _Mod(torch.nn.Module):
    def __init__(self, causal, groups=1):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def _qkv(B=2, Hq=4, Hk=2, Sq=10, Sk=10, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Sq, D, generator=g), torch.randn(B, Hk, Sk, D, generator=g),
            torch.randn(B, Hk, Sk, D, generator=g))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_function_matches_transformers_sdpa(causal, mask_kind, count_calls):
    q, k, v = _qkv()
    mask = None
    if mask_kind is not None:
        keep = torch.ones(2, 1, 10, 10, dtype=torch.bool)
        keep[1, :, :, :4] = False  # left padding of sequence 1
        keep[1, :, :4, :] = False  # ... whose padded query rows see nothing at all
        if causal:
            keep &= torch.ones(10, 10, dtype=torch.bool).tril()
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    mod = _Mod(causal, groups=2)
    fn = qft.attention_function("none")
    out, weights = fn(mod, q, k, v, mask, scaling=0.2)
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.2)
    assert weights is None and out.shape == (2, 10, 4, 32) and out.is_contiguous()
    assert count_calls == ["none"]
    assert not out.isnan().any()
    if mask_kind == "bool":  # rows whose keys are all masked: zeros, as PyTorch's SDPA
        assert out[1, :4].abs().max() == 0
    assert not ref.isnan().any()
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_function_fp32_additive_mask_with_half_inputs(dtype):
    q, k, v = (x.to(dtype) for x in _qkv(seed=3))
    keep = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    keep[0, :, :, 7:] = False
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)  # fp32 mask, half inputs
    mod = _Mod(False, groups=2)
    out, _ = qft.attention_function("none")(mod, q, k, v, mask)
    ref, _ = sdpa_attention_forward(mod, *(x.float() for x in (q, k, v)), keep)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_l2(out, ref) < 1e-2


def test_function_int8_gqa_decode_step():
    q, k, v = _qkv(Sq=1, Sk=40, seed=1)
    mod = _Mod(True, groups=2)
    out, _ = qft.attention_function("int8")(mod, q, k, v, None, scaling=None)
    ref, _ = sdpa_attention_forward(mod, q, k, v, None)
    err = rel_l2(out, ref)
    assert 0 < err < 0.03, err  # quantised (not bit-equal), and close


def test_function_causal_crops_static_cache_keys():
    q, k, v = _qkv(Sq=6, Sk=16, seed=2)
    mod = _Mod(True, groups=2)
    out, _ = qft.attention_function("none")(mod, q, k, v, None)
    ref, _ = sdpa_attention_forward(mod, q, k, v, None)
    assert rel_l2(out, ref) < 1e-5


def test_function_rejects_unsupported_mask():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="unsupported attention mask"):
        qft.attention_function("int8")(_Mod(False, 2), q, k, v, torch.ones(2, 1, 10, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="unsupported attention mask"):
        qft.attention_function("int8")(_Mod(False, 2), q, k, v, object())


# ----------------------------------------------------------------------------------- tiny Llama decoder

def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
           "initializer_range": 0.1, "attn_implementation": "sdpa"}
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _generate(model, impl):
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding: the padding mask path
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module")
def llama_runs():
    model = tiny_llama()
    return {impl: _generate(model, impl) for impl in ("sdpa", "eager")}


def test_tiny_llama_generate_none_matches_sdpa(llama_runs, count_calls):
    model = tiny_llama()
    seq, logits = _generate(model, "qattn-none")
    ref_seq, ref_logits = llama_runs["sdpa"]
    assert seq.shape == (2, 20)
    assert torch.equal(seq, ref_seq)
    assert rel_l2(logits, ref_logits) < 1e-5
    # prefill + 7 decode steps, 2 layers each, all through qflash
    assert count_calls == ["none"] * 16


def test_tiny_llama_generate_int8(llama_runs, count_calls):
    model = tiny_llama()
    seq, logits = _generate(model, "qattn-int8")
    ref_seq, ref_logits = llama_runs["sdpa"]
    assert seq.shape == ref_seq.shape and set(count_calls) == {"int8"} and len(count_calls) == 16
    # the prefill step sees the same inputs; later steps only while the tokens agree, so compare the
    # logits of the whole SDPA sequence teacher-forced too (real tokens only)
    step0 = rel_l2(logits[0], ref_logits[0])
    am = torch.ones_like(ref_seq)
    am[1, :4] = 0
    with torch.no_grad():
        forced = model(input_ids=ref_seq, attention_mask=am).logits
        model.set_attn_implementation("sdpa")
        forced_ref = model(input_ids=ref_seq, attention_mask=am).logits
    keep = am.bool()
    forced_err = rel_l2(forced[keep], forced_ref[keep])
    print(f"\ntiny Llama qattn-int8 logits relL2 vs SDPA: prefill {step0:.2e}, teacher-forced {forced_err:.2e}")
    assert 0 < step0 < 1e-2, step0
    assert 0 < forced_err < 1e-2, forced_err


def test_training_with_attention_dropout_raises():
    model = tiny_llama(attention_dropout=0.1)
    model.set_attn_implementation("qattn-int8")
    model.train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(input_ids=torch.randint(0, 128, (1, 8)))


def test_training_without_dropout_has_gradients():
    model = tiny_llama()
    model.set_attn_implementation("qattn-int8")
    model.train()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    g = model.model.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_sliding_window_falls_back_with_one_warning(fresh_warnings, count_calls):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                        sliding_window=4, initializer_range=0.2, attn_implementation="sdpa")
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.set_attn_implementation("qattn-int8")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = model(input_ids=ids).logits
            model(input_ids=ids)
    msgs = [str(w.message) for w in rec if "sliding window" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert count_calls == []  # not quantised: transformers' sdpa ran
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------ MiniLM (real model)

HAS_MINILM, MINILM_WHY = minilm.available()

SENTENCES = list(minilm.SENTENCES) + [
    "The quick brown fox jumps over the lazy dog.",
    "It rained all night and the river rose above its banks.",
    "She bought three apples, two pears and a melon at the market.",
    "How do I reset my password?",
    "The stock market fell sharply after the central bank raised interest rates.",
    "A dog runs across a snowy field.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Where is the nearest train station?",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
    "Please close the window before you leave.",
    "Neural networks learn representations from data by gradient descent.",
    "The meeting has been moved to Thursday afternoon.",
    "Mount Everest is the highest mountain above sea level.",
    "He forgot his umbrella on the bus again.",
    "Compilers translate source code into machine instructions.",
    "The children built a sandcastle on the beach.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "My flight was delayed by two hours because of fog.",
    "The museum displays paintings from the Renaissance period.",
    "Can you recommend a good book about history?",
    "Electric cars are becoming cheaper every year.",
    "The chef added a pinch of salt to the soup.",
    "A short sentence.",
    ("Long sequences of tokens make attention quadratic in time and memory, which is why efficient kernels "
     "matter so much for large language models."),
]
# min cosine over the 32 sentences vs eager fp32 that each preset must reach (measured values in the docstring)
MINILM_MIN_COSINE = {"none": 0.999999, "int8": 0.99998, "int8-fp8": 0.9996, "int4": 0.995, "fp8": 0.9992}


@pytest.fixture(scope="module")
def minilm_model():
    if not HAS_MINILM:
        pytest.skip(MINILM_WHY)
    tok, model = minilm.load(torch.device("cpu"))
    model.set_attn_implementation("eager")
    ref = minilm.embeddings(tok, model, SENTENCES)
    return tok, model, ref


def test_minilm_sentences_are_a_padded_batch():
    assert len(SENTENCES) == 32 and len(set(SENTENCES)) == 32


@pytest.mark.skipif(not HAS_MINILM, reason=MINILM_WHY)
@pytest.mark.parametrize("preset", PRESETS)
def test_minilm_embedding_cosine(minilm_model, preset, count_calls):
    tok, model, ref = minilm_model
    model.set_attn_implementation(f"qattn-{preset}")
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padded
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert not hidden.isnan().any()  # padded positions included
    m = batch["attention_mask"].unsqueeze(-1).float()  # minilm.embeddings' pooling, on this one forward
    emb = torch.nn.functional.normalize((hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=-1)
    print(f"\nMiniLM qattn-{preset}: cosine vs eager fp32 min {cos.min().item():.7f} mean {cos.mean().item():.7f}")
    assert cos.min().item() >= MINILM_MIN_COSINE[preset]
    assert count_calls == [preset] * 6  # qflash ran, in each of the 6 layers


@pytest.mark.skipif(not HAS_MINILM, reason=MINILM_WHY)
def test_minilm_padding_mask_is_applied(minilm_model):
    tok, model, _ = minilm_model
    model.set_attn_implementation("qattn-none")
    alone = minilm.embeddings(tok, model, [SENTENCES[0]])  # no padding
    batched = minilm.embeddings(tok, model, [SENTENCES[0], SENTENCES[-1]])[:1]  # padded to the long one
    assert torch.nn.functional.cosine_similarity(alone, batched).item() > 0.999999
