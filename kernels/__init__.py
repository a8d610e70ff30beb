"""Triton kernels for the TTT hot path, each beside its plain-torch reference.

One file per kernel: the Triton kernel, an autograd Function, the torch reference and a public
function that dispatches between them (``dispatch.use_triton``): Triton on CUDA, the reference
elsewhere (CPU). Tests run the Triton versions on CPU under ``TRITON_INTERPRET=1``.
"""
