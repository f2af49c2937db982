"""The portable Triton kernel family: any CUDA GPU Triton supports, and the CPU interpreter (tests).

Modules: ``attn_fwd`` / ``attn_bwd`` / ``quantize`` (``@triton.jit`` kernels, math only),
``launch`` / ``bwd_launch`` (launchers: allocate, grid, pick tiles), ``fastlaunch`` (cheap
relaunch of compiled kernels), ``tuning`` (every tuning number of the family, per GPU),
``support`` (what it runs, as data). ``FAMILY`` is what the dispatcher registers; importing this
package imports no Triton (the launchers are imported on the first call).
"""

from __future__ import annotations

from ..family import Family
from .support import SUPPORT, kernel_support

__all__ = ["FAMILY", "PortableFamily"]


class PortableFamily(Family):
    name = "portable"
    support = SUPPORT

    def check_extra(self, spec, q, k, v, attn_mask):
        ok, why = kernel_support(spec.quant, q.shape[-1])
        return None if ok else why

    def forward(self, spec, q, k, v, attn_mask):
        from .launch import attention_fwd, call_quant

        # small calls of FP8 P·V presets keep P·V in the input dtype (tuning.FLOAT_PV_MAX_WORK)
        return attention_fwd(q, k, v, call_quant(q, k, spec.quant), causal=spec.causal != "none", attn_mask=attn_mask,
                             scale=spec.scale, return_lse=spec.return_lse, out_layout=spec.layout,
                             top_left=spec.causal == "top_left")

    # pre-quantised K/V (qflash.quant.kv.QuantizedKV; protocol in kernels/dispatch.py)
    def supports_kv(self, spec, q, qkv, attn_mask, *, explicit=False):
        ok, why = self.supports(spec, q, qkv.k, qkv.k, attn_mask, explicit=explicit)
        if ok and (q.numel() == 0 or qkv.seq_len == 0):
            return False, "empty dimension (the reference family returns the empty result)"
        return ok, why

    def forward_kv(self, spec, q, qkv, attn_mask):
        from .launch import attention_fwd_kv

        return attention_fwd_kv(q, qkv, spec.quant, causal=spec.causal != "none", attn_mask=attn_mask,
                                scale=spec.scale, return_lse=spec.return_lse, out_layout=spec.layout,
                                top_left=spec.causal == "top_left")

    def kv_order(self, cfg, device, dtype, head_dim):
        ok, _ = kernel_support(cfg, head_dim)
        return "keys" if ok and self.support.device_ok(device, False) is None else None

    def backward(self, spec, q, k, v, out, lse, grad_out, grad_lse, attn_mask, *, mask_grad, grad_buffers=None):
        from .bwd_launch import ste_backward

        recompute = out is None or lse is None or lse.numel() == 0
        return ste_backward(q, k, v, grad_out, grad_lse, spec.quant, out=out, lse=lse, causal=spec.is_causal,
                            attn_mask=attn_mask, scale=spec.scale, recompute=recompute, lowbit=spec.bwd_lowbit,
                            mask_grad=mask_grad, top_left=spec.top_left, grad_buffers=grad_buffers)

    def tuning(self, device) -> str:
        from . import tuning

        return tuning.describe(device)


FAMILY = PortableFamily()
