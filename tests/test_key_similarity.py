"""`tools.studies.key_similarity` on the tiny model: the write and query positions it finds, its statistics against a
direct computation from the model's MLP activations."""

from __future__ import annotations

import torch

from tools.studies.key_similarity import _keys_of, _occurrences, main, measure
from trainer.compose import compose_config
from trainer.config import job_config
from trainer.data import build_dataset
from trainer.model import build_model

JOB = ["ttt=none", "model=tiny", "data=synthetic_passkey", "data.seq_len=128", "data.loss_on=answers"]


def test_statistics_of_one_document_match_a_direct_computation():
    job = job_config(compose_config(JOB))
    result = measure(job, [0, 1], documents=1)
    sample = build_dataset(job.data.name, job.data.seq_len, job.model.config["vocab_size"], job.seed + 1,
                           job.data.options)[0]  # fmt: skip
    ids, labels = sample["input_ids"][0].tolist(), sample["labels"][0].tolist()
    query = next(i for i, t in enumerate(labels) if t != -100)
    answer = [t for t in labels if t != -100]
    write = _occurrences(ids, answer)[0] - 1
    assert 0 < write < query and ids[write + 1 : write + 1 + len(answer)] == answer
    model = build_model(job.model, job.ttt, torch.device("cpu"), job.seed).eval()
    for layer, keys in _keys_of(model, sample["input_ids"][0], [0, 1]).items():
        z = torch.nn.functional.normalize(keys, dim=-1)
        cos = z[:query] @ z[query]
        assert abs(result[layer]["cos_write"] - float(cos[write])) < 1e-12
        assert result[layer]["rank"] == int((cos > cos[write]).sum()) + 1
        assert abs(result[layer]["share"] - float(cos[write].clamp(min=0) / cos.clamp(min=0).sum())) < 1e-12


def test_the_command_prints_a_row_per_layer(capsys):
    main(["--documents", "2", "--layers", "0", "1", "--", *JOB[1:]])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| layer |") and [r.split("|")[1].strip() for r in rows[2:]] == ["0", "1"]
