"""Pre-attention kernels: fused work that writes attention operands (Flux's per-head RMSNorm +
rotary embedding: ``rmsnorm_rope``). Not attention kernels, so not a kernel family."""
