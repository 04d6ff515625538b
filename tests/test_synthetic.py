"""Synthetic long-context tasks: determinism, the pinned default stream, exact answer spans, needle
depth, recall distances, packing, one-line errors, and a short training run on a new task."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from test_train import compose_job
from transformers import AutoTokenizer

from parallel.sharding import IGNORE_INDEX, next_token_labels
from trainer.data import build_dataset
from trainer.data.synthetic import GENERATORS, SyntheticPasskey, SyntheticRecall
from trainer.data.synthetic.language import BOS, SPECIALS
from trainer.loop import run

VOCAB, TEXT_VOCAB = 61, 300  # a tiny test model's vocabulary; the test tokenizer's size
TOKEN_FREE = {
    "synthetic_recall": dict(num_pairs=3),
    "synthetic_passkey": dict(digits=4),
    "synthetic_niah": dict(num_needles=3, num_queries=2, digits=3),
}
TEXT = {
    "synthetic_recall_text": dict(num_pairs=3),
    "synthetic_passkey_text": dict(),
    "synthetic_niah_text": dict(num_needles=3, num_queries=2),
}
RULER_TOKEN_FREE = {  # RULER's multi-value needle, variable tracking and common words extraction
    "synthetic_niah_multivalue": dict(num_values=3, digits=3),
    "synthetic_vt": dict(num_chains=2, num_hops=3, digits=3),
    "synthetic_cwe": dict(num_common=3, ratio=3),
}
RULER_TEXT = {
    "synthetic_niah_multivalue_text": dict(num_values=3),
    "synthetic_vt_text": dict(num_chains=2, num_hops=3),
    "synthetic_cwe_text": dict(num_common=3, ratio=3),
}


def make(name: str, tokenizer_dir=None, seq_len: int | None = None, seed: int = 0, **knobs):
    """A generator for the tiny test model; text ones get longer documents (the test tokenizer's words
    take several tokens each)."""
    if name in TEXT or name in RULER_TEXT:
        return GENERATORS[name](vocab_size=TEXT_VOCAB, seq_len=seq_len or 1024, seed=seed, tokenizer=str(tokenizer_dir),
                                **{**TEXT.get(name, RULER_TEXT.get(name)), **knobs})  # fmt: skip
    knobs = {**TOKEN_FREE.get(name, RULER_TOKEN_FREE.get(name)), **knobs}
    return GENERATORS[name](vocab_size=VOCAB, seq_len=seq_len or 256, seed=seed, **knobs)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def digest(dataset, count: int) -> str:
    hashed = hashlib.sha256()
    for index in range(count):
        item = dataset[index]
        for key in ("input_ids", "position_ids", "labels"):
            hashed.update(key.encode() + item[key].to(torch.int64).numpy().tobytes())
    return hashed.hexdigest()


def test_default_recall_stream_is_unchanged():
    """Digests of the synthetic_recall stream made by the generator before the task package existed."""
    job = compose_job()  # ttt-train's defaults: data=synthetic_recall, the tiny model
    default = build_dataset(job.data.name, job.data.seq_len, job.model.config["vocab_size"], job.seed, job.data.options)
    assert digest(default, 8) == "46085caf519cd4fe5466ab9b2047637388cd7163c9d2e916110265fc9392061b"
    packed = SyntheticRecall(vocab_size=256, seq_len=128, seed=0, num_pairs=4, docs_per_sequence=3)
    assert digest(packed, 8) == "b7ee34b9f0977f7cc361f4b272e578ffff4366bc05140c895c6819465797c564"
    small = SyntheticRecall(vocab_size=61, seq_len=200, seed=7, num_pairs=3, docs_per_sequence=2)
    assert digest(small, 5) == "840225f447a1ec821fa584b05bb6cfa1dae06c57e5ae4c968f7dec580416b35a"


@pytest.mark.parametrize("name", [*TOKEN_FREE, *TEXT, *RULER_TOKEN_FREE, *RULER_TEXT])
def test_sequences_depend_on_seed_and_index_only(name, tokenizer_dir):
    first = make(name, tokenizer_dir)
    forward = [first[i] for i in range(4)]
    second = make(name, tokenizer_dir)
    backward = [second[i] for i in reversed(range(4))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert a.keys() == {"input_ids", "position_ids", "labels"}
        for key in a:
            assert a[key].shape == (1, first.seq_len) and torch.equal(a[key], b[key])
    assert not torch.equal(forward[0]["input_ids"], forward[1]["input_ids"])
    assert not torch.equal(forward[0]["input_ids"], make(name, tokenizer_dir, seed=1)[0]["input_ids"])
    assert torch.equal(first.sample(2).input_ids, forward[2]["input_ids"])


@pytest.mark.parametrize("name", TOKEN_FREE)
def test_token_free_answers_repeat_what_was_written(name):
    dataset = make(name)
    count, width = {"synthetic_recall": (3, 1), "synthetic_passkey": (1, 4), "synthetic_niah": (2, 3)}[name]
    for index in range(5):
        sample = dataset.sample(index)
        ids = sample.input_ids[0]
        assert len(sample.answers) == count
        for answer in sample.answers:
            span, written = ids[answer.start : answer.end], answer.start - answer.distance
            assert len(span) == width and answer.text is None
            assert torch.isin(span, dataset.language.values).all()  # values or digits, never filler
            assert torch.equal(span, ids[written : written + width])
            if name == "synthetic_passkey":  # the query marker asks, the needle marker wrote
                assert (ids[answer.start - 1], ids[written - 1]) == (SPECIALS + 1, SPECIALS)
            else:  # the same key precedes the write and the query
                assert ids[answer.start - 1] == ids[written - 1] and torch.isin(ids[written - 1], dataset.language.keys)


@pytest.mark.parametrize("name", TEXT)
def test_text_answer_spans_decode_to_the_expected_answer(name, tokenizer_dir, tokenizer):
    dataset = make(name, tokenizer_dir)
    for index in range(4):
        sample = dataset.sample(index)
        ids = sample.input_ids[0]
        (document,) = sample.documents
        assert tokenizer.decode(ids) == document.text  # pieces tokenized apart still spell the document
        assert len(sample.answers) == {"synthetic_recall_text": 3, "synthetic_passkey_text": 1}.get(name, 2)
        for answer in sample.answers:
            assert tokenizer.decode(ids[answer.start : answer.end]).strip() == answer.text
            assert answer.text.isdigit() and len(answer.text) == dataset.language.digits
            assert tokenizer.decode(ids[: answer.start]) == sample.prompt(answer)
            assert sample.prompt(answer).endswith(" is")  # the question, right before its answer
            written = answer.start - answer.distance
            assert tokenizer.decode(ids[written : written + answer.end - answer.start]).strip() == answer.text


def resolve_chains(statements: list[tuple[str, str, bool]]) -> dict[str, str]:
    """The value of every variable of (variable, right-hand side, rhs is a variable) statements in order."""
    values = {}
    for variable, rhs, is_variable in statements:
        values[variable] = values[rhs] if is_variable else rhs
    return values


@pytest.mark.parametrize("name", RULER_TOKEN_FREE)
def test_ruler_token_free_answers_are_right(name):
    dataset = make(name)
    language, marker = dataset.language, {part: SPECIALS + i for i, part in enumerate(["needle", "query", "and"])}
    for index in range(4):
        sample = dataset.sample(index)
        ids = sample.input_ids[0].tolist()
        answers = sorted(sample.answers, key=lambda a: a.start)
        spans = [ids[a.start : a.end] for a in answers]
        written = [ids[a.start - a.distance : a.end - a.distance] for a in answers]
        if name == "synthetic_niah_multivalue":  # all values of the one key, each after "and" but the first
            assert spans == written and len(spans) == 3 and all(len(span) == 3 for span in spans)
            key = ids[answers[0].start - 1]
            assert all(ids[a.start - a.distance - 2 : a.start - a.distance] == [marker["needle"], key] for a in answers)
            assert [ids[a.start - 1] for a in answers[1:]] == [marker["and"]] * 2
        elif name == "synthetic_vt":  # markers: var, is, query; a statement is var K is (digits | var K)
            var, is_, query = SPECIALS, SPECIALS + 1, SPECIALS + 2
            statements, t = [], 0
            while t < answers[0].start:
                if ids[t] == var and ids[t + 2] == is_:
                    rhs = (ids[t + 4],) if ids[t + 3] == var else tuple(ids[t + 3 : t + 6])
                    statements.append((ids[t + 1], rhs, ids[t + 3] == var))
                    t += 5 if ids[t + 3] == var else 6
                else:
                    t += 1
            values = resolve_chains([(k, rhs[0] if chained else rhs, chained) for k, rhs, chained in statements])
            asked = tuple(ids[answers[0].start - 3 : answers[0].start])  # query marker, the value's digits
            assert ids[answers[0].start - 4] == query and len(statements) == 2 * 4
            assert [span[0] for span in spans] == [k for k, _, _ in statements if values[k] == asked]  # chain order
            assert spans == written
        else:  # the asked words are the most frequent ones in the list, `ratio` times as frequent as the rest
            listed = [t for t in ids[: answers[0].start - 1] if t in set(language.keys.tolist())]
            counts = sorted(((listed.count(k), k) for k in set(listed)), reverse=True)
            assert {k for _, k in counts[:3]} == {span[0] for span in spans} and spans == written
            assert counts[2][0] == 3 * counts[3][0] and ids[answers[0].start - 1] == SPECIALS


@pytest.mark.parametrize("name", RULER_TEXT)
def test_ruler_text_answers_are_right(name, tokenizer_dir, tokenizer):
    import re

    dataset = make(name, tokenizer_dir)
    for index in range(3):
        sample = dataset.sample(index)
        ids, text = sample.input_ids[0], sample.documents[0].text
        assert tokenizer.decode(ids) == text
        answers = sorted(sample.answers, key=lambda a: a.start)
        for answer in answers:
            assert tokenizer.decode(ids[answer.start : answer.end]).strip() == answer.text
            assert tokenizer.decode(ids[: answer.start]) == sample.prompt(answer)
        expected = [a.text for a in answers]
        asked = text[answers[0].char_start :]
        assert asked == " " + ", ".join(expected)  # the answers end the document, listed in one reply
        if name == "synthetic_niah_multivalue_text":
            key = re.search(r"magic numbers for (\S+) mentioned", sample.prompt(answers[0])).group(1)
            assert sorted(re.findall(rf"magic numbers for {key} is: (\d+)\.", text)) == sorted(expected)
        elif name == "synthetic_vt_text":
            statements = re.findall(r"VAR (\S+) = (VAR )?(\S+)\.", text)
            values = resolve_chains([(k, rhs, bool(chained)) for k, chained, rhs in statements])
            value = re.search(r"assigned the value (\d+) are:$", sample.prompt(answers[0])).group(1)
            assert expected == [k for k, _, _ in statements if values[k] == value] and len(statements) == 2 * 4
        else:
            listed = re.findall(r" (\S+),", text[: text.index(" Question:")])
            counts = sorted(((listed.count(w), w) for w in set(listed)), reverse=True)
            assert {w for _, w in counts[:3]} == set(expected) and counts[2][0] >= 3 * counts[3][0]


def test_answers_only_loss_keeps_the_labels_that_predict_answers(tokenizer_dir):
    for name in ("synthetic_niah", "synthetic_recall_text"):
        everything = make(name, tokenizer_dir)[1]
        answers_only = make(name, tokenizer_dir, loss_on="answers")
        sample, labels = answers_only.sample(1), answers_only[1]["labels"][0]
        assert torch.equal(everything["labels"], next_token_labels(sample.input_ids, sample.position_ids))
        scored = torch.zeros_like(labels, dtype=torch.bool)
        for answer in sample.answers:
            start, end = answer.start, answer.end
            scored[start - 1 : end - 1] = True  # labels[t] is the token at t + 1
            assert torch.equal(labels[start - 1 : end - 1], sample.input_ids[0, start:end])
        assert scored.any() and ((labels != IGNORE_INDEX) == scored).all()


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_depth_is_honoured(depth, tokenizer_dir):
    digits, needle_marker = 4, SPECIALS  # the passkey's first marker
    filler = 256 - 1 - 2 * (1 + digits)  # BOS, needle and query are all else
    for index in range(3):
        sample = make("synthetic_passkey", depth=depth).sample(index)
        (answer,) = sample.answers
        position = sample.input_ids[0].tolist().index(needle_marker)
        assert position == 1 + round(depth * filler) and answer.depth == pytest.approx(round(depth * filler) / filler)
        text = make("synthetic_niah_text", tokenizer_dir, depth=depth, num_needles=1, num_queries=1)
        (answer,) = text.sample(index).answers
        assert abs(answer.depth - depth) < 0.05  # the nearest sentence end to the requested depth
    randomly = [make("synthetic_niah").sample(i).answers[0].depth for i in range(20)]
    assert min(randomly) < 0.3 and max(randomly) > 0.7


def test_recall_key_query_distances_follow_the_gap():
    pairs, gap = 3, 40
    dataset = make("synthetic_recall", query_gap=gap)
    for index in range(4):
        sample = dataset.sample(index)
        ids = sample.input_ids[0].tolist()
        first_query = min(answer.start for answer in sample.answers) - 1
        assert first_query - (1 + 2 * pairs) == gap  # filler tokens between the writes and the queries
        for answer in sample.answers:
            key = ids[answer.start - 1]
            assert answer.distance == (answer.start - 1) - ids.index(key)  # the key's write to its query
            assert gap + 2 <= answer.distance <= gap + 4 * pairs - 2
    ranged = make("synthetic_recall", query_gap=10, query_gap_max=150)
    gaps = {min(a.start for a in ranged.sample(i).answers) - 1 - (1 + 2 * pairs) for i in range(12)}
    assert len(gaps) > 3 and min(gaps) >= 10 and max(gaps) <= 150
    at_end = make("synthetic_recall").sample(0)  # no gap given: the queries end the document
    assert max(answer.end for answer in at_end.answers) == 256


def test_text_recall_reports_distances_from_each_write(tokenizer_dir, tokenizer):
    sample = make("synthetic_recall_text", tokenizer_dir, seq_len=512, query_gap=200).sample(0)
    text = sample.documents[0].text
    for answer in sample.answers:
        line = sample.prompt(answer)[sample.prompt(answer).rindex(" The code for") :]  # " The code for <key> is"
        write_chars = text.index(line + " " + answer.text)
        written = len(tokenizer(text[: write_chars + len(line)], add_special_tokens=False)["input_ids"])
        assert answer.distance == answer.start - written
        sentence, line = 33, 32  # the longest filler sentence and code line, in tokens
        assert 200 - sentence <= answer.distance <= 200 + sentence + 2 * 3 * line  # snapped gap, plus the lines


@pytest.mark.parametrize("name", ["synthetic_niah", "synthetic_passkey_text"])
def test_packed_documents_keep_their_boundaries(name, tokenizer_dir, tokenizer):
    dataset = make(name, tokenizer_dir, seq_len=900, docs_per_sequence=3)
    sample = dataset.sample(0)
    labels = dataset[0]["labels"][0]
    assert [d.start for d in sample.documents] == [0, 300, 600] and sum(d.length for d in sample.documents) == 900
    for index, document in enumerate(sample.documents):
        end = document.start + document.length
        assert sample.position_ids[0, document.start : end].tolist() == list(range(document.length))
        assert labels[end - 1] == IGNORE_INDEX  # no label crosses into the next document
        own = [a for a in sample.answers if a.document == index]
        assert own and all(document.start <= a.start - a.distance and a.end <= end for a in own)
        if document.text is None:
            assert sample.input_ids[0, document.start] == BOS
        else:
            assert tokenizer.decode(sample.input_ids[0, document.start : end]) == document.text


@pytest.mark.parametrize(
    "name,knobs,message",
    [
        ("synthetic_recall", dict(num_pairs=20), "data: vocab_size=61 is too small for num_pairs=20"),
        ("synthetic_passkey", dict(vocab_size=16), "data: vocab_size=16 is too small for digits=4"),
        ("synthetic_niah", dict(num_needles=12), "data: vocab_size=61 is too small for num_needles=12"),
        ("synthetic_niah", dict(depth=1.5), "data.depth must be null or a number in [0, 1], got 1.5"),
        ("synthetic_niah", dict(num_queries=4), "data.num_queries must be an integer in [1, num_needles=3], got 4"),
        ("synthetic_niah", dict(digits=0), "data.digits must be an integer in [1, 18], got 0"),
        ("synthetic_passkey", dict(seq_len=8), "data: documents of 8 tokens cannot hold 1 needle(s) and 1 query(ies)"),
        ("synthetic_recall", dict(query_gap=250), "data.query_gap must be an integer in [0, 243]"),
        ("synthetic_recall", dict(query_gap=9, query_gap_max=5), "data.query_gap_max must be null or an integer in"),
        ("synthetic_recall", dict(loss_on="values"), "data.loss_on must be one of all, answers, got 'values'"),
        ("synthetic_recall", dict(docs_per_sequence=0), "data.docs_per_sequence must be an integer in [1, 256]"),
        ("synthetic_passkey_text", dict(tokenizer=None), "data.tokenizer must be a local tokenizer folder, got None"),
        ("synthetic_niah_text", dict(vocab_size=256), "data: the tokenizer has 300 ids, more than vocab_size=256"),
        ("synthetic_niah_text", dict(num_needles=200), "data.num_needles must be an integer in [1, 144]"),
        ("synthetic_niah_multivalue", dict(num_values=0), "data.num_values must be an integer in [1, 11]"),
        ("synthetic_vt", dict(num_chains=3), "data: vocab_size=61 is too small for num_chains=3 of num_hops=3"),
        ("synthetic_vt_text", dict(num_chains=40), "data.num_chains must be an integer in [1, 36]"),
        ("synthetic_vt", dict(num_hops=-1), "data.num_hops must be an integer >= 0"),
        ("synthetic_cwe", dict(ratio=1), "data.ratio must be an integer >= 2"),
        ("synthetic_cwe", dict(seq_len=12), "data: documents of 12 tokens cannot hold 3 common words 3 times each"),
        ("synthetic_cwe_text", dict(num_common=144), "data.num_common must be an integer in [1, 143]"),
    ],
)
def test_bad_settings_fail_with_one_line(name, knobs, message, tokenizer_dir):
    knobs = {**knobs}
    vocab_size = knobs.pop("vocab_size", TEXT_VOCAB if name in TEXT or name in RULER_TEXT else VOCAB)
    if name in TEXT or name in RULER_TEXT:
        knobs = {**TEXT.get(name, RULER_TEXT.get(name)), "tokenizer": str(tokenizer_dir), **knobs}
    else:
        knobs = {**TOKEN_FREE.get(name, RULER_TOKEN_FREE.get(name)), **knobs}
    with pytest.raises(ValueError) as err:
        GENERATORS[name](vocab_size=vocab_size, seq_len=knobs.pop("seq_len", 256), seed=0, **knobs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("loss_on", ["all", "answers"])
def test_training_on_a_new_task_runs(loss_on, tmp_path):
    job = compose_job("experiment=smoke", "parallel=single", "data=synthetic_passkey", f"data.loss_on={loss_on}",
                      "train.steps=2", "checkpoint.every=2", "logging.wandb.mode=disabled")  # fmt: skip
    run(job, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_chance_accuracy_is_a_uniform_guess_of_each_answer():
    """What the end-of-run line prints beside the accuracy: one value of the recall task (1/16 keys' values at
    vocab 68, the ablation's), five digits of a pass key."""
    assert SyntheticRecall(vocab_size=68, seq_len=256, seed=0).chance_accuracy() == 1 / 16
    assert SyntheticPasskey(vocab_size=68, seq_len=256, seed=0, digits=5).chance_accuracy() == pytest.approx(1e-5)
