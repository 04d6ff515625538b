"""Build the model a job trains: a Hugging Face decoder (local weights or scratch init) with TTT MLPs."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.config import ModelConfig
from trainer.materialize import Materializer, load_pretrained
from trainer.model_folder import read_model_config
from trainer.ops.loss import linear_cross_entropy, token_cross_entropy
from trainer.ttt import TTTConfig, patch_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def master_dtype(model_dtype: str, device: torch.device, engine: str) -> torch.dtype:
    """The dtype a job stores and updates its parameters in. A bf16 model trains on CUDA with fp32
    master weights and computes in bf16 (FSDP2's mixed precision, or autocast): AdamW's small
    updates would vanish in bf16 rounding. DeepSpeed keeps its own fp32 copy of a bf16 module."""
    dtype = DTYPES[model_dtype]
    if device.type == "cuda" and dtype == torch.bfloat16 and engine != "deepspeed":
        return torch.float32
    return dtype


def model_config(model_cfg: ModelConfig):
    """The transformers config a job builds: `model.config` for scratch init, or the `model.path` folder's
    config.json with `model.config`'s fields set over it, read as `model.family`. A family other than the
    folder's reads its weights into another architecture with the same parameters, e.g. a Llama checkpoint
    as Mistral, whose attention can be restricted to `sliding_window`."""
    if model_cfg.path is None:
        return AutoConfig.for_model(model_cfg.family, **model_cfg.config)
    config = read_model_config(model_cfg.path)
    if config.model_type == model_cfg.family and not model_cfg.config:
        return config
    fields = {
        k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")
    }
    return AutoConfig.for_model(model_cfg.family, **{**fields, **model_cfg.config})


def build_meta_model(model_cfg: ModelConfig, ttt_cfg: TTTConfig, dtype: torch.dtype | None = None):
    """The patched model on the meta device: exact shapes, no storage (see `trainer.materialize`),
    parameters in `dtype` (default `model.dtype`). With `model.path`, only the folder's config.json
    is read here."""
    config = model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or DTYPES[model_cfg.dtype])
    return patch_model(model, ttt_cfg)


def build_model(model_cfg: ModelConfig, ttt_cfg: TTTConfig, device: torch.device, seed: int):
    """The whole model on `device`: seeded scratch init, then the `model.path` weights if set. Every
    rank builds the same values, so no broadcast is needed."""
    model = build_meta_model(model_cfg, ttt_cfg)
    Materializer(model, device, seed)(model)
    if model_cfg.path is not None:
        load_pretrained(model, model_cfg.path)
    return model


def freeze_base(model: nn.Module, trainable: str) -> None:
    """`train.trainable`: with `ttt` only the TTT parameters (`ttt_conv`, `ttt_proj`, `ttt_gate`) keep requiring
    gradients, with `ttt+norms` the RMSNorm weights too; `all` leaves the model as it is. The embeddings then
    need no gradient, so the backward stops at the lowest decoder layer that trains, and the frozen weights'
    gradients are never computed."""
    if trainable == "all":
        return
    for name, param in model.named_parameters():
        trains = ".ttt_" in name or (trainable == "ttt+norms" and "norm" in name.rsplit(".", 2)[-2])
        param.requires_grad_(trains)


def enable_activation_checkpointing(model, every_n_layers: int = 1) -> None:
    """Recompute every n-th decoder layer in the backward (transformers' own switch; n > 1 keeps the
    other layers' activations, trading memory back for speed), with the TTT layout of the forward
    restored during the recomputation."""
    context = getattr(model, "ttt_context", None)

    def context_fn():
        if context is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), context.restored(context.snapshot())

    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn},
        every_n_layers=every_n_layers,
    )


class CausalLMLoss(nn.Module):
    """The decoder and its summed next-token loss in one forward (or, for evaluation, each token's loss, or without
    labels its greedy next-token predictions).

    One forward keeps FSDP2's root unit (embeddings, final norm, output head) gathered for both, and
    the chunked loss never materializes the full logits.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """The summed loss; with `per_token`, each token's loss (B, S) instead (evaluation, no gradient)."""
        hidden = self.lm.get_decoder()(input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        head = self.lm.get_output_embeddings().weight
        if labels is None:
            return _greedy_tokens(hidden, head)
        if per_token:
            return token_cross_entropy(hidden.flatten(0, 1), head, labels.flatten()).view(labels.shape)
        return linear_cross_entropy(hidden.flatten(0, 1), head, labels.flatten())


def _greedy_tokens(hidden: torch.Tensor, head: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """(B, S) argmax of the logits, a block of positions at a time."""
    flat = hidden.flatten(0, 1)
    tokens = [(flat[i : i + rows] @ head.to(flat.dtype).T).argmax(-1) for i in range(0, flat.shape[0], rows)]
    return torch.cat(tokens).view(hidden.shape[:2])
