"""The CUDA backend: hand-written Triton kernels, one module per kernel family.

Conventions every kernel module follows:
- Wrappers take torch tensors and an optional `out=`; given `out`, they allocate nothing, so a decode step
  can be captured in a CUDA graph and replayed.
- Every kernel runs under TRITON_INTERPRET=1 on the CPU (how CI tests it) and on the H100.
- Activations between kernels are fp32 for decode (tiny, and it keeps the residual stream exact enough);
  weights are packed (ingot.quant.pack), the KV cache is fp16.
- The reference backend is the oracle: each kernel is tested against the plain-torch op it replaces.
"""
