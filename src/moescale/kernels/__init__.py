"""Compiled kernels for platforms where XLA's own ops are far from what the hardware does.

`cpu`: C++ XLA:CPU handlers (jax.ffi) for the product-key memory's top-k and value read, built
on first use. Nothing here is imported by `import moescale`; layers load it when they choose it.
"""
