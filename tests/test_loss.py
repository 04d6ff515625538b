"""The chunked linear cross-entropy equals the plain loss on full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.kernels.loss import IGNORE_INDEX, linear_cross_entropy, naive_linear_cross_entropy


@pytest.mark.parametrize("tokens,chunk", [(37, 8), (64, 64), (5, 100)])
def test_chunked_loss_equals_full_logits(tokens, chunk):
    hidden = torch.randn(tokens, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (tokens,))
    labels[::4] = IGNORE_INDEX
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    want = naive_linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_loss_holds_one_block_of_logits():
    saved = []
    hidden = torch.randn(1024, 8, requires_grad=True)
    weight = torch.randn(300, 8, requires_grad=True)
    labels = torch.randint(0, 300, (1024,))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, labels, chunk_size=128)
    assert sum(saved) < 1024 * 300 // 4  # the full logits would be 1024 x 300


def test_under_autocast_the_head_runs_in_its_dtype_and_the_loss_in_fp32():
    """fp32 master weights under bf16 autocast: the head's inputs round to bf16, as an nn.Linear's would (the
    Triton kernel would otherwise run the head in fp32), then the loss is exact fp32 math on them."""
    hidden = torch.randn(96, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (96,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels, chunk_size=32)
    want = naive_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(got, naive_linear_cross_entropy(hidden, weight, labels), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(got, (hidden, weight))
    expected = torch.autograd.grad(want, (hidden, weight))
    for grad, reference in zip(grads, expected):
        assert grad.dtype == torch.float32  # back through the cast, to the fp32 masters
        torch.testing.assert_close(grad, reference.float(), rtol=0, atol=0)
