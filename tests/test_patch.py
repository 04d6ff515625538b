"""patch_model on tiny Qwen3 and Llama: the DESIGN.md formula, drop-in identity, packed documents, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_BUILDERS, VOCAB, randomize_ttt_parameters, tiny_qwen3
from transformers import PhiConfig, PhiForCausalLM

from trainer.ops.fastweight import naive_fastweight, naive_normalized_fastweight
from trainer.ttt import TTTConfig, patch_model
from trainer.ttt.mlp import FastWeightMLP
from trainer.ttt.targets import naive_value_targets

METHOD_CONFIGS = {
    "inplace": dict(method="inplace"),
    "inplace-noproj": dict(method="inplace", proj=False),
    "ntp": dict(method="ntp"),
    "recon": dict(method="recon"),
    "inplace-embed": dict(method="inplace", target_source="embed"),
    "ntp-embed": dict(method="ntp", target_source="embed"),
}


def design_formula(mlp: FastWeightMLP, x: torch.Tensor, source: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """O_c = Z_c (W_0 + sum_{c' < c} dW_c')^T, with the targets of DESIGN.md, one document at a time (the raw
    write; the normalized one reads the gate-weighted mean over earlier tokens with unit-norm keys)."""
    cfg = mlp.cfg
    z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    conv = mlp.ttt_conv.weight if cfg.method == "inplace" else None
    proj = mlp.ttt_proj.weight if cfg.proj else None
    values = naive_value_targets(cfg.method, source, pos, cfg.chunk_size, conv, proj)
    if cfg.write == "raw":
        return mlp.down_proj(z) + naive_fastweight(z, values, pos, cfg.chunk_size, cfg.lr)
    gates = torch.sigmoid(mlp.ttt_gate(x))
    return mlp.down_proj(z) + naive_normalized_fastweight(z, values, pos, cfg.chunk_size, cfg.lr, gates)


@pytest.mark.parametrize("write", ["raw", "normalized"])
@pytest.mark.parametrize("variant", sorted(METHOD_CONFIGS))
def test_mlp_equals_design_formula_fp64(variant, write):
    model = patch_model(tiny_qwen3(), TTTConfig(chunk_size=4, lr=0.5, write=write, **METHOD_CONFIGS[variant]))
    randomize_ttt_parameters(model)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    source = torch.randn(2, 19, 24, dtype=torch.float64) if "embed" in variant else x
    got = mlp(x, source=source) if "embed" in variant else mlp(x)
    want = design_formula(mlp, x, source, torch.arange(19).unsqueeze(0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("write", ["raw", "normalized"])
def test_mlp_gradients_fp64(write):
    model = patch_model(tiny_qwen3(), TTTConfig(method="ntp", chunk_size=3, lr=0.5, layers=[0], write=write))
    randomize_ttt_parameters(model)
    mlp = model.model.layers[0].mlp
    for param in mlp.parameters():
        param.data = param.data[..., :4] if param.dim() == 1 else param.data
    x = torch.randn(1, 8, 24, dtype=torch.float64, requires_grad=True)
    params = [mlp.ttt_proj.weight, mlp.down_proj.weight, mlp.gate_proj.weight]
    params += [mlp.ttt_gate.weight, mlp.ttt_gate.bias] if write == "normalized" else []
    assert torch.autograd.gradcheck(lambda x, *p: mlp(x), (x, *params))


@pytest.mark.parametrize("family", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("method", ["inplace", "ntp", "recon", "nomem"])
def test_drop_in_at_init(family, method):
    base = MODEL_BUILDERS[family](dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        before = base(ids).logits
        patched = patch_model(base, TTTConfig(method=method, chunk_size=4))
        after = patched(ids).logits
    assert torch.equal(before, after)


def test_gate_bias_sets_where_the_gate_starts_not_what_is_first_read():
    """Every token starts at g = sigmoid(b): the gated mean is the plain mean whatever b is, while the gate's
    gradient differs (a negative b makes it log-linear)."""
    ids = torch.randint(0, VOCAB, (1, 21))
    outputs, gate_grads = [], []
    for bias in (0.0, -4.0):
        torch.manual_seed(0)
        model = patch_model(tiny_qwen3(dtype=torch.float64), TTTConfig(method="ntp", chunk_size=4, gate_bias=bias))
        randomize_ttt_parameters(model)  # P != 0, so the read is not zero
        gate = model.model.layers[0].mlp.ttt_gate
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.fill_(bias)
        logits = model(ids).logits
        logits.square().sum().backward()
        outputs.append(logits.detach())
        gate_grads.append(gate.weight.grad.clone())
    assert (
        patch_model(tiny_qwen3(), TTTConfig(method="ntp", gate_bias=-4.0)).model.layers[0].mlp.ttt_gate.bias.item()
        == -4.0
    )
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gate_grads[1], gate_grads[0])


@pytest.mark.parametrize("family", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("variant", ["inplace", "ntp", "recon", "inplace-embed"])
def test_packed_documents_equal_separate_runs(family, variant):
    model = patch_model(MODEL_BUILDERS[family](), TTTConfig(chunk_size=4, lr=0.5, **METHOD_CONFIGS[variant]))
    randomize_ttt_parameters(model)
    lengths = [7, 12, 1, 5]  # none a multiple of the chunk size but one
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    with torch.no_grad():
        separate = torch.cat([model(doc).logits for doc in docs], dim=1)
        by_positions = model(packed, position_ids=position_ids).logits
        by_document_ids = model(packed, document_ids=document_ids).logits
        unmasked = model(packed).logits
    torch.testing.assert_close(by_positions, separate, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(by_document_ids, separate, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(unmasked[:, 7:], separate[:, 7:])  # the check above is not vacuous


def test_layer_selection_rules():
    model = patch_model(tiny_qwen3(layers=8), TTTConfig(layers="every:4"))
    assert model.ttt_layers == [3, 7]
    assert [isinstance(layer.mlp, FastWeightMLP) for layer in model.model.layers].count(True) == 2
    assert TTTConfig(layers="every:3:0").layer_indices(8) == [0, 3, 6]
    assert TTTConfig(layers=[5, 1]).layer_indices(8) == [1, 5]
    assert TTTConfig(layers="all").layer_indices(3) == [0, 1, 2]
    assert TTTConfig(method="none").layer_indices(3) == []


def test_checkpoint_keys_of_the_base_model_load_unchanged():
    base = tiny_qwen3()
    state = base.state_dict()
    patched = patch_model(tiny_qwen3(), TTTConfig(method="inplace"))
    missing, unexpected = patched.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing and all(".ttt_" in k for k in missing)
    assert "model.layers.0.mlp.ttt_proj.weight" in patched.state_dict()
    assert "model.layers.0.mlp.ttt_conv.weight" in patched.state_dict()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="lora"), "ttt.method must be one of"),
        (dict(chunk_size=0), "ttt.chunk_size must be a positive integer"),
        (dict(chunk_size=-4), "ttt.chunk_size must be a positive integer"),
        (dict(lr=0.0), "ttt.lr must be a positive number"),
        (dict(conv_kernel=4), "ttt.conv_kernel must be a positive odd integer"),
        (dict(target_source="logits"), "ttt.target_source must be one of"),
        (dict(method="ntp", proj=False), "needs ttt.proj=true"),
        (dict(layers="every:0"), "ttt.layers must be"),
        (dict(layers="some"), "ttt.layers must be"),
        (dict(clip=-1.0), "ttt.clip must be positive"),
        (dict(write="sum"), "ttt.write must be one of raw, normalized"),
        (dict(gate_bias=float("nan")), "ttt.gate_bias must be a finite number"),
        (dict(gate_bias="low"), "ttt.gate_bias must be a finite number"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TTTConfig(**kwargs)


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match="index 2 is out of range for a model with 2 layers"):
        patch_model(tiny_qwen3(), TTTConfig(layers=[0, 2]))


def test_model_whose_mlp_is_not_gated():
    phi = PhiForCausalLM(
        PhiConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="is not a gated MLP"):
        patch_model(phi, TTTConfig())


def test_patching_twice_is_an_error():
    model = patch_model(tiny_qwen3(), TTTConfig())
    with pytest.raises(ValueError, match="applied twice"):
        patch_model(model, TTTConfig())
