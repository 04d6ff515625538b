"""Helpers shared by the benchmarks in tools/: peak memory of one step, argument parsing."""

from __future__ import annotations

import argparse
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss_bytes() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _rss_high_water_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_rss_high_water() -> None:
    """Lower the RSS high-water mark to the current RSS (Linux: 5 written to clear_refs), so that a step's peak is
    its own and not an earlier step's or import's; where that is not allowed the mark stays (an upper bound)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Memory the step needs above what is held before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _reset_rss_high_water()
    before, high_water_before = _current_rss_bytes(), _rss_high_water_bytes()
    step()
    high_water = _rss_high_water_bytes()
    if high_water == high_water_before:
        print("warning: the step did not raise the RSS high-water mark; its peak is an upper bound", file=sys.stderr)
    return high_water - before


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
