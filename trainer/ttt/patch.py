"""`patch_model`: turn the gated MLPs of chosen decoder layers into fast-weight MLPs, in place."""

from __future__ import annotations

from torch import nn

from trainer.ttt.config import TTTConfig
from trainer.ttt.context import TTTContext
from trainer.ttt.mlp import FastWeightMLP

_GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding `layers` and `embed_tokens` (e.g. `Qwen3ForCausalLM.model`)."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise ValueError(f"{type(model).__name__} has no decoder layer list (expected .layers or .model.layers)")


def patch_model(model: nn.Module, cfg: TTTConfig) -> nn.Module:
    """Replace the MLP of each layer that `cfg.layers` selects by a `FastWeightMLP`; returns `model`.

    Works for Qwen3, Qwen2, Llama and Mistral models of transformers (any decoder whose MLP has
    gate_proj / up_proj / down_proj / act_fn). Parameter names of the base model are unchanged, so
    its checkpoints load as before. Packed documents are signalled by `position_ids` that restart at
    0 or by a `document_ids=` keyword to the model's forward.
    """
    if not isinstance(cfg, TTTConfig):
        raise TypeError(f"patch_model expects a TTTConfig, got {type(cfg).__name__}")
    decoder = decoder_of(model)
    indices = cfg.layer_indices(len(decoder.layers))
    for i in indices:
        mlp = decoder.layers[i].mlp
        if isinstance(mlp, FastWeightMLP):
            raise ValueError(f"layer {i} is already a fast-weight MLP: patch_model was applied twice")
        missing = [part for part in _GATED_MLP_PARTS if not hasattr(mlp, part)]
        if missing:
            raise ValueError(f"layer {i} MLP ({type(mlp).__name__}) is not a gated MLP: it lacks {', '.join(missing)}")
    if not indices:
        return model
    context = TTTContext(cfg)
    for i in indices:
        mlp = decoder.layers[i].mlp  # the new module keeps its mode: clip applies in eval
        decoder.layers[i].mlp = FastWeightMLP(mlp, cfg, context).train(mlp.training)
    decoder.register_forward_pre_hook(context.begin, with_kwargs=True)
    decoder.register_forward_hook(context.end, with_kwargs=True, always_call=True)
    if cfg.target_source == "embed":
        decoder.embed_tokens.register_forward_hook(context.record_embeddings)
    model.ttt_config = cfg
    model.ttt_context = context
    model.ttt_layers = indices
    return model
