"""Export of a training checkpoint to a Hugging Face folder, loading it back, and the In-Place TTT release format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers.dynamic_module_utils
from conftest import VOCAB, randomize_ttt_parameters, tiny_llama, tiny_qwen3
from omegaconf import OmegaConf
from test_train import compose_job
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

from tools.commands.export_hf import main
from trainer.checkpoint.trained_model import load_trained_model
from trainer.config import ModelConfig
from trainer.hf_format import load_ttt_model, save_ttt_model, ttt_config_fields, ttt_config_from_fields
from trainer.loop import run
from trainer.model import build_model
from trainer.ttt import TTTConfig, patch_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step tiny In-Place TTT run with its Hydra config where `ttt-train` leaves it."""
    return train_tiny(tmp_path_factory.mktemp("run"), "ttt=inplace", "ttt.layers=[1,3]", "ttt.target_source=embed")


def train_tiny(run_dir: Path, *overrides: str) -> tuple[Path, Path]:
    """A 2-step experiment=smoke run in one process: (its checkpoint, its Hydra config where `ttt-train` leaves it)."""
    quiet = ["parallel=single", "train.steps=2", "eval.every=0", "logging.wandb.mode=disabled"]
    job = compose_job("experiment=smoke", *quiet, *overrides)
    checkpoint = run(job, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(job.raw, run_dir / ".hydra" / "config.yaml")
    return checkpoint, run_dir / ".hydra" / "config.yaml"


def test_export_loads_back_with_identical_logits(trained_run, tmp_path):
    checkpoint, config = trained_run
    out = tmp_path / "hf" / "tiny-inplace"
    main([str(checkpoint), str(out), "--max-shard-size", "500KB"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-inplace"]  # no partial folder left
    assert len(list(out.glob("model-*.safetensors"))) > 1
    fields = json.loads((out / "config.json").read_text())
    assert {k: fields[k] for k in ("ttt_mode", "ttt_layers", "ttt_chunk", "ttt_lr", "ttt_proj", "ttt_target")} == {
        "ttt_mode": True, "ttt_layers": [1, 3], "ttt_chunk": 32, "ttt_lr": 1.0, "ttt_proj": True,
        "ttt_target": "input_embed",
    }  # fmt: skip
    assert fields["ttt_method"] == "inplace"

    trained = load_trained_model(checkpoint, config)
    loaded = load_ttt_model(out)
    assert loaded.ttt_config == trained.ttt_config and loaded.ttt_layers == [1, 3]
    conv = loaded.model.layers[1].mlp.ttt_conv.weight
    assert conv.abs().max() > 0  # trained away from its zero init, so the check below sees the TTT weights
    ids = torch.randint(0, loaded.config.vocab_size, (2, 100))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["{tmp}/nowhere/step-3", "{tmp}/out"], "is not a complete checkpoint (no meta.json)"),
        (["{ckpt}", "{tmp}/out", "--config", "{tmp}/missing.yaml"], "no run config at"),
        (["{ckpt}", "{tmp}"], "already exists"),
        (["{ckpt}", "{tmp}/out", "--tokenizer", "{tmp}/nowhere"], "--tokenizer must be a local tokenizer folder"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_output(trained_run, tmp_path, capsys, argv, message):
    checkpoint, _ = trained_run
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("ttt-export: error: ") and message in err and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("method", ["none", "inplace", "ntp", "recon"])
@pytest.mark.parametrize("source", ["hidden", "embed"])
def test_config_fields_round_trip(method, source):
    cfg = TTTConfig(method=method, layers="every:2", chunk_size=64, lr=0.3, target_source=source, clip=0.5)
    back = ttt_config_from_fields(type("Config", (), ttt_config_fields(cfg, num_layers=4)))
    assert back == (TTTConfig(method="none") if method == "none" else TTTConfig(**{**vars(cfg), "layers": [1, 3]}))


RELEASE_FIELDS = dict(ttt_mode=True, ttt_layers=[0], ttt_chunk=4, ttt_lr=0.3, ttt_proj=True, ttt_target="input_embed")


def release_mlp(mlp, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The release's TTT MLP forward (Qwen3MLP.forward of its inference model): zero-pad to whole chunks,
    conv each chunk, read the current W_down, then W_down += lr * (conv(t) @ P)^T h."""
    chunk, lr = RELEASE_FIELDS["ttt_chunk"], RELEASE_FIELDS["ttt_lr"]
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    pad = -x.shape[1] % chunk
    hp, tp = F.pad(h, (0, 0, 0, pad)), F.pad(t, (0, 0, 0, pad))
    w, outs = mlp.down_proj.weight, []
    for c in range(hp.shape[1] // chunk):
        hc, tc = hp[0, c * chunk : (c + 1) * chunk], tp[0, c * chunk : (c + 1) * chunk]
        t_conv = mlp.ttt_conv(tc.T.unsqueeze(0))[0].T
        outs.append(hc @ w.T + (mlp.down_proj.bias if mlp.down_proj.bias is not None else 0))
        w = w + lr * torch.einsum("ch,cd,de->eh", hc, t_conv, mlp.ttt_proj.weight)
    return torch.cat(outs)[None, : x.shape[1]]


def test_release_checkpoint_loads_with_the_release_math(tmp_path):
    """A folder as the release writes it (its config fields only, its weight names) loads into the framework,
    and the loaded fast-weight MLP computes what the release's MLP computes."""
    release = tiny_llama(dtype=torch.float64)
    release_cfg = TTTConfig(method="inplace", layers=[0], chunk_size=4, lr=0.3, target_source="embed", write="raw")
    patch_model(release, release_cfg)
    randomize_ttt_parameters(release)
    release.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **RELEASE_FIELDS}))

    loaded = load_ttt_model(tmp_path)
    assert loaded.ttt_config == release_cfg  # the release's write: raw
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, release(ids).logits, rtol=0, atol=1e-14)
        mlp = loaded.model.layers[0].mlp
        x, t = torch.randn(1, 11, 24, dtype=torch.float64), torch.randn(1, 11, 24, dtype=torch.float64)
        torch.testing.assert_close(mlp(x, source=t), release_mlp(mlp, x, t), rtol=1e-12, atol=1e-12)


def test_export_round_trip_keeps_clip_and_method(tmp_path):
    model = patch_model(tiny_llama(), TTTConfig(method="ntp", layers=[1], chunk_size=4, clip=0.05)).eval()
    randomize_ttt_parameters(model)
    save_ttt_model(model, tmp_path)
    loaded = load_ttt_model(tmp_path)
    assert loaded.ttt_config == model.ttt_config and not loaded.model.layers[1].mlp.training
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():  # not bit-equal in fp64: from_pretrained keeps the rotary inv_freq buffer in fp32
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-14)


@pytest.fixture
def ntp_export(tmp_path):
    model = patch_model(tiny_qwen3(), TTTConfig(method="ntp", layers=[1], chunk_size=4)).eval()
    randomize_ttt_parameters(model)
    save_ttt_model(model, tmp_path / "export")
    return model, tmp_path / "export"


def test_plain_transformers_refuses_an_export_without_trust_remote_code(ntp_export, monkeypatch):
    """Never the base model without its fast weights: transformers does not know the folder's model type, so it
    asks for trust_remote_code (a ValueError where it cannot ask, as in CI; the timeout 0 skips its prompt)."""
    monkeypatch.setattr(transformers.dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load(ntp_export[1])


def test_an_export_reads_as_its_base_model_for_continued_training(ntp_export):
    """`model=hf model.path=EXPORT` builds the base architecture from the folder (no remote code runs) and loads
    its TTT weights into the run's patched model."""
    model, folder = ntp_export
    spec = ModelConfig(name="hf", family="qwen3", path=str(folder), dtype="float64", config={})
    rebuilt = build_model(spec, model.ttt_config, torch.device("cpu"), seed=1).eval()
    assert type(rebuilt.config) is Qwen3Config and rebuilt.config.architectures == ["Qwen3ForCausalLM"]
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=1e-14)
