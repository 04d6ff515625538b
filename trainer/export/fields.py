"""The TTT settings as config.json fields, named as in the In-Place TTT release (ByteDance Seed, ICLR 2026).

The release's Qwen3/Llama configs carry `ttt_mode`, `ttt_layers`, `ttt_chunk`, `ttt_lr`, `ttt_proj` and
`ttt_target` ("hidden_states" | "input_embed"); its fast-weight MLPs name their weights exactly as
`FastWeightMLP` does (`model.layers.<i>.mlp.ttt_conv.weight`, a depthwise kernel-5 Conv1d applied per
chunk, and `model.layers.<i>.mlp.ttt_proj.weight`, used as `T @ P`), so weights need no renaming. It only
implements In-Place TTT with the raw write, so four fields are ours and default to the release's behaviour
when absent:

    ttt_method       TTTConfig.method       absent: "inplace"
    ttt_conv_kernel  TTTConfig.conv_kernel  absent: 5
    ttt_clip_tau     TTTConfig.clip         absent, null or <= 0: no clip (the name of a release fork's field)
    ttt_write        TTTConfig.write        absent: "raw" (the release's dW_c = eta V_c^T Z_c)

An exported folder ships this module (trainer/export/), so the folder's own code reads the fields the same way.
"""

from __future__ import annotations

from trainer.ttt.config import TTTConfig

_RELEASE_TARGETS = {"hidden": "hidden_states", "embed": "input_embed"}


def ttt_config_fields(cfg: TTTConfig, num_layers: int) -> dict:
    """config.json fields describing `cfg` for a model of `num_layers` decoder layers."""
    return {
        "ttt_mode": cfg.method != "none",
        "ttt_layers": cfg.layer_indices(num_layers),
        "ttt_chunk": cfg.chunk_size,
        "ttt_lr": cfg.lr,
        "ttt_proj": cfg.proj,
        "ttt_target": _RELEASE_TARGETS[cfg.target_source],
        "ttt_method": cfg.method,
        "ttt_conv_kernel": cfg.conv_kernel,
        "ttt_clip_tau": cfg.clip,
        "ttt_write": cfg.write,
    }


def ttt_config_from_fields(config) -> TTTConfig:
    """The TTTConfig of a transformers config carrying our fields or the release's (see the module doc)."""
    if not getattr(config, "ttt_mode", False):
        return TTTConfig(method="none")
    targets = {release: ours for ours, release in _RELEASE_TARGETS.items()}
    target = getattr(config, "ttt_target", "hidden_states")
    if target not in targets:
        raise ValueError(f"ttt_target must be one of {', '.join(targets)}, got {target!r}")
    tau = getattr(config, "ttt_clip_tau", None)
    return TTTConfig(
        method=getattr(config, "ttt_method", "inplace"),
        layers=list(config.ttt_layers),
        chunk_size=int(config.ttt_chunk),
        lr=float(config.ttt_lr),
        conv_kernel=int(getattr(config, "ttt_conv_kernel", 5)),
        proj=bool(getattr(config, "ttt_proj", True)),
        target_source=targets[target],
        clip=float(tau) if tau is not None and tau > 0 else None,
        write=getattr(config, "ttt_write", "raw"),
    )
