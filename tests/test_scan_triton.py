"""The Triton chunk scan (trainer/ops/fastweight/chunk_triton.py) equals the fp64 references, values and gradients.

The kernels run under the Triton interpreter on CPU tensors, where `chunk_scan` takes them as it does CUDA
tensors. Triton reads TRITON_INTERPRET when it is imported, so every case runs in one child process started
with it set (this file, run as a script), and each test here reports its case's outcome from that run. Block
sizes are 16 (the smallest `tl.dot` takes) unless a case says otherwise, and no size is a multiple of them.

The interpreter multiplies bf16 operands wrongly (triton 3.9: a bf16 x bf16 `tl.dot` is off by ~1e10 while
fp16 is right), so the low-precision case runs fp16 autocast, and the bf16 case checks what the kernels are
launched with.
"""

from __future__ import annotations

import functools
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
F64 = torch.float64
SMALL_BLOCKS = (16, 16, 16, 1)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    results = [line[len(RESULT) :] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not results:
        raise AssertionError(f"the interpreter run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(results[-1])


# --- the cases, run in the child -------------------------------------------------------------------


def _positions(*rows: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


def _leaves(*shapes, dtype=torch.float32):
    """Random inputs under test and fp64 copies of the same values for the reference."""
    values = [torch.randn(shape, dtype=F64) for shape in shapes]
    return [x.to(dtype).requires_grad_() for x in values], [x.clone().requires_grad_() for x in values]


def _assert_close(got, want, inputs, want_inputs, tol):
    """Output and every input's gradient under one random cotangent, relative to the reference's norm (exact
    where the reference is zero)."""
    cotangent = torch.randn_like(want)
    grads = torch.autograd.grad((got.double() * cotangent).sum(), inputs)
    want_grads = torch.autograd.grad((want * cotangent).sum(), want_inputs)
    for name, g, w in [("out", got, want), *zip([f"grad {i}" for i in range(len(grads))], grads, want_grads)]:
        error = float((g.double() - w).norm() / w.norm().clamp_min(1e-300))
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"


def check_packed(rows: tuple[tuple[int, ...], ...], chunk: int, h: int = 20, d: int = 18, tol: float = 1e-6):
    from trainer.ops.fastweight import chunk_scan, naive_fastweight
    from trainer.ops.fastweight.layout import build_layout

    pos = _positions(*rows)
    (z, v), (z64, v64) = _leaves((pos.shape[0], pos.shape[1], h), (pos.shape[0], pos.shape[1], d))
    got, _ = chunk_scan(z, v, build_layout(pos, chunk), 0.3)
    _assert_close(got, naive_fastweight(z64, v64, pos, chunk, 0.3), (z, v), (z64, v64), tol)


def check_pieces(lengths: tuple[int, ...], chunk: int, cut: int, h: int = 21, d: int = 17):
    """A sequence cut into two pieces mid-chunk, the second continuing from the first's (committed, pending)
    state, as context parallelism runs it: together they equal the whole sequence's prefix-sum reference, and
    the gradients flow back through the passed state."""
    from trainer.ops.fastweight import chunk_scan, naive_fastweight
    from trainer.ops.fastweight.layout import build_layout

    pos = _positions(lengths)
    (z, v), (z64, v64) = _leaves((1, pos.shape[1], h), (1, pos.shape[1], d))
    first, state = chunk_scan(z[:, :cut], v[:, :cut], build_layout(pos[:, :cut], chunk, continues_after=True), 0.3)
    assert state[1].abs().sum() > 0, "the cut should leave a chunk open: the pending state is under test"
    second_layout = build_layout(pos[:, cut:], chunk, continues_before=True)
    second, _ = chunk_scan(z[:, cut:], v[:, cut:], second_layout, 0.3, state=state)
    got = torch.cat([first, second], dim=1)
    _assert_close(got, naive_fastweight(z64, v64, pos, chunk, 0.3), (z, v), (z64, v64), 1e-6)


def check_normalized(lengths: tuple[int, ...], chunk: int):
    """The normalized write as the MLP runs it (unit keys, gated values through the kernels, the gate mass by
    `chunk_sum`) against its token-pair reference."""
    from trainer.ops.fastweight import chunk_scan, chunk_sum, gated_mean, naive_normalized_fastweight, write_keys
    from trainer.ops.fastweight.layout import build_layout

    pos = _positions(lengths, lengths[::-1])
    (z, v, logits), (z64, v64, logits64) = _leaves((2, pos.shape[1], 20), (2, pos.shape[1], 18), (2, pos.shape[1], 1))
    layout = build_layout(pos, chunk)
    gates = torch.sigmoid(logits)
    fast, _ = chunk_scan(write_keys(z, "normalized"), gates * v, layout, 0.7)
    got = gated_mean(fast, chunk_sum(gates, layout)[0])
    want = naive_normalized_fastweight(z64, v64, pos, chunk, 0.7, torch.sigmoid(logits64))
    _assert_close(got, want, (z, v, logits), (z64, v64, logits64), 1e-6)


def check_half_precision_autocast():
    """Under autocast the operands are the autocast dtype (fp16 here, see the module docstring)."""
    from trainer.ops.fastweight import chunk_scan, naive_fastweight
    from trainer.ops.fastweight.layout import build_layout

    pos = _positions((45, 30))
    (z, v), (z64, v64) = _leaves((1, 75, 40), (1, 75, 36))
    with torch.autocast("cpu", dtype=torch.float16):
        got, _ = chunk_scan(z, v, build_layout(pos, 8), 0.05)
    _assert_close(got, naive_fastweight(z64, v64, pos, 8, 0.05), (z, v), (z64, v64), 2e-2)


class _Launches:
    """Stands in for a kernel: counts its launches and records the dot dtype they asked for."""

    def __init__(self, kernel, run: bool = True):
        self.kernel, self.run, self.count, self.dot_dtypes = kernel, run, 0, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
            self.dot_dtypes.append(str(args[-2]))  # (..., lr, DOT_DTYPE, PRECISION)
            if self.run:
                self.kernel[grid](*args, **kwargs)

        return launch


def _kernel_launches(chunks: int, run: bool = True, autocast_dtype=None) -> dict[str, _Launches]:
    """Forward and backward of one TTT MLP (NTP, normalized write) on a sequence of `chunks` chunks of 4."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    import trainer.ops.fastweight.chunk_triton as kernels
    from trainer.ttt import TTTConfig
    from trainer.ttt.context import TTTContext
    from trainer.ttt.mlp import FastWeightMLP

    launches = {"walk": _Launches(kernels._walk_kernel, run), "reverse": _Launches(kernels._reverse_kernel, run)}
    originals = kernels._walk_kernel, kernels._reverse_kernel
    kernels._walk_kernel, kernels._reverse_kernel = launches["walk"], launches["reverse"]
    try:
        cfg = TTTConfig(method="ntp", chunk_size=4, layers=[0])
        mlp = FastWeightMLP(Qwen3MLP(Qwen3Config(hidden_size=16, intermediate_size=24)), cfg, TTTContext(cfg))
        with torch.no_grad():
            mlp.ttt_proj.weight.normal_()  # V != 0: the scan's gradients are not all zero
        x = torch.randn(1, 4 * chunks, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = mlp(x)
        out.float().square().sum().backward()
    finally:
        kernels._walk_kernel, kernels._reverse_kernel = originals
    return launches


def check_launches_do_not_grow_with_chunks():
    few, many = _kernel_launches(8), _kernel_launches(64)
    counts = {name: (few[name].count, many[name].count) for name in few}
    assert counts == {"walk": (2, 2), "reverse": (1, 1)}, counts  # forward walk, backward walk, reverse


def check_bf16_autocast_operands():
    launches = _kernel_launches(8, run=False, autocast_dtype=torch.bfloat16)
    dtypes = {dtype for kernel in launches.values() for dtype in kernel.dot_dtypes}
    assert dtypes == {"bf16"}, dtypes


def check_model_equals_torch_path():
    """A whole tiny model with TTT layers, packed documents: loss and every gradient on the kernels equal the
    torch loop's."""
    import trainer.ops.fastweight as fastweight
    from tests.conftest import randomize_ttt_parameters, tiny_qwen3
    from trainer.ttt import TTTConfig, patch_model

    model = patch_model(tiny_qwen3(dtype=torch.float32), TTTConfig(method="ntp", chunk_size=8, layers=[0, 1]))
    randomize_ttt_parameters(model, scale=0.1)  # non-zero targets and gates, so the fast weights matter
    tokens = torch.randint(model.config.vocab_size, (2, 45))
    pos = torch.cat([torch.arange(20), torch.arange(25)]).expand(2, -1)

    def loss_and_grads():
        model.zero_grad()
        logits = model(input_ids=tokens, position_ids=pos).logits
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads()
    runs_triton = fastweight._runs_triton
    fastweight._runs_triton = lambda *args: False
    try:
        want_loss, want_grads = loss_and_grads()
    finally:
        fastweight._runs_triton = runs_triton
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def check_inconsistent_inputs_fail_before_any_launch():
    """What a user could pass that the kernels would index past (a state of another batch, a transposed state, a
    short v, a layout of another length): one ValueError each, from the kernels' own entry point and from
    `chunk_scan`, and no kernel launched."""
    import trainer.ops.fastweight.chunk_triton as kernels
    from tests.test_fastweight import inconsistent_inputs
    from trainer.ops.fastweight import chunk_scan

    launches = _Launches(kernels._walk_kernel, run=False)
    original, kernels._walk_kernel = kernels._walk_kernel, launches
    try:
        for name, (z, v, layout, state, message) in inconsistent_inputs().items():
            for scan in (kernels.triton_chunk_scan, functools.partial(chunk_scan, clip=None)):
                try:
                    scan(z, v, layout, 1.0, state=state)
                except ValueError as err:
                    assert message in str(err) and "\n" not in str(err), f"{name}: {err}"
                else:
                    raise AssertionError(f"{name}: accepted")
    finally:
        kernels._walk_kernel = original
    assert launches.count == 0, launches.count


CASES = {
    "one document": lambda: check_packed(((37,),), 5),
    "packed documents, chunks of 4": lambda: check_packed(((7, 12, 13),), 4),
    "rows with their own documents": lambda: check_packed(((5, 13, 9), (20, 7)), 4),
    "one chunk: nothing is read": lambda: check_packed(((30,),), 64),
    "chunk of 1": lambda: check_packed(((19,),), 1),
    "default blocks": lambda: check_packed(((70, 61),), 16, h=150, d=70, tol=1e-5),
    "pieces, cut mid-chunk": lambda: check_pieces((41,), 8, 21),
    "pieces, a document starts in the second": lambda: check_pieces((26, 17), 8, 19),
    "normalized write": lambda: check_normalized((9, 14, 6), 4),
    "fp16 autocast": check_half_precision_autocast,
    "launches do not grow with the chunks": check_launches_do_not_grow_with_chunks,
    "bf16 operands under autocast": check_bf16_autocast_operands,
    "a model on the kernels equals the torch loop": check_model_equals_torch_path,
    "inconsistent inputs fail before any launch": check_inconsistent_inputs_fail_before_any_launch,
}
SMALL_BLOCK_CASES = set(CASES) - {"default blocks"}


@pytest.mark.parametrize("case", CASES)
def test_triton_scan(interpreted, case):
    assert interpreted[case] == "ok", interpreted[case]


def _run_all() -> dict[str, str]:
    import trainer.ops.fastweight.chunk_triton as kernels

    defaults = kernels.FORWARD_BLOCKS, kernels.READ_GRAD_BLOCKS, kernels.REVERSE_BLOCKS
    outcomes = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        small = SMALL_BLOCKS if name in SMALL_BLOCK_CASES else None
        kernels.FORWARD_BLOCKS, kernels.READ_GRAD_BLOCKS, kernels.REVERSE_BLOCKS = (small,) * 3 if small else defaults
        try:
            case()
            outcomes[name] = "ok"
        except Exception:
            outcomes[name] = traceback.format_exc(limit=4)
    return outcomes


if __name__ == "__main__":
    print(RESULT + json.dumps(_run_all()))
