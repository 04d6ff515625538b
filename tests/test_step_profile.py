"""`tools.gpu.step_profile` on CPU: a real profile of a tiny step, and the CUDA summary from stand-in profiler events
(kernels, a copy, a device-side annotation, the device time under its pre-2.4 name)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

import tools.gpu.step_profile as step_profile

KEYS = {"device", "wall_ms", "device_time_ms", "launches", "kernels", "cpu_time_ms", "cpu_ops"}


def test_a_cpu_step_is_summarized_by_its_ops():
    weight = torch.randn(32, 32, requires_grad=True)
    optimizer = torch.optim.AdamW([weight])

    def step():
        (weight @ weight).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    summary = json.loads(json.dumps(step_profile.profile_step(step, top=5)))
    assert set(summary) == KEYS and summary["device"] == "cpu"
    assert summary["launches"] > 0 and 0 < summary["device_time_ms"] == summary["cpu_time_ms"]
    assert summary["kernels"] == summary["cpu_ops"] and 0 < len(summary["cpu_ops"]) <= 5
    assert "aten::mm" in {row["name"] for row in summary["cpu_ops"]}
    assert all(row["calls"] > 0 and 0 <= row["percent"] <= 100 for row in summary["cpu_ops"])
    table = step_profile.format_profile(summary).splitlines()
    assert table[0].startswith("cpu: wall ") and "op calls" in table[0]
    assert table[2] == "| op (self CPU time) | calls | total ms | % |" and len(table) == 4 + len(summary["cpu_ops"])


class _StandInProfile:
    """torch.profiler.profile recording fixed events: on device, CUDA's device type and no self_device_time_total
    (an old torch's event)."""

    def __init__(self, activities):
        assert torch.profiler.ProfilerActivity.CUDA in activities

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def events(self):
        def cpu(name, us):
            return SimpleNamespace(name=name, device_type=DeviceType.CPU, self_cpu_time_total=us)

        def gpu(name, us, annotation=False):
            return SimpleNamespace(name=name, device_type=DeviceType.CUDA, self_cuda_time_total=us,
                                   is_user_annotation=annotation)  # fmt: skip

        long_name = "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(Params)"
        return [
            cpu("aten::mm", 30.0), cpu("cudaLaunchKernel", 5.0), cpu("cudaLaunchKernel", 5.0),
            cpu("Optimizer.step#AdamW.step", 5.0),
            gpu(long_name, 600.0), gpu(long_name, 200.0), gpu("triton_poi_fused_add_0", 150.0),
            gpu("Memcpy HtoD (Pageable -> Device)", 50.0),
            gpu("Optimizer.step#AdamW.step", 5000.0, annotation=True),
        ]  # fmt: skip


def test_a_cuda_step_is_summarized_by_its_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(step_profile, "profile", _StandInProfile)
    summary = step_profile.profile_step(lambda: None, top=2)
    assert set(summary) == KEYS and summary["device"] == "cuda"
    assert summary["launches"] == 3  # the copy is not a launch, the annotation not a kernel
    assert summary["device_time_ms"] == pytest.approx(1.0)
    gemm, triton = summary["kernels"]
    assert len(gemm["name"]) == step_profile.NAME_CHARS and gemm["name"].endswith("...")
    assert (gemm["calls"], gemm["total_ms"], gemm["percent"]) == (2, pytest.approx(0.8), pytest.approx(80.0))
    assert triton["name"] == "triton_poi_fused_add_0"
    assert [row["name"] for row in summary["cpu_ops"]] == ["aten::mm", "cudaLaunchKernel"]
    assert summary["cpu_time_ms"] == pytest.approx(0.045)
    text = step_profile.format_profile(summary)
    assert text.splitlines()[0].endswith("GPU time 1.00 ms, 3 kernel launches")
    assert "| kernel | calls | total ms | % |" in text and "| cudaLaunchKernel | 2 | 0.010 | 22.2 |" in text
