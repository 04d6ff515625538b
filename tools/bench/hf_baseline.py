"""The training step a user would run instead of this framework: plain transformers, measured as a baseline.

    python -m tools.bench.hf_baseline [--model qwen3-0.6b] [--seq-len 32768] [--steps 3] [--warmup 2]
                                [--checkpointing auto|on|off] [override ...]

The model is a zoo model's config (`conf/model/*.yaml`, composed as `ttt-train` composes it, overrides such as
`model.config.num_hidden_layers=2` appended), built with `AutoModelForCausalLM.from_config` and random init:
no TTT patching (ttt=none), SDPA attention, parameters in the framework's master dtype (fp32 for a bf16 model
on CUDA), bf16 autocast on CUDA, the model's own loss (`model(input_ids=..., labels=...)`, full logits),
`torch.optim.AdamW` (fused on CUDA), gradient clipping at 1.0, one random document of `seq_len` tokens per step.
Activation checkpointing is transformers' own switch; `auto` turns it on only where the step without it runs
out of memory, and keeps both attempts. Peak memory is CUDA's, over the timed steps, above what was allocated
before the model was built (as `tools.gpu.check` measures the framework's step).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from transformers import AutoModelForCausalLM

from tools.cli import OneLineErrorParser, positive_int
from tools.measure import synchronize
from trainer.compose import compose_config
from trainer.config import job_config
from trainer.model import master_dtype, model_config
from trainer.planning.memory import GIB

GRAD_CLIP = 1.0
LR = 1e-4  # the step's cost does not depend on it


@dataclass(frozen=True)
class HFStepTiming:
    """One attempt at timing the plain transformers step."""

    model: str
    seq_len: int
    checkpointing: bool
    step_s: list[float]  # the timed steps, after the warm-up ones
    losses: list[float]  # every step's loss, warm-up included
    peak_bytes: int | None  # CUDA only: the timed steps' peak above what was allocated before the model was built
    error: str | None = None  # the out-of-memory error that ended this attempt
    without_checkpointing: HFStepTiming | None = None  # checkpointing=None: the attempt that ran out of memory

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.step_s) if self.step_s else None

    def summary(self) -> dict:
        return {**asdict(self), "median_step_s": self.median_s}


def build_hf_step(
    model_name: str, device: torch.device, checkpointing: bool, overrides: Sequence[str] = (), seed: int = 0
) -> Callable[[int], torch.Tensor]:
    """The plain transformers model and optimizer of `model_name` on `device`, and one optimizer step on a random
    document of a given length; the step returns its (detached) loss."""
    model_cfg = job_config(compose_config([f"model={model_name}", "ttt=none", *overrides])).model
    torch.manual_seed(seed)
    with device:  # random init where the model trains, as `.to(device)` would leave it, without the copy
        model = AutoModelForCausalLM.from_config(
            model_config(model_cfg), dtype=master_dtype(model_cfg.dtype, device, "single"), attn_implementation="sdpa"
        )
    if checkpointing:
        model.activation_checkpointing_enable()  # transformers' own switch (gradient_checkpointing_enable's new name)
    model.train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=cuda)
    vocab = model.config.vocab_size

    def step(seq_len: int) -> torch.Tensor:
        tokens = torch.randint(vocab, (1, seq_len), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss  # labels shift inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _free_memory(device: torch.device) -> None:
    gc.collect()  # an out-of-memory error's traceback keeps the failed step's frames in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _attempt(
    model_name: str, seq_len: int, device: torch.device, steps: int, warmup: int, checkpointing: bool, overrides
) -> HFStepTiming:
    """Build, warm up and time the step; an out-of-memory error ends the attempt and is recorded."""
    _free_memory(device)
    before = _allocated(device)
    seconds, losses, peak, error = [], [], None, None
    try:
        step = build_hf_step(model_name, device, checkpointing, overrides)
        losses += [step(seq_len) for _ in range(warmup)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            synchronize(device)
            began = time.perf_counter()
            losses.append(step(seq_len))
            synchronize(device)
            seconds.append(time.perf_counter() - began)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before
    except torch.cuda.OutOfMemoryError as err:
        error = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return HFStepTiming(model_name, seq_len, checkpointing, seconds, [float(x) for x in losses], peak, error)


def time_hf_step(
    model_name: str,
    seq_len: int,
    device: torch.device,
    steps: int = 3,
    warmup: int = 2,
    checkpointing: bool | None = None,
    overrides: Sequence[str] = (),
) -> HFStepTiming:
    """`steps` timed plain transformers steps after `warmup` untimed ones. checkpointing=None turns activation
    checkpointing on only when the step without it runs out of memory (that attempt is kept in the result)."""
    timing = _attempt(model_name, seq_len, device, steps, warmup, bool(checkpointing), overrides)
    if checkpointing is None and timing.error is not None:
        retry = _attempt(model_name, seq_len, device, steps, warmup, True, overrides)
        timing = replace(retry, without_checkpointing=timing)
    _free_memory(device)
    return timing


def markdown_table(timing: HFStepTiming) -> str:
    lines = ["| model | tokens | checkpointing | median step | peak memory | notes |", "|---|---:|---|---:|---:|---|"]
    for attempt in (timing.without_checkpointing, timing):
        if attempt is None:
            continue
        median = "" if attempt.median_s is None else f"{attempt.median_s:.3f} s"
        peak = "" if attempt.peak_bytes is None else f"{attempt.peak_bytes / GIB:.2f} GiB"
        notes = attempt.error or f"median of {len(attempt.step_s)}, last loss {attempt.losses[-1]:.3f}"
        on = "on" if attempt.checkpointing else "off"
        lines.append(f"| {attempt.model} | {attempt.seq_len} | {on} | {median} | {peak} | {notes} |")
    return "\n".join(lines)


CHECKPOINTING = {"auto": None, "on": True, "off": False}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m tools.bench.hf_baseline", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen3-0.6b", help="a conf/model/*.yaml name (default qwen3-0.6b)")
    parser.add_argument("--seq-len", type=positive_int, default=32768)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--checkpointing", choices=CHECKPOINTING, default="auto")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.config.num_hidden_layers=2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    timing = time_hf_step(
        args.model, args.seq_len, device, args.steps, args.warmup, CHECKPOINTING[args.checkpointing], args.overrides
    )
    print(markdown_table(timing))


if __name__ == "__main__":
    main()
