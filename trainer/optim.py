"""AdamW (fused where the device supports it) and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on the base model's matrices only; norms, biases and other vectors are not decayed.
    The TTT parameters (`ttt_conv`, `ttt_proj`) are new and start at their drop-in values: they get their own
    peak lr (`optim.ttt_lr`; continued training of a released model moves its own weights far more gently)
    and no weight decay, which would only pull them back to the drop-in."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ttt = [p for name, p in named if ".ttt_" in name]
    base = [p for name, p in named if ".ttt_" not in name]
    groups = [
        {"params": [p for p in base if p.dim() >= 2], "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
        {"params": [p for p in base if p.dim() < 2], "weight_decay": 0.0, "peak_lr": cfg.lr},
        {"params": ttt, "weight_decay": 0.0, "peak_lr": cfg.ttt_lr},
    ]
    groups = [group for group in groups if group["params"]]
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set every group's lr for `step`; returns the base model's (the one the metrics report)."""
    factor = lr_factor(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    return cfg.lr * factor
