"""liger-kernel's fused linear cross-entropy, as `linear_cross_entropy` calls it on CUDA, equals the plain loss
on full logits in fp64, values and gradients.

liger's kernels run under the Triton interpreter on CPU tensors (its matmuls are torch's). Triton reads
TRITON_INTERPRET when it is imported, so every case runs in one child process started with it set (this file, run
as a script), and each test here reports its case's outcome from that run.

liger splits the N tokens into chunks of next_power_of_2(ceil(N / ceil(V / d))) rows, and the sizes below leave a
partial last chunk. Its kernel walks the vocabulary in blocks of min(32768, next_power_of_2(V)); a vocabulary wider
than one block takes the interpreter ~10 s per token row, so that loop is checked on the GPU only (the accuracy rows
of `python -m tools.bench.loss`, vocabulary 40003).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULT = "RESULT "
TIGHT = dict(rtol=1e-4, atol=1e-5)  # fp32 against fp64

CASES = {
    "fp32": dict(n=37, d=20, v=50),  # chunks of 16 rows: 16, 16, 5
    "fp32-one-row-per-chunk": dict(n=7, d=3, v=40),
    "fp32-every-label-ignored": dict(n=20, d=16, v=30, ignore_every=1),
    "fp32-head-frozen": dict(n=37, d=20, v=50, weight_grad=False),
    "fp32-trunk-frozen": dict(n=37, d=20, v=50, hidden_grad=False),  # liger alone would give the head no gradient
    # bf16 logits and their gradient are rounded to bf16 before the two gradient products: errors are ~0.7% of
    # the gradients' norm, against the reference's fp64 products on the same bf16 inputs.
    "bf16": dict(n=37, d=20, v=50, dtype=torch.bfloat16, tol=2e-2),
}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed"
)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    results = [line[len(RESULT) :] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not results:
        raise AssertionError(f"the interpreter run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(results[-1])


@pytest.mark.parametrize("case", CASES)
def test_liger_loss_equals_full_logits(interpreted, case):
    assert interpreted[case] == "ok", interpreted[case]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


def _check_case(
    n: int,
    d: int,
    v: int,
    ignore_every: int = 4,
    hidden_grad: bool = True,
    weight_grad: bool = True,
    dtype: torch.dtype = torch.float32,
    tol: float | None = None,
) -> None:
    """tol: bound on the relative error ||got - want|| / ||want|| of the loss and gradients, instead of TIGHT."""
    from parallel.sharding import IGNORE_INDEX
    from trainer.ops.loss import _liger_linear_cross_entropy, naive_linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(n, d).to(dtype).requires_grad_(hidden_grad)
    weight = torch.randn(v, d).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,))
    labels[::ignore_every] = IGNORE_INDEX
    wrt = [t for t in (hidden, weight) if t.requires_grad]
    reference = [t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight)]
    reference_wrt = [t for t in reference if t.requires_grad]
    scale = 0.37  # the backward is called with a grad other than 1, as the trainer's mean over tokens does

    got = _liger_linear_cross_entropy(hidden, weight, labels)
    want = naive_linear_cross_entropy(*reference, labels)
    assert got.dtype == torch.float32
    pairs = [(got, want), *zip(torch.autograd.grad(got * scale, wrt), torch.autograd.grad(want * scale, reference_wrt))]
    for a, b in pairs:
        assert a.dtype == (torch.float32 if a is got else dtype)
        if tol is None:
            torch.testing.assert_close(a.double(), b, **TIGHT)
        else:
            assert _relative_error(a, b) <= tol, _relative_error(a, b)


def _run_cases() -> dict[str, str]:
    results = {}
    for name, case in CASES.items():
        try:
            _check_case(**case)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=-3)
    return results


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    print(RESULT + json.dumps(_run_cases()))
