"""`tools.studies.read_ceiling` on the tiny model: the oracle gate opens exactly on the pass key's writes, a zero target
leaves the base model's answers as they were, and a scaled one changes them."""

from __future__ import annotations

import re

import torch

from tools.studies.read_ceiling import main, measure, pass_key_writes
from trainer.compose import compose_config
from trainer.config import job_config
from trainer.data import build_dataset
from trainer.model import build_model

JOB = ["model=tiny", "parallel=single", "data=synthetic_passkey", "data.seq_len=128", "eval.distance_edges=[32]"]


def test_the_gate_opens_on_the_positions_that_write_the_pass_key():
    dataset = build_dataset("synthetic_passkey", 128, 256, seed=5, options={})
    for index in range(4):
        sample = dataset.sample(index)
        ids = sample.input_ids[0]
        for answer in sample.answers:
            writes = pass_key_writes(answer)
            assert 0 <= writes.start < writes.stop < answer.start
            written = ids[writes.start + 1 : writes.stop + 1]  # ntp: position s writes token s+1
            assert torch.equal(written, ids[answer.start : answer.end])


def test_a_zero_target_is_the_base_model_and_a_scaled_one_moves_the_answers():
    results = measure(JOB, layers=[0, 1], scales=[0.0, 64.0], documents=2)
    base = results[(None, 0.0)]
    assert results[(0, 0.0)] == base and results[(1, 0.0)] == base
    assert results[(0, 64.0)][1]["nll"] != base[1]["nll"]
    job = job_config(compose_config(["ttt=none", *JOB]))  # the base model's answer NLL, computed directly
    model = build_model(job.model, job.ttt, torch.device("cpu"), job.seed).eval()
    dataset = build_dataset(job.data.name, 128, 256, job.eval.seed, job.data.options)
    nll = []
    for index in range(2):
        sample = dataset.sample(index)
        with torch.no_grad():
            logits = model(sample.input_ids, position_ids=sample.position_ids).logits[0].double()
        for answer in sample.answers:
            log_probs = torch.log_softmax(logits[answer.start - 1 : answer.end - 1], dim=-1)
            nll.append(float(-log_probs.gather(1, sample.input_ids[0, answer.start : answer.end, None]).mean()))
    scored = [b for b in base if b["answers"]]
    assert sum(b["answers"] for b in scored) == len(nll)
    assert abs(sum(b["nll"] * b["answers"] for b in scored) - sum(nll)) < 1e-9


def test_the_command_prints_the_base_and_a_row_per_layer_and_scale(capsys):
    main(["--layers", "0", "1", "--scales", "4", "--documents", "1", "--", *JOB])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("|")]
    assert re.match(r"\| layer \| scale \| NLL, distance \[0, 32\) \(\d+\) \|", rows[0])  # answers counted
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["base", "0", "1"]
