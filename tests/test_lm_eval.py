"""lm-evaluation-harness runs an exported folder through its own `hf` model with trust_remote_code=True, offline and
where this package cannot be imported: a local multiple-choice task (loglikelihood requests, four to a batch, so
rows are right-padded) and a local generate_until task (greedy decoding with the fast weights). Every score it
logs equals this package's own computation of the same request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_export_standalone import export_trained_run, run_without_package
from transformers import AutoTokenizer

from trainer.hf_format import load_ttt_model
from trainer.inference import generate

pytest.importorskip("lm_eval", reason='lm-eval is an optional extra: pip install -e ".[eval]"')

TASKS = Path(__file__).parent / "data" / "lm_eval"  # the tasks' YAML and their data (recall.jsonl)

LM_EVAL = """
import json
import lm_eval
from lm_eval.tasks import TaskManager

folder, out = sys.argv[1:3]
runs = {}
for task, batch_size in (("ttt_recall_choice", 4), ("ttt_recall_generate", 1)):
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float64", tasks=[task],
        task_manager=TaskManager(include_path="."), device="cpu", batch_size=batch_size, log_samples=True,
    )
    runs[task] = {"metrics": results["results"][task], "samples": results["samples"][task]}
with open(out, "w") as f:
    json.dump(runs, f, default=str)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    return export_trained_run(tmp_path_factory, tokenizer_dir)[2]


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split as lm-eval splits the pair: the whole text's tokens after the context's."""
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0, len(context_ids) - 1 : -1].log_softmax(dim=-1)
    return logprobs.gather(-1, torch.tensor(whole[len(context_ids) :])[:, None]).sum().item()


def greedy_answer(model, tokenizer, context: str, max_tokens: int, until: list[str]) -> str:
    """trainer.inference.generate's greedy continuation, cut at the first stop string (or the end of text)."""
    prompt = torch.tensor([tokenizer.encode(context, add_special_tokens=False)])
    tokens = generate(model, prompt, max_tokens, eos_token_id=tokenizer.eos_token_id)[0, prompt.shape[1] :]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_lm_eval_scores_the_export_as_this_package_computes_it(exported, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)  # the YAML's data_files are relative to the working directory
    child = run_without_package(LM_EVAL, str(exported), str(tmp_path / "runs.json"), cwd=tasks)
    assert child.returncode == 0, child.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    choice, generated = runs["ttt_recall_choice"], runs["ttt_recall_generate"]
    assert "acc,none" in choice["metrics"] and "exact_match,none" in generated["metrics"]
    assert len(choice["samples"]) == len(generated["samples"]) == 4

    model, tokenizer = load_ttt_model(exported), AutoTokenizer.from_pretrained(exported)
    for sample in choice["samples"]:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])
        for (context, continuation), [[loglikelihood, _]] in zip(sample["arguments"], sample["resps"]):
            expected = continuation_loglikelihood(model, tokenizer, context, continuation)
            assert loglikelihood == pytest.approx(expected, rel=0, abs=1e-9)
    for sample in generated["samples"]:
        [[context, options]] = sample["arguments"]
        expected = greedy_answer(model, tokenizer, context, options["max_gen_toks"], options["until"])
        assert sample["resps"] == [[expected]]
