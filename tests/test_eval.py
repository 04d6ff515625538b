"""`ttt-eval` on tiny models: outputs and W&B logging, RULER scoring with oracle generations,
perplexity equal to the full forward's, checkpoints as input, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_ttt_parameters
from omegaconf import OmegaConf
from PIL import Image
from test_train import compose_job
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

import trainer.evaluation.recall
from tools.commands.eval import main
from trainer.data.synthetic.tasks import SyntheticTask
from trainer.evaluation.perplexity import bucket_edges, nll_by_position
from trainer.evaluation.scoring import string_match_all, token_text
from trainer.hf_format import load_ttt_model, save_ttt_model
from trainer.loop import run
from trainer.ttt import TTTConfig, patch_model

FAST = ["--samples", "2", "--depths", "3", "--ppl-documents", "2", "--wandb-mode", "disabled"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny TTT-NTP Qwen3 with a vocabulary large enough for the test tokenizer, as an exported folder."""
    config = Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    torch.manual_seed(0)
    model = patch_model(Qwen3ForCausalLM(config), TTTConfig(method="ntp", layers=[1], chunk_size=16))
    randomize_ttt_parameters(model)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_ttt_model(model, folder)
    return folder


def results(out):
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}


def test_writes_every_output_and_logs_them_to_wandb(hf_model, tmp_path):
    out = tmp_path / "eval"
    main([str(hf_model), "--lengths", "128,256", "--out", str(out), *FAST[:-2], "--wandb-mode", "offline"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no partial folder left
    assert {p.name for p in out.iterdir()} == {"ppl.json", "ppl.png", "ruler.json", "ruler.md", "niah.json",
                                               "niah.png", "wandb"}  # fmt: skip
    ppl, ruler, niah = (results(out)[name] for name in ("ppl", "ruler", "niah"))
    assert [(b["start"], b["end"]) for b in ppl["buckets"]] == [(0, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64),
                                                                (64, 128), (128, 256)]  # fmt: skip
    assert ppl["documents"] == 2 and ppl["tokens"] == 2 * 255 and all(b["nll"] > 0 for b in ppl["buckets"])
    tasks = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe"]
    assert ruler["mode"] == "tokenizer-free" and list(ruler["scores"]) == tasks
    for row in ruler["scores"].values():
        assert list(row) == ["128", "256"] and all(cell["n"] == 2 and 0 <= cell["score"] <= 1 for cell in row.values())
    assert niah["depths"] == [0.0, 0.5, 1.0] and len(niah["scores"]) == 3 and len(niah["scores"][0]) == 2
    table = (out / "ruler.md").read_text().splitlines()
    assert table[0] == "| task | 128 | 256 |" and len(table) == 2 + len(tasks) + 1
    for image in ("ppl.png", "niah.png"):
        with Image.open(out / image) as png:
            png.verify()
            assert png.format == "PNG" and png.size[0] > 100
    (history,) = out.glob("wandb/offline-run-*/run-*.wandb")
    for key in (b"ruler/vt/256", b"ruler/mean/128", b"ruler/table", b"niah/256/depth-0.50", b"niah/heatmap",
                b"ppl/nll/128-256", b"ppl/plot"):  # fmt: skip
        assert key in history.read_bytes()


def oracle(monkeypatch, tokenizer=None, break_first=False):
    """Replace generation by the true continuation of the sample the prompt comes from (every sample the
    generators make is recorded); `break_first` garbles the first expected answer of each question."""
    made = []
    original = SyntheticTask.sample
    monkeypatch.setattr(SyntheticTask, "sample", lambda self, i: made.append(original(self, i)) or made[-1])

    def generate(model, input_ids, max_new_tokens):
        prompt = input_ids[0].tolist()
        for sample in made:
            if tokenizer is None and sample.input_ids[0, : len(prompt)].tolist() == prompt:
                rest = sample.input_ids[0, len(prompt) :].tolist()
                if break_first:
                    first = next(a for a in sample.answers if a.start == len(prompt))
                    rest[: first.end - first.start] = [0] * (first.end - first.start)
                break
            text = tokenizer.decode(prompt) if tokenizer else None
            if tokenizer is not None and sample.documents[0].text.startswith(text):
                rest = sample.documents[0].text[len(text) :]
                if break_first:
                    first = next(a for a in sample.answers if a.char_start == len(text))
                    rest = rest.replace(first.text, "x", 1)
                rest = tokenizer(rest).input_ids
                break
        return torch.tensor([prompt + rest[:max_new_tokens]])

    monkeypatch.setattr(trainer.evaluation.recall, "generate", generate)


@pytest.mark.parametrize("mode", ["tokenizer-free", "text"])
def test_true_answers_score_one_and_garbled_ones_score_their_share(
    mode, hf_model, tokenizer_dir, tmp_path, monkeypatch
):  # noqa: E501
    text, length = mode == "text", "2048" if mode == "text" else "160"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if text else None
    args = ["--tasks", "ruler,niah", "--lengths", length, *FAST]
    args += ["--tokenizer", str(tokenizer_dir)] if text else []
    with monkeypatch.context() as patched:
        oracle(patched, tokenizer)
        main([str(hf_model), "--out", str(tmp_path / "right"), *args])
    scores = results(tmp_path / "right")
    assert scores["ruler"]["mode"] == mode and {
        s["score"] for r in scores["ruler"]["scores"].values() for s in r.values()
    } == {1.0}
    assert scores["niah"]["scores"] == [[1.0]] * 3
    oracle(monkeypatch, tokenizer, break_first=True)  # one expected string of each question is missing
    main([str(hf_model), "--out", str(tmp_path / "garbled"), *args])
    ruler = {
        task: row["2048" if text else "160"]["score"]
        for task, row in results(tmp_path / "garbled")["ruler"]["scores"].items()
    }
    assert ruler == {"niah_single": 0.0, "niah_multikey": 0.0, "niah_multivalue": 0.75, "niah_multiquery": 0.0,
                     "vt": 0.8, "cwe": 0.9}  # fmt: skip
    assert "| niah_multivalue | 75.0 |" in (tmp_path / "garbled" / "ruler.md").read_text()


def test_string_match_is_rulers():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("AMBER-falcon", ["amber-falcon"]) == 1.0  # case-insensitive
    assert string_match_all(token_text([112, 34]), [token_text([12, 34])]) == 0.0  # whole tokens only
    assert string_match_all(token_text([7, 12, 34, 5]), [token_text([12, 34])]) == 1.0


def test_perplexity_by_position_equals_the_full_forward(hf_model):
    model = load_ttt_model(hf_model)
    ids = torch.randint(0, 320, (1, 100))
    edges = bucket_edges(100, 3, "linear")
    assert edges == [0, 33, 67, 100] and bucket_edges(4096, 8, "log") == [0, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    result = nll_by_position(model, [ids], edges, piece_tokens=24)  # pieces straddle the 16-token chunks
    with torch.no_grad():
        nll = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    positions = torch.arange(1, 100)
    for bucket, (start, end) in zip(result["buckets"], zip(edges[:-1], edges[1:])):
        inside = (positions >= start) & (positions < end)
        assert bucket["tokens"] == int(inside.sum())
        assert bucket["nll"] == pytest.approx(float(nll[inside].mean()), rel=1e-5)


def test_a_training_checkpoint_evaluates_into_its_run(tmp_path):
    job = compose_job("experiment=smoke", "parallel=single", "train.steps=2", "logging.wandb.mode=disabled")
    checkpoint = run(job, tmp_path)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(job.raw, tmp_path / ".hydra" / "config.yaml")
    main([str(checkpoint), "--tasks", "niah,ppl", "--lengths", "128", *FAST])
    niah = json.loads((tmp_path / "eval" / checkpoint.name / "niah.json").read_text())
    assert niah["lengths"] == [128] and len(niah["scores"]) == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["{model}", "--tasks", "ppl,mmlu"], "argument --tasks: expected names from ppl, ruler, niah, got 'ppl,mmlu'"),
        (["{model}", "--lengths", "4x"], "argument --lengths: expected comma-separated token counts >= 2"),
        (["{tmp}"], "is neither a Hugging Face folder (config.json) nor a checkpoint (meta.json)"),
        (["{model}", "--tokenizer", "{tmp}/none"], "--tokenizer must be a local tokenizer folder"),
        (["{model}", "--lengths", "16"], "niah_single at length 16: data: documents of 16 tokens cannot hold"),
        (["{model}", "--ppl-data", "{tmp}/none.jsonl"], "--ppl-data must be a file or one of"),
        (["{model}", "--out", "{tmp}"], "already exists (pass another --out)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(hf_model, tmp_path, capsys, argv, message):
    before = sorted(tmp_path.iterdir()), sorted(hf_model.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(model=hf_model, tmp=tmp_path) for a in argv] + ["--wandb-mode", "disabled"])
    err = capsys.readouterr().err.split("\n")  # after transformers' weight loading bar, if the model loaded
    assert exit_info.value.code == 2
    assert err[-2].startswith("ttt-eval: error: ") and message in err[-2] and err[-1] == ""
    assert (sorted(tmp_path.iterdir()), sorted(hf_model.iterdir())) == before
