"""The chunk scan's Triton kernels compile for Hopper (sm_90) without a GPU, multiply on tensor cores and spill
little: what the interpreter tests cannot show (the interpreter runs no compiler)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def reports():
    import triton

    from tools.gpu.scan_kernels_sm90 import _kernels, compile_report

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton build ships no CUDA toolchain")
    return [compile_report(name) for name in _kernels()]


def test_every_product_runs_on_hopper_tensor_cores(reports):
    for report in reports:
        assert report.hgmma > 0 and report.hmma == 0, report  # warpgroup MMA (wgmma), bf16 operands
        assert report.atomics > 0, report  # the partial reads are reduced in place, no partial buffers


def test_the_default_tiles_spill_little(reports):
    """Register pressure decides the tiles: a change that makes a kernel spill kilobytes per thread shows here."""
    for report in reports:
        assert report.stack_bytes <= 1024, report
