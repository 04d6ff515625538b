"""Answer accuracy: exact spans, the same counts under CP=2 and DP=2 as in one process, the loop's hook."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from multiproc import run_ranks
from test_materialize import model_cfg
from test_train import FAST, compose_job, metrics

from parallel.context_parallel import apply_cp
from parallel.pieces import CPGroup
from trainer.data.synthetic import SyntheticRecall
from trainer.evaluation.answers import answer_accuracy
from trainer.loop import Ranks, run
from trainer.model import CausalLMLoss, build_model
from trainer.ttt import TTTConfig

CPU = torch.device("cpu")
SINGLE = Ranks(0, 1, 0, 1, 0, 1, None, CPU)
TTT = TTTConfig(method="ntp", chunk_size=4)
EDGES = (40, 80)


def task() -> SyntheticRecall:
    # Few values: a random model predicts some answers right, so the counts below are not all zero.
    return SyntheticRecall(vocab_size=24, seq_len=128, seed=5, num_pairs=4, query_gap=20, query_gap_max=90)


class Oracle(torch.nn.Module):
    """Predicts the true next token everywhere except at the positions in `wrong`."""

    def __init__(self, dataset, wrong: set[int]):
        super().__init__()
        self.dataset, self.wrong, self.calls = dataset, wrong, 0

    def forward(self, input_ids, position_ids):
        truth = torch.roll(input_ids, -1, dims=1)
        for p in self.wrong:
            truth[0, p] = -1
        self.calls += 1
        return truth


def test_an_answer_counts_only_when_every_token_of_its_span_is_predicted():
    dataset = task()
    sample = dataset.sample(0)
    assert [a.end - a.start for a in sample.answers] == [1] * 4
    assert answer_accuracy(Oracle(dataset, set()), dataset, 1, SINGLE)["accuracy"] == 1.0
    first = sample.answers[0]
    missed = answer_accuracy(Oracle(dataset, {first.start - 1}), dataset, 1, SINGLE, EDGES)
    assert missed["accuracy"] == 0.75  # the prediction *of* the answer token, one position earlier
    assert answer_accuracy(Oracle(dataset, {first.start}), dataset, 1, SINGLE)["accuracy"] == 1.0
    bucket = next(b for b in missed["by_distance"] if (b["max"] or 10**9) > first.distance >= b["min"])
    assert bucket["accuracy"] < 1.0 and sum(b["answers"] for b in missed["by_distance"]) == 4


def _model():
    """A random model whose head only ever predicts answer tokens, so it gets some answers right."""
    model = build_model(model_cfg(tie=False), TTT, CPU, seed=1)
    answers = {
        int(t)
        for i in range(6)
        for a in task().sample(i).answers
        for t in task().sample(i).input_ids[0, a.start : a.end]
    }
    with torch.no_grad():
        head = model.lm_head.weight
        head.mul_(torch.isin(torch.arange(head.shape[0]), torch.tensor(sorted(answers)))[:, None] * 30.0)
    return CausalLMLoss(model).eval()


def _parallel_accuracy(rank, world, layout, expected):
    step_model = _model()
    group = dist.group.WORLD
    if layout == "cp":  # pieces placed by work: 16 pieces of 8 tokens, a layout per sequence
        cp = CPGroup(group, "work")
        apply_cp(step_model.lm, cp, "allgather")
        ranks = Ranks(rank, world, 0, 1, rank, world, None, CPU, cp)
    else:
        ranks = Ranks(rank, world, rank, world, 0, 1, group, CPU)
    assert answer_accuracy(step_model, task(), 6, ranks, EDGES) == expected


def test_cp2_and_dp2_score_exactly_what_one_process_scores(tmp_path):
    expected = answer_accuracy(_model(), task(), 6, SINGLE, EDGES)
    assert 0 < expected["accuracy"] < 1 and expected["answers"] == 24
    for layout in ("cp", "dp"):
        (tmp_path / layout).mkdir()
        run_ranks(_parallel_accuracy, 2, tmp_path / layout, layout, expected)


def test_the_training_loop_evaluates_periodically_and_at_the_end(tmp_path):
    job = compose_job(*FAST, "train.steps=5", "eval.every=2", "eval.samples=3", "eval.distance_edges=[64]")
    run(job, tmp_path)
    evaluated = {row["step"]: row.get("eval/accuracy") for row in metrics(tmp_path)}
    assert [step for step, accuracy in evaluated.items() if accuracy is not None] == [2, 4, 5]
    final = json.loads((tmp_path / "eval.json").read_text())
    assert final["step"] == 5 and final["accuracy"] == evaluated[5] and final["answers"] == 3 * 8
    assert [(b["min"], b["max"]) for b in final["by_distance"]] == [(0, 64), (64, None)]
