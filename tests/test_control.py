"""`ttt.method=nomem`, the control without memory: ntp's parameters, the branch applied to the current token only."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_ttt_parameters, tiny_qwen3

from trainer.model import freeze_base
from trainer.ttt import TTTConfig, patch_model


def _patched(method: str, **ttt) -> torch.nn.Module:
    model = patch_model(tiny_qwen3(), TTTConfig(method=method, chunk_size=4, lr=0.5, **ttt))
    randomize_ttt_parameters(model)
    return model


@pytest.mark.parametrize("write", ["normalized", "raw"])
def test_branch_is_lr_times_gate_times_projected_source_fp64(write):
    mlp = _patched("nomem", write=write).model.layers[0].mlp
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    gate = torch.sigmoid(mlp.ttt_gate(x)) if write == "normalized" else 1.0
    want = mlp.down_proj(z) + 0.5 * gate * (x @ mlp.ttt_proj.weight)
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["nomem", "ntp"])
def test_each_position_reads_only_itself(method):
    """Perturb every other position of the MLP's input: a nomem position does not move, an ntp one does (it reads
    earlier chunks' writes and, through its own chunk's target, nothing else), so the check is not vacuous."""
    mlp = _patched(method).model.layers[0].mlp
    x = torch.randn(1, 12, 24, dtype=torch.float64)
    at = 9  # in the third chunk of 4
    other = x.clone()
    other[:, torch.arange(12) != at] += torch.randn(1, 11, 24, dtype=torch.float64)
    same = torch.allclose(mlp(x)[:, at], mlp(other)[:, at], rtol=0, atol=1e-12)
    assert same == (method == "nomem")


def test_the_model_stays_causal():
    model = _patched("nomem")
    ids = torch.randint(0, VOCAB, (1, 16))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(changed).logits[:, :9], model(ids).logits[:, :9], rtol=0, atol=0)


@pytest.mark.parametrize("target_source", ["hidden", "embed"])
def test_trains_exactly_ntps_parameters(target_source):
    def trainable(method: str) -> dict[str, torch.Size]:
        model = patch_model(tiny_qwen3(), TTTConfig(method=method, layers=[1], target_source=target_source))
        freeze_base(model, "ttt")
        return {name: p.shape for name, p in model.named_parameters() if p.requires_grad}

    assert trainable("nomem") == trainable("ntp")
    assert sum(shape.numel() for shape in trainable("nomem").values()) == 24 * 24 + 24 + 1


def test_gradients_reach_the_projection_and_the_gate():
    model = _patched("nomem")
    model(torch.randint(0, VOCAB, (1, 10))).logits.square().sum().backward()
    mlp = model.model.layers[0].mlp
    assert mlp.ttt_proj.weight.grad.abs().sum() > 0 and mlp.ttt_gate.weight.grad.abs().sum() > 0
