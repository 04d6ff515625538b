"""Optimized ops, each beside the plain reference it is tested against: the linear cross-entropy head (liger-kernel
on CUDA, a chunked torch path elsewhere, `loss.py`) and the fast-weight chunk scan (`fastweight/`)."""
