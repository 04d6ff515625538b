"""`train.compile`: regional torch.compile of the decoder layers (inductor's C++ backend on CPU) computes what
eager computes, with and without activation checkpointing, and new document boundaries never recompile."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_ttt_parameters
from torch._dynamo.utils import counters
from transformers import Qwen3Config, Qwen3ForCausalLM

from parallel.sharding import next_token_labels
from tests.test_train import FAST, compose_job
from trainer.compile import apply_compile
from trainer.config import ConfigError
from trainer.model import CausalLMLoss, enable_activation_checkpointing
from trainer.ttt import TTTConfig, patch_model

VOCAB, SEQ = 128, 64
# torch 2.13's inductor calls its own deprecated torch.jit.script_method while compiling for the CPU
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (inductor's on-disk cache still spares repeated C++ builds)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):  # apply_compile raises it
        yield
    torch._dynamo.reset()


def tiny_ttt_model(checkpointing: bool = False) -> Qwen3ForCausalLM:
    """Two fp32 layers, TTT-NTP (normalized write) on the second: both kinds of layer get compiled."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    model = patch_model(Qwen3ForCausalLM(config), TTTConfig(method="ntp", chunk_size=16, layers=[1]))
    randomize_ttt_parameters(model)  # V != 0: the fast weights change the output
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def packed_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of documents packed into SEQ tokens: position ids restart at each document."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).expand(2, -1)
    return input_ids, position_ids, next_token_labels(input_ids, position_ids)


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss(model)(*batch) / batch[0].numel()  # a mean, as a training step's loss is
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


# Two rows of SEQ tokens, documents packed. The first batch compiles; the second (the same batch) retraces the plain
# layer once, whatever the batch (dynamo first tries the outer frame cached for the TTT layer, which breaks before
# it tells the two MLPs apart). From then on (WARM_UP) a new packing of the same shapes must never recompile. (One
# unpacked document per row is another case: transformers passes no attention mask then, compiled once more.)
PACKINGS = ([20, 13, 31], [20, 13, 31], [33, 31], [5, 11, 9, 7, 32], [10, 54])
WARM_UP = 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_compiled_layers_compute_what_eager_computes_and_new_packings_do_not_recompile(checkpointing):
    eager, compiled = tiny_ttt_model(), apply_compile(tiny_ttt_model(checkpointing))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and FSDP2 see the plain model
    assert [type(layer) for layer in compiled.model.layers] == [type(layer) for layer in eager.model.layers]
    for step, lengths in enumerate(PACKINGS):
        if step == WARM_UP:
            graphs = counters["stats"]["unique_graphs"]
        batch = packed_batch(lengths, seed=step)
        want_loss, want = loss_and_grads(eager, batch)
        with torch._dynamo.config.patch(error_on_recompile=step >= WARM_UP):
            got_loss, got = loss_and_grads(compiled, batch)
        # fp32; inductor fuses and reorders reductions (RMSNorm, softmax, the gradients' sums over tokens), which
        # moves results by a few ulps: seen here, the same loss and gradients within 8e-8 (largest entries 0.16),
        # under 7% of this tolerance.
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert counters["stats"]["unique_graphs"] == graphs > 0  # the layers ran compiled, and nothing was new


def test_compile_key():
    def train(*overrides):
        return compose_job(*FAST, *overrides).train

    assert train().compile is None and train().compiles("cuda") and not train().compiles("cpu")  # auto
    assert train("train.compile=true").compiles("cpu") and not train("train.compile=false").compiles("cuda")
    for bad in ("yes", "1", "null"):
        with pytest.raises(ConfigError) as error:
            train(f"train.compile={bad}")
        assert str(error.value).startswith("train.compile must be one of auto, true, false, got ")
        assert "\n" not in str(error.value)
    zero3 = ("parallel.engine=deepspeed", "parallel.zero_stage=3")  # ZeRO-3 gathers parameters behind dynamo's back
    assert not train(*zero3).compiles("cuda")
    with pytest.raises(ConfigError, match="^train.compile must be auto or false with parallel.engine=deepspeed and "):
        train(*zero3, "train.compile=true")
