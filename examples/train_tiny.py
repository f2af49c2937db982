"""Train a tiny causal transformer with qflash attention and with PyTorch SDPA; compare losses.

    python examples/train_tiny.py                      # GPU if there is one, else CPU (interpreter)
    python examples/train_tiny.py --steps 200 --seq 256 --dim 256 --heads 2 --layers 2 --lr 1e-3 --dtype bf16

Every run starts from the same weights and sees the same batches; only the attention differs:

- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` (forward and backward by PyTorch);
- ``qflash none``: ``torch.ops.qflash.attention_fwd`` (Triton forward) and its autograd
  (``qflash::attention_bwd``, the Triton backward), exact up to the dtype;
- ``qflash int8``: INT8 Q/K forward, straight-through backward (exact attention's gradient);
- ``qflash none + INT8 bwd``: exact forward, the low-bit INT8 backward (``lowbit="int8"``);
- ``qflash int8 + INT8 bwd``: both low-bit.

The task is next-token prediction on sequences where each token is drawn from a fixed random
table of successors of the token two places back (plus noise): the loss only falls below the
unigram level once attention learns to look back, so differences between attention
implementations show up in the loss curves. Prints a table of losses and the
largest relative gap to ``sdpa``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU: the Triton kernels run through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qflash.config import resolve_quant


class _LowbitAttention(torch.autograd.Function):
    """Attention with a chosen forward preset and the INT8 backward.

    ``torch.ops.qflash.attention_fwd(..., bwd_lowbit="int8")`` runs the same INT8 backward but
    keeps q and k in the input dtype; this calls the launchers directly to keep less: after an
    exact forward only INT8 codes of q and k are kept (``quantize_for_backward`` at forward time,
    about half the bytes of bf16 q and k); after a quantised one q, k, v are kept and the backward
    recomputes the exact O and lse (``ste_backward``).
    """

    @staticmethod
    def forward(ctx, q, k, v, quant: str, causal: bool):
        from qflash.kernels.portable.bwd_launch import quantize_for_backward
        from qflash.kernels.portable.launch import attention_fwd

        cfg = resolve_quant(quant)
        out, lse = attention_fwd(q, k, v, cfg, causal=causal, return_lse=True)
        ctx.cfg, ctx.causal = cfg, causal
        ctx.exact = not (cfg.quantizes_qk or cfg.quantizes_pv)
        if ctx.exact:
            c = quantize_for_backward(q, k)
            ctx.save_for_backward(v, out, lse, c.q_codes, c.q_scale, c.k_codes, c.k_scale, c.k_mean, c.row_bias)
        else:
            ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from qflash.kernels.portable.bwd_launch import BwdCodes, attention_bwd, ste_backward

        if ctx.exact:
            v, out, lse, *codes = ctx.saved_tensors
            dq, dk, dv, _ = attention_bwd(None, None, v, out, lse, grad_out, causal=ctx.causal, lowbit="int8",
                                          codes=BwdCodes(*codes))
        else:
            q, k, v = ctx.saved_tensors
            dq, dk, dv, _ = ste_backward(q, k, v, grad_out, None, ctx.cfg, causal=ctx.causal, lowbit="int8")
        return dq, dk, dv, None, None


def make_attention(kind: str):
    """(q, k, v) HND -> causal attention output, for one of the variants in the module doc."""
    backend = "auto" if torch.cuda.is_available() else "triton"
    if kind == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if kind.endswith("+ INT8 bwd"):
        quant = kind.split()[1]
        return lambda q, k, v: _LowbitAttention.apply(q, k, v, quant, True)
    quant = kind.split()[1]
    from qflash.ops import call_attention_fwd

    # return_lse=True keeps the lse for the backward (no recompute of the exact forward)
    return lambda q, k, v: call_attention_fwd(q, k, v, quant, causal=True, return_lse=True, backend=backend)[0]


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, attn):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, C // self.heads).unbind(2)  # (B, S, H, D)
        a = self.attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # NHD buffers, HND views
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, C))
        return x + self.mlp(self.ln2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seq: int, attn):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, attn) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def make_batches(steps: int, batch: int, seq: int, vocab: int, seed: int, device, n_succ: int = 1) -> list[torch.Tensor]:
    """Token i is one of 3 likely successors of token i - 2 (a random table) + 10% noise: the
    next token depends on the one before the current one, so the model must learn attention."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab, max(n_succ, 1)), generator=g)
    out = []
    for _ in range(steps):
        t = torch.empty(batch, seq + 1, dtype=torch.long)
        t[:, :2] = torch.randint(0, vocab, (batch, 2), generator=g)
        for i in range(2, seq + 1):
            nxt = table[t[:, i - 2], torch.randint(0, n_succ, (batch,), generator=g)] if n_succ > 1 else t[:, i - 2]
            noise = torch.rand(batch, generator=g) < 0.1
            t[:, i] = torch.where(noise, torch.randint(0, vocab, (batch,), generator=g), nxt)
        out.append(t.to(device))
    return out


def train(kind: str, *, steps: int = 20, batch: int = 8, seq: int = 64, vocab: int = 16, dim: int = 64,
          heads: int = 1, layers: int = 1, lr: float = 1e-2, seed: int = 0, device=None,
          dtype: torch.dtype = torch.float32) -> list[float]:
    """Loss per step of one variant (same init and data for every variant given the seed)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = TinyLM(vocab, dim, heads, layers, seq, make_attention(kind)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for tokens in make_batches(steps, batch, seq, vocab, seed + 1, device):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{kind}: loss became {loss.item()}")
        losses.append(loss.item())
    return losses


KINDS = ("sdpa", "qflash none", "qflash int8", "qflash none + INT8 bwd", "qflash int8 + INT8 bwd")


def max_rel_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import triton_interpreter_shim

        triton_interpreter_shim.apply()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    kw = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "dim": args.dim, "heads": args.heads,
          "layers": args.layers, "vocab": args.vocab, "lr": args.lr, "seed": args.seed, "dtype": dtype}
    curves = {kind: train(kind, **kw) for kind in KINDS}
    ref = curves["sdpa"]
    every = max(1, args.steps // 6)
    shown = list(range(0, args.steps, every)) + ([args.steps - 1] if (args.steps - 1) % every else [])
    print(f"# tiny LM, {args}: loss per step")
    print("| variant | " + " | ".join(f"step {i + 1}" for i in shown) + " | max rel. gap to sdpa |")
    print("|---|" + "---|" * len(shown) + "---|")
    for kind, c in curves.items():
        print(f"| {kind} | " + " | ".join(f"{c[i]:.4f}" for i in shown) + f" | {max_rel_gap(c, ref):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
