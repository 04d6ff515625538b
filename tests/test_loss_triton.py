"""The Triton linear cross-entropy equals the plain loss on full logits, values and gradients.

The kernels run under the Triton interpreter on CPU tensors. Triton reads TRITON_INTERPRET when it is imported,
so every case runs in one child process started with it set (this file, run as a script), and each test here
reports its case's outcome from that run.
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
TIGHT = dict(rtol=1e-4, atol=1e-5)

# Row, vocabulary and hidden sizes are mostly not multiples of the blocks (16 unless a case says otherwise).
CASES = {
    "fp32": dict(n=37, d=20, v=50),
    "fp32-whole-blocks": dict(n=64, d=32, v=96),
    "fp32-fewer-rows-than-a-block": dict(n=5, d=16, v=17),
    "fp32-wide-vocab-tiles": dict(n=33, d=24, v=100, blocks=dict(block_v=32, block_d=32)),
    "fp32-default-blocks": dict(n=37, d=20, v=50, blocks={}),
    "fp32-every-label-ignored": dict(n=20, d=16, v=30, ignore_every=1),
    "fp32-weight-frozen": dict(n=37, d=20, v=50, weight_grad=False),
    "bf16-hidden-fp32-weight": dict(n=37, d=20, v=50, hidden_dtype=torch.bfloat16),  # the training loop's mix
    # bf16 x bf16 rounds the gradient of the logits to bf16 before its two products, and the gradients come
    # back in bf16: errors are ~0.5% of the largest entry (seeds 0-2), against the reference's fp32 products.
    "bf16": dict(n=37, d=20, v=50, hidden_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, grad_tol=2e-2),
}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


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
def test_triton_loss_equals_full_logits(interpreted, case):
    assert interpreted[case] == "ok", interpreted[case]


def _check_case(
    n: int,
    d: int,
    v: int,
    blocks: dict | None = None,
    ignore_every: int = 4,
    weight_grad: bool = True,
    hidden_dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype = torch.float32,
    grad_tol: float | None = None,
) -> None:
    """grad_tol: tolerance of the gradients relative to their largest entry, instead of TIGHT."""
    from parallel.sharding import IGNORE_INDEX
    from trainer.kernels.loss_triton import naive_linear_cross_entropy, triton_linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(n, d).to(hidden_dtype).requires_grad_()
    weight = torch.randn(v, d).to(weight_dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,))
    labels[::ignore_every] = IGNORE_INDEX
    blocks = dict(block_n=16, block_v=16, block_d=16) if blocks is None else blocks
    wrt = (hidden, weight) if weight_grad else (hidden,)
    scale = 0.37  # the backward is called with a grad other than 1

    got = triton_linear_cross_entropy(hidden, weight, labels, **blocks)
    want = naive_linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(got, want, **TIGHT)
    for a, b in zip(torch.autograd.grad(got * scale, wrt), torch.autograd.grad(want * scale, wrt)):
        assert a.dtype == b.dtype
        tol = TIGHT if grad_tol is None else dict(rtol=grad_tol, atol=grad_tol * float(b.abs().max()))
        torch.testing.assert_close(a, b, **tol)


def _widen_bf16_dot_operands() -> None:
    """Triton's interpreter stores bf16 as uint16 and its `tl.dot` multiplies those bit patterns
    (triton-lang/triton#11584, unsupported as of 3.9); widen bf16 operands to fp32 first, as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot
    interpreter.InterpreterBuilder.create_dot = lambda self, a, b, *rest: create_dot(self, widen(a), widen(b), *rest)


def _run_cases() -> dict[str, str]:
    _widen_bf16_dot_operands()
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
