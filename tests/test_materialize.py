"""Meta-device models materialized unit by unit (sharded by FSDP2 as they go) and pretrained loading."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from multiproc import run_ranks
from torch.distributed.tensor import DTensor

from parallel.engine import apply_fsdp
from trainer.config import ModelConfig
from trainer.materialize import Materializer, load_pretrained
from trainer.model import DTYPES, CausalLMLoss, build_meta_model, build_model
from trainer.ttt import TTTConfig

CPU = torch.device("cpu")
TTT = TTTConfig(method="inplace", chunk_size=4, layers="every:2")  # inplace: conv the next-token shift, P zero


def model_cfg(path=None, tie: bool = True, dtype: str = "float32") -> ModelConfig:
    config = dict(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=6, tie_word_embeddings=tie,
    )  # fmt: skip
    return ModelConfig(name="test", family="qwen3", config=config, path=path, dtype=dtype)


def plain_tensors(model) -> dict[str, torch.Tensor]:
    return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in model.state_dict().items()}


def test_values_depend_on_the_seed_only_not_on_how_the_model_is_split():
    whole = build_model(model_cfg(), TTT, CPU, seed=3)
    split = build_meta_model(model_cfg(), TTT)
    materialize = Materializer(split, CPU, seed=3)
    for layer in reversed(split.model.layers):
        materialize(layer)
    materialize(split)
    assert not any(t.is_meta for t in [*split.parameters(), *split.buffers()])
    assert split.lm_head.weight is split.model.embed_tokens.weight  # tying survives the allocation
    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items()):
        assert torch.equal(a, b), name
    # The initialisation is the real one, not a constant: modules and seeds differ.
    layers = whole.model.layers
    assert not torch.equal(layers[0].self_attn.q_proj.weight, layers[1].self_attn.q_proj.weight)
    other = build_model(model_cfg(), TTT, CPU, seed=4)
    assert not torch.equal(other.model.embed_tokens.weight, whole.model.embed_tokens.weight)
    assert abs(float(whole.model.embed_tokens.weight.detach().std()) - 0.02) < 0.005  # transformers' initializer_range
    assert torch.equal(layers[1].mlp.ttt_proj.weight, torch.zeros(24, 24))  # the TTT layer starts as a drop-in
    shift = torch.zeros_like(layers[1].mlp.ttt_conv.weight)
    shift[:, 0, 3] = 1  # kernel 5, centred: tap 3 reads the next position
    assert torch.equal(layers[1].mlp.ttt_conv.weight, shift)
    assert torch.equal(layers[0].input_layernorm.weight, torch.ones(24))
    theta = whole.config.rope_parameters["rope_theta"]
    assert torch.allclose(whole.model.rotary_emb.inv_freq, 1.0 / theta ** (torch.arange(0, 6, 2) / 6))


def _sharded_materialization(rank, world, reference, folder):
    model = build_meta_model(model_cfg(folder, tie=folder is None), TTT)  # the released base folder is untied
    step_model = CausalLMLoss(model)
    materialize, full_numel_seen = Materializer(model, CPU, seed=3), []

    def recording(unit):  # after each unit: how many parameters this rank holds unsharded
        materialize(unit)
        full_numel_seen.append(sum(p.numel() for p in model.parameters() if not (p.is_meta or isinstance(p, DTensor))))

    apply_fsdp(step_model, model._no_split_modules, CPU, recording)
    if folder is not None:
        load_pretrained(model, folder)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    for name, value in plain_tensors(model).items():
        assert torch.equal(value, reference[name]), name
    # Only the unit being materialized is ever whole on a rank, never the model.
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    root = sum(p.numel() for p in model.parameters()) - sum(layers)
    assert full_numel_seen == [*layers, root]
    assert sum(p.to_local().numel() for p in model.parameters()) < sum(p.numel() for p in model.parameters()) / 1.5


def test_fsdp2_materializes_each_rank_s_shard_equal_to_the_single_process_model(tmp_path):
    reference = plain_tensors(build_model(model_cfg(), TTT, CPU, seed=3))
    run_ranks(_sharded_materialization, 2, tmp_path, reference, None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_released_base_model_loads_into_sharded_and_plain_models(tmp_path, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model_cfg(tie=False, dtype=dtype)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **cfg.config), dtype=DTYPES[dtype])
    folder = tmp_path / "hf"
    base.save_pretrained(folder)  # a plain Hugging Face checkpoint: no TTT parameters
    loaded = build_model(model_cfg(str(folder), tie=False, dtype=dtype), TTT, CPU, seed=3)
    fresh = plain_tensors(build_model(model_cfg(tie=False, dtype=dtype), TTT, CPU, seed=3))
    stored = plain_tensors(base)
    for name, value in plain_tensors(loaded).items():
        assert torch.equal(value, stored[name] if name in stored else fresh[name]), name
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(loaded(ids).logits, base(ids).logits)  # the TTT layers start as drop-ins
    if dtype == "float32":
        run_ranks(_sharded_materialization, 2, tmp_path, plain_tensors(loaded), str(folder))


def test_a_trained_ttt_model_loads_its_ttt_parameters_too(tmp_path):
    saved = build_model(model_cfg(tie=False), TTT, CPU, seed=11)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p))  # values no initialisation would produce
    saved.save_pretrained(tmp_path)
    loaded = build_model(model_cfg(str(tmp_path), tie=False), TTT, CPU, seed=3)
    assert plain_tensors(loaded).keys() == plain_tensors(saved).keys()
    for name, value in plain_tensors(loaded).items():
        assert torch.equal(value, plain_tensors(saved)[name]), name


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    build_model(model_cfg(tie=False), TTT, CPU, seed=0).save_pretrained(tmp_path)
    config = model_cfg(str(tmp_path))
    target = build_meta_model(config, TTT)
    del target.model.layers[3]  # a model with fewer layers than the checkpoint
    Materializer(target, CPU, seed=0)(target)
    with pytest.raises(ValueError, match=r"does not match the model \(unexpected \['model.layers.3"):
        load_pretrained(target, str(tmp_path))
