"""The validation loss (`eval.data`): a fixed set of held-out sequences scored every `eval.every` steps, overall and
by position in the document; under context parallelism it is the number one process computes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from multiproc import run_ranks

from tools.textdata import make_documents
from trainer.compose import job_of
from trainer.config import ConfigError
from trainer.data.prepare import prepare
from trainer.evaluation.validation import position_edges, validation_loss, validation_set
from trainer.loop import build_training, run, setup_ranks


@pytest.fixture(scope="module")
def corpus(tokenizer_dir, tmp_path_factory):
    """A prepared train split and a held-out one, from different generated documents."""
    root = tmp_path_factory.mktemp("corpus")
    for split, seed in (("train", 21), ("heldout", 22)):
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": text}) + "\n" for text in make_documents(80, seed, 10, 40))
        )
        prepare([root / f"{split}.jsonl"], tokenizer_dir, root / split, progress=False)
    return root


def _overrides(corpus, *more: str) -> list[str]:
    return [
        "experiment=smoke", "parallel=single", "logging.wandb.mode=disabled", "data=corpus",
        f"data.sources=[{corpus / 'train'}]", f"eval.data=[{corpus / 'heldout'}]", "model.config.vocab_size=300",
        "eval.samples=4", *more,
    ]  # fmt: skip


def test_every_evaluation_records_the_validation_loss_by_position(corpus, tmp_path):
    run(job_of(_overrides(corpus, "eval.every=3")), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scored = [row["step"] for row in rows if "val/loss" in row]
    assert scored == [3, 6]
    latest = json.loads((tmp_path / "validation.json").read_text())
    assert latest["step"] == 6 and rows[-1]["val/loss"] == latest["loss"]
    buckets = [b for b in latest["by_position"] if b["tokens"]]
    assert [(b["start"], b["end"]) for b in latest["by_position"]] == list(
        zip(position_edges(128), position_edges(128)[1:])
    )
    assert all(rows[-1][f"val/loss/{b['start']}-{b['end']}"] == b["loss"] for b in buckets)
    mean = sum(b["loss"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets)
    assert math.isclose(mean, latest["loss"], rel_tol=1e-12) and latest["tokens"] == sum(b["tokens"] for b in buckets)
    assert rows[-1]["val/loss"] < rows[2]["val/loss"]  # it trains


def _scores(rank, world_size, overrides, out):
    ranks = setup_ranks(cp=world_size, load_balance="headtail")
    job = job_of(overrides)
    training = build_training(job, ranks)
    held_out = validation_set(job.eval.data, job.data.seq_len, 300, job.eval.seed)
    scores = validation_loss(training.step_model, held_out, job.eval.samples, ranks)
    if rank == 0:
        out.write_text(json.dumps(scores))


def test_context_parallel_scores_what_one_process_scores_fp64(corpus, tmp_path):
    overrides = _overrides(corpus, "model.dtype=float64", "ttt.chunk_size=16")
    _scores(0, 1, overrides, tmp_path / "one.json")
    cp2 = [*overrides, "parallel.cp=2", "parallel.nproc_per_node=2"]
    run_ranks(_scores, 2, tmp_path, cp2, tmp_path / "cp2.json")
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "cp2.json"))
    assert two["tokens"] == one["tokens"] and math.isclose(two["loss"], one["loss"], rel_tol=1e-12)
    for a, b in zip(one["by_position"], two["by_position"], strict=True):
        assert a["tokens"] == b["tokens"] and (a["loss"] is None or math.isclose(a["loss"], b["loss"], rel_tol=1e-12))


def test_eval_data_needs_a_corpus_job():
    with pytest.raises(ConfigError, match="eval.data must be empty unless data=corpus"):
        job_of(["experiment=smoke", "eval.data=[/some/folder]"])


def test_validation_does_not_change_what_training_computes(corpus, tmp_path):
    """Scoring in eval mode without gradients leaves the training's numbers as they are without it."""
    run(job_of(_overrides(corpus, "eval.every=2")), tmp_path / "scored")
    run(job_of(_overrides(corpus, "eval.every=0")), tmp_path / "plain")
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("scored", "plain")
    ]
    assert losses[0] == losses[1]
    assert torch.isfinite(torch.tensor(losses[0])).all()
