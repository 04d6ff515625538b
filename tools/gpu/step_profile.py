"""Where one step's time goes: one call profiled with torch.profiler, summarized as JSON and a markdown table.

    summary = profile_step(step)        # warm the step up first: a first call compiles and allocates
    print(format_profile(summary))

On CUDA the summary ranks the kernels (and copies) by their time on the GPU and counts the kernels launched; on
CPU, where nothing runs on a device, it ranks the operators by their own CPU time and counts their calls
(`"device": "cpu"`). Both list the operators by self CPU time, which shows a step bound by launches and Python.

It reads the profiler's individual events (`prof.events()`), public since torch 2.0, and their device time under
either name (`self_device_time_total`, `self_cuda_time_total` before torch 2.4). It does not use `key_averages()`:
that groups events by name only, so a `record_function` range (the optimizer's `Optimizer.step#AdamW.step`) and
its device-side twin, which spans every kernel inside it, merge into one row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

NAME_CHARS = 80
COPIES = ("Memcpy", "Memset")  # device activities that are not kernel launches


def _truncated(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def _self_device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _totals(events, time_of: Callable[[object], float]) -> dict[str, tuple[int, float]]:
    """Per name: calls and total microseconds."""
    totals: dict[str, tuple[int, float]] = {}
    for event in events:
        calls, us = totals.get(event.name, (0, 0.0))
        totals[event.name] = (calls + 1, us + time_of(event))
    return totals


def _total_ms(totals: dict[str, tuple[int, float]]) -> float:
    return sum(us for _, us in totals.values()) / 1e3


def _ranked(totals: dict[str, tuple[int, float]], top: int) -> list[dict]:
    """The `top` names by total time, largest first: calls, total ms, % of all names' time."""
    whole = sum(us for _, us in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return [
        {"name": _truncated(name), "calls": calls, "total_ms": us / 1e3, "percent": 100 * us / whole}
        for name, (calls, us) in ranked
    ]


def profile_step(step: Callable[[], object], top: int = 15) -> dict:
    """Profile one call of `step` and summarize it (see the module docstring); a JSON-able dict."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - began
    events = prof.events()
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    # A device-side user annotation spans the kernels inside its range: counting it would count them twice.
    on_device = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    cpu_times = _totals(cpu_ops, lambda e: float(e.self_cpu_time_total))
    summary = {"device": "cuda" if on_device else "cpu", "wall_ms": 1e3 * wall_s}
    summary["cpu_time_ms"] = _total_ms(cpu_times)
    summary["cpu_ops"] = _ranked(cpu_times, top)
    if on_device:
        device_times = _totals(on_device, _self_device_us)
        summary["device_time_ms"] = _total_ms(device_times)
        summary["launches"] = sum(not e.name.startswith(COPIES) for e in on_device)
        summary["kernels"] = _ranked(device_times, top)
    else:  # the ops are what ran: their self CPU time is the step's work
        summary["device_time_ms"] = summary["cpu_time_ms"]
        summary["launches"] = len(cpu_ops)
        summary["kernels"] = summary["cpu_ops"]
    return summary


def _table(rows: list[dict], what: str) -> list[str]:
    lines = [f"| {what} | calls | total ms | % |", "|---|---:|---:|---:|"]
    for row in rows:
        name = row["name"].replace("|", "\\|")
        lines.append(f"| {name} | {row['calls']} | {row['total_ms']:.3f} | {row['percent']:.1f} |")
    return lines


def format_profile(summary: dict) -> str:
    """The summary as markdown: one line of totals, the kernels (CPU: ops) table, and on CUDA the CPU ops table."""
    cuda = summary["device"] == "cuda"
    work, launched = ("GPU time", "kernel launches") if cuda else ("CPU time", "op calls")
    head = f"{summary['device']}: wall {summary['wall_ms']:.2f} ms, {work} {summary['device_time_ms']:.2f} ms, "
    head += f"{summary['launches']} {launched}"
    ops = "op (self CPU time)"
    lines = [head, "", *_table(summary["kernels"], "kernel" if cuda else ops)]
    if cuda:
        lines += ["", f"CPU time {summary['cpu_time_ms']:.2f} ms", "", *_table(summary["cpu_ops"], ops)]
    return "\n".join(lines)
