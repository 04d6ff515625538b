"""The chunked linear cross-entropy equals the plain loss on full logits, values and gradients; CUDA tensors go
to liger-kernel (whose own results are checked under the Triton interpreter in tests/test_loss_liger.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.ops.loss import IGNORE_INDEX, linear_cross_entropy, naive_linear_cross_entropy

REPO = Path(__file__).resolve().parents[1]


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
    fused kernel would otherwise run the head in fp32), then the loss is exact fp32 math on them."""
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


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so `linear_cross_entropy` takes its CUDA path on this machine."""

    is_cuda = property(lambda self: True)


@pytest.fixture
def liger_calls(monkeypatch) -> list[dict]:
    """Replaces liger's entry point by a recorder that answers with the plain loss."""
    functional = pytest.importorskip("liger_kernel.transformers.functional")
    calls = []

    def record(hidden, weight, labels, **options):
        calls.append(dict(hidden=hidden, weight=weight, labels=labels, **options))
        return naive_linear_cross_entropy(hidden, weight, labels)

    monkeypatch.setattr(functional, "liger_fused_linear_cross_entropy", record)
    return calls


@pytest.mark.parametrize(
    "hidden_dtype, weight_dtype, runs_in",
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),  # liger's matmuls need one dtype: the promoted one
    ],
)
def test_cuda_tensors_go_to_liger_with_sum_ignore_index_and_an_fp32_head_gradient(
    liger_calls, hidden_dtype, weight_dtype, runs_in
):
    hidden = torch.randn(9, 4).to(hidden_dtype).as_subclass(_OnCuda).requires_grad_()
    weight = torch.randn(7, 4).to(weight_dtype).as_subclass(_OnCuda).requires_grad_()
    labels = torch.tensor([1, 2, IGNORE_INDEX, 0, 6, 5, IGNORE_INDEX, 3, 4])
    linear_cross_entropy(hidden, weight, labels, chunk_size=2)
    (call,) = liger_calls
    assert call["hidden"].dtype == call["weight"].dtype == runs_in
    assert call["labels"] is labels
    options = {name: call[name] for name in ("ignore_index", "reduction", "accum_dtype")}
    assert options == {"ignore_index": IGNORE_INDEX, "reduction": "sum", "accum_dtype": torch.float32}


def test_fp64_cuda_tensors_stay_on_the_torch_path(liger_calls):
    """liger keeps its per-token loss in fp32; fp64 runs are the exactness tests."""
    hidden = torch.randn(9, 4, dtype=torch.float64).as_subclass(_OnCuda)
    weight = torch.randn(7, 4, dtype=torch.float64).as_subclass(_OnCuda)
    labels = torch.randint(0, 7, (9,))
    got = linear_cross_entropy(hidden, weight, labels)
    assert not liger_calls
    torch.testing.assert_close(got, naive_linear_cross_entropy(hidden, weight, labels), rtol=1e-12, atol=1e-12)


def test_cpu_tensors_never_import_liger():
    code = (
        "import sys, torch; from trainer.ops.loss import linear_cross_entropy as f; "
        "f(torch.randn(5, 3, requires_grad=True), torch.randn(4, 3), torch.tensor([0, 1, 2, 3, -100])).backward(); "
        "assert not any(name.startswith(('liger_kernel', 'triton')) for name in sys.modules), 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
