"""Optimized ops, each beside the plain reference it is tested against: the linear cross-entropy head and
its CUDA kernels."""
