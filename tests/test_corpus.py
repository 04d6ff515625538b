"""The corpus dataset: packing keeps document boundaries, filters and mixture weights hold, sequences are
deterministic by seed and sharded over data-parallel ranks, damaged shards fail in one line, and a
prepared corpus trains and resumes on exactly the next sequence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import training_numbers
from test_train import FAST, cli, compose_job, metrics

from parallel.sharding import IGNORE_INDEX, document_starts
from tools.textdata import make_documents
from trainer.data import SequenceLoader, build_dataset
from trainer.data.corpus import CorpusDataset
from trainer.data.errors import DataError
from trainer.data.prepare import prepare
from trainer.data.shards import MANIFEST, open_prepared
from trainer.loop import run

VOCAB, SEQ = 300, 128


@pytest.fixture(scope="module")
def corpora(tokenizer_dir, tmp_path_factory):
    """Two prepared sources: many short documents and fewer long ones (longer than SEQ)."""
    root = tmp_path_factory.mktemp("corpora")
    texts = {"short": make_documents(300, seed=11, max_sentences=5), "long": make_documents(60, 12, 25, 45)}
    for name, docs in texts.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prepare([root / f"{name}.jsonl"], tokenizer_dir, root / name, shard_tokens=5000, progress=False)
    both = [root / "short.jsonl", root / "long.jsonl"]
    prepare(both, tokenizer_dir, root / "both", shard_tokens=5000, progress=False)
    eos = json.loads((root / "both" / MANIFEST).read_text())["tokenizer"]["eos_id"]
    return {"root": root, "eos": eos, **{name: str(root / name) for name in ("short", "long", "both")}}


def documents(folder: str) -> list[tuple[int, ...]]:
    _, shards = open_prepared(folder)
    return [tuple(s.tokens[a:b].tolist()) for s in shards for a, b in zip(s.offsets[:-1], s.offsets[1:])]


def expected_labels(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The next token where it belongs to the same document (its position is not 0), else ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    same_doc = position_ids[:, 1:] != 0
    labels[:, :-1][same_doc] = input_ids[:, 1:][same_doc]
    return labels


def epoch_documents(dataset: CorpusDataset, eos: int, epoch: int = 0) -> list[tuple[int, ...]]:
    """The documents one epoch's sequences hold, pieces cut by a sequence end joined again (documents end
    with EOS, so a piece without it continues in the next sequence). Without packing a sequence holds one
    piece and then padding, a document of its own without labels."""
    found, carry = [], ()
    for index in range(epoch * dataset.sequences_per_epoch, (epoch + 1) * dataset.sequences_per_epoch):
        item = dataset[index]
        ids, pos, labels = item["input_ids"], item["position_ids"], item["labels"]
        assert ids.shape == pos.shape == labels.shape == (1, dataset.seq_len)
        assert torch.equal(document_starts(pos), pos == 0)  # documents start exactly where positions restart
        starts = (pos[0] == 0).nonzero().flatten().tolist() + [dataset.seq_len]
        real = dataset.seq_len if dataset.packing else starts[1]
        assert torch.equal(labels[:, :real], expected_labels(ids, pos)[:, :real])  # never across a document
        assert (labels[:, real:] == IGNORE_INDEX).all() and (ids[:, real:] == 0).all()  # padding
        pieces = [tuple(ids[0, a:b].tolist()) for a, b in zip(starts[:-1], starts[1:]) if a < real]
        for number, piece in enumerate(pieces):
            if number < len(pieces) - 1:
                assert piece[-1] == eos  # only a sequence's last piece may be cut
            piece = (carry + piece) if number == 0 else piece
            carry = () if piece[-1] == eos else piece
            if not carry:
                found.append(piece)
    return found


def test_packing_fills_sequences_and_keeps_document_boundaries(corpora):
    docs = documents(corpora["both"])
    dataset = CorpusDataset(VOCAB, SEQ, seed=0, sources=[corpora["both"]])
    assert dataset.sequences_per_epoch == sum(map(len, docs)) // SEQ  # only a tail shorter than SEQ is dropped
    seen = Counter(epoch_documents(dataset, corpora["eos"]))
    assert max(map(len, docs)) > 3 * SEQ  # long documents were split over sequences and joined again
    assert not seen - Counter(docs)  # every one a whole document, each at most once
    assert sum(map(len, docs)) - sum(len(d) * n for d, n in seen.items()) < SEQ + max(map(len, docs))


def test_without_packing_each_document_starts_a_sequence_and_padding_has_no_labels(corpora):
    docs = documents(corpora["both"])
    dataset = CorpusDataset(VOCAB, SEQ, seed=0, sources=[corpora["both"]], packing=False)
    assert dataset.sequences_per_epoch == sum(-(-len(d) // SEQ) for d in docs)
    assert Counter(epoch_documents(dataset, corpora["eos"])) == Counter(docs)  # all of them, once
    padded = [dataset[i]["position_ids"][0] for i in range(20)]
    assert any((pos[1:] == 0).any() for pos in padded)  # some sequences were padded (checked above)


def test_min_doc_len_keeps_only_long_enough_documents(corpora):
    docs = documents(corpora["both"])
    dataset = CorpusDataset(VOCAB, SEQ, seed=0, sources=[corpora["both"]], packing=False, min_doc_len=200)
    assert Counter(epoch_documents(dataset, corpora["eos"])) == Counter(d for d in docs if len(d) >= 200)
    packed = CorpusDataset(VOCAB, SEQ, seed=0, sources=[corpora["both"]], min_doc_len=200)
    assert min(map(len, epoch_documents(packed, corpora["eos"]))) >= 200


def source_share(weights: tuple[float, float], corpora, seed: int) -> float:
    short = set(documents(corpora["short"]))
    sources = [{"path": corpora["short"], "weight": weights[0]}, {"path": corpora["long"], "weight": weights[1]}]
    found = epoch_documents(CorpusDataset(VOCAB, SEQ, seed=seed, sources=sources), corpora["eos"])
    return sum(len(d) for d in found if d in short) / sum(map(len, found))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (3.0, 1.0), (1.0, 4.0)])
def test_mixture_weights_set_each_source_share_of_tokens(corpora, weights):
    shares = [source_share(weights, corpora, seed) for seed in range(3)]
    assert sum(shares) / len(shares) == pytest.approx(weights[0] / sum(weights), abs=0.03)


def test_long_documents_are_upsampled_within_their_source(corpora):
    docs = documents(corpora["both"])
    options = dict(sources=[corpora["both"]], packing=False, long_doc_len=400, long_doc_upsample=3.0)
    seen = Counter(epoch_documents(CorpusDataset(VOCAB, SEQ, seed=0, **options), corpora["eos"]))
    long_docs, short_docs = [d for d in docs if len(d) >= 400], [d for d in docs if len(d) < 400]
    per_long = sum(seen[d] for d in long_docs) / len(long_docs)
    per_short = sum(seen[d] for d in short_docs) / len(short_docs)
    assert per_long / per_short == pytest.approx(3.0, rel=0.15)


def test_sequences_are_deterministic_by_seed_and_epochs_reshuffle(corpora):
    options = dict(sources=[{"path": corpora["short"], "weight": 2}, corpora["long"]], packing=False)
    first, again = CorpusDataset(VOCAB, SEQ, seed=5, **options), CorpusDataset(VOCAB, SEQ, seed=5, **options)
    other = CorpusDataset(VOCAB, SEQ, seed=6, **options)
    n = first.sequences_per_epoch
    for index in (0, 1, n - 1, n, 2 * n + 7):  # across epochs, in any order
        assert all(torch.equal(first[index][k], again[index][k]) for k in ("input_ids", "position_ids", "labels"))
    assert not all(torch.equal(first[i]["input_ids"], other[i]["input_ids"]) for i in range(4))
    epoch0, epoch1 = epoch_documents(first, corpora["eos"], 0), epoch_documents(first, corpora["eos"], 1)
    assert epoch0 != epoch1 and Counter(epoch0) == Counter(epoch1)  # the same documents, another order


class Recording:
    def __init__(self, dataset) -> None:
        self.dataset, self.read = dataset, []

    def __getitem__(self, index: int):
        self.read.append(index)
        return self.dataset[index]


@pytest.mark.parametrize("dp_size,batch", [(1, 2), (3, 2), (4, 1)])
def test_data_parallel_ranks_read_disjoint_covering_sequences_and_resume_exactly(corpora, dp_size, batch):
    dataset = CorpusDataset(VOCAB, SEQ, seed=0, sources=[corpora["both"]])
    ranks = [Recording(dataset) for _ in range(dp_size)]
    loaders = [SequenceLoader(r, batch, dp_rank, dp_size) for dp_rank, r in enumerate(ranks)]
    cp_peer = SequenceLoader(dataset, batch, dp_size - 1, dp_size)  # another CP rank of the last DP group
    for _ in range(3):
        batches = [loader.next_batch() for loader in loaders]
        assert torch.equal(cp_peer.next_batch()["input_ids"], batches[-1]["input_ids"])
    reads = [r.read for r in ranks]
    assert sorted(i for read in reads for i in read) == list(range(3 * batch * dp_size))  # disjoint, covering

    resumed = Recording(dataset)
    loader = SequenceLoader(resumed, batch, 0, dp_size)
    loader.load_state_dict(loaders[0].state_dict())
    expected = [dataset[3 * batch * dp_size + j]["input_ids"] for j in range(batch)]
    assert torch.equal(loader.next_batch()["input_ids"], torch.cat(expected))
    assert resumed.read == list(range(3 * batch * dp_size, 3 * batch * dp_size + batch))


def damage(folder, how: str) -> None:
    tokens = folder / "shard-00001.tokens"
    manifest = json.loads((folder / MANIFEST).read_text())
    if how == "flip":
        data = bytearray(tokens.read_bytes())
        data[100] ^= 1
        tokens.write_bytes(bytes(data))
    elif how == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-6])
    elif how == "delete":
        (folder / "shard-00000.offsets").unlink()
    elif how == "unfinished":
        (folder / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    elif how == "no-manifest":
        (folder / MANIFEST).unlink()
    elif how == "garbled-manifest":
        (folder / MANIFEST).write_bytes(b'{"format": "ttt-longctx-shards/1", "sha')


@pytest.mark.parametrize(
    "how,message",
    [
        ("flip", "shard-00001.tokens: corrupted shard (sha256 differs from the manifest)"),
        ("truncate", "shard-00001.tokens: truncated or overwritten shard"),
        ("delete", "shard-00000.offsets: shard file missing"),
        ("unfinished", "preparation did not finish"),
        ("no-manifest", "not a prepared corpus (no manifest.json)"),
        ("garbled-manifest", "manifest.json: unreadable manifest"),
    ],
)
def test_damaged_shards_fail_with_one_line_naming_the_file(corpora, tmp_path, how, message):
    folder = shutil.copytree(corpora["short"], tmp_path / "copy")
    damage(folder, how)
    with pytest.raises(DataError) as error:
        build_dataset("corpus", SEQ, VOCAB, 0, {"sources": [str(folder)]})
    assert message in str(error.value) and "\n" not in str(error.value)
    if how == "flip":  # sizes only: the corruption goes unseen, which is what verify_checksums=false trades
        CorpusDataset(VOCAB, SEQ, 0, sources=[str(folder)], verify_checksums=False)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"sources": []}, "data.sources must list prepared folders"),
        ({"sources": [{"path": "{short}", "weight": 0}]}, "data.sources[0] must be a folder or {path, weight > 0}"),
        ({"sources": [{"path": "{short}", "wieght": 1}]}, "data.sources[0] must be a folder or {path, weight > 0}"),
        ({"sources": ["{short}"], "min_doc_len": 10**6}, "no document of"),
        ({"sources": ["{short}"], "min_doc_len": -1}, "data.min_doc_len must be an integer >= 0, got -1"),
        ({"sources": ["{short}"], "long_doc_upsample": 0}, "data.long_doc_upsample must be a number > 0, got 0"),
        ({"sources": ["{short}"], "vocab_size": 256}, "beyond the model's vocab_size=256 (tokenizer: 300)"),
    ],
)
def test_bad_options_fail_with_one_line(corpora, options, message):
    options = json.loads(json.dumps(options).replace("{short}", corpora["short"]))
    vocab = options.pop("vocab_size", VOCAB)
    with pytest.raises(DataError) as error:
        build_dataset("corpus", SEQ, vocab, 0, options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_corpus_the_model_cannot_read_stops_ttt_train_with_one_line(corpora, tmp_path):
    overrides = [*FAST, "data=corpus", f"data.sources=[{corpora['short']}]", f"hydra.run.dir={tmp_path}"]
    result = cli(*overrides, check=False, timeout=120)  # the tiny model's vocabulary: 256 < 300
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: data.sources[0]: ") and "beyond the model's vocab_size=256" in line


def test_prepare_train_and_resume_read_the_same_sequences(corpora, tokenizer_dir, tmp_path, monkeypatch):
    prepared, full, resumed = tmp_path / "prepared", tmp_path / "full", tmp_path / "resumed"
    command = [sys.executable, "-m", "tools.commands.prepare_data", str(corpora["root"] / "long.jsonl"), "--quiet"]
    subprocess.run([*command, "--tokenizer", str(tokenizer_dir), "--output", str(prepared)], check=True, timeout=120)
    overrides = [*FAST, "data=corpus", f"data.sources=[{{path:{prepared},weight:1}}]",
                 f"model.config.vocab_size={VOCAB}", "logging.wandb.mode=disabled"]  # fmt: skip
    cli(*overrides, f"hydra.run.dir={full}")

    reads, real_getitem = [], CorpusDataset.__getitem__

    def recorded(dataset, index):
        item = real_getitem(dataset, index)
        reads.append((index, item["input_ids"]))
        return item

    monkeypatch.setattr(CorpusDataset, "__getitem__", recorded)
    run(compose_job(*overrides, f"checkpoint.resume={full}/checkpoints/step-3"), resumed)
    assert [index for index, _ in reads] == [3, 4, 5]  # smoke: one sequence a step, resumed after step 3
    monkeypatch.setattr(CorpusDataset, "__getitem__", real_getitem)
    fresh = CorpusDataset(VOCAB, 128, seed=0, sources=[str(prepared)])
    assert all(torch.equal(ids, fresh[index]["input_ids"]) for index, ids in reads)
    assert training_numbers(metrics(resumed)) == training_numbers(metrics(full)[3:])  # bit for bit, times aside


def test_shuffle_reads_an_epochs_sequences_in_another_order_by_seed(corpora):
    options = dict(sources=[corpora["long"]])
    plain = CorpusDataset(VOCAB, SEQ, seed=3, **options)
    shuffled, again = (CorpusDataset(VOCAB, SEQ, seed=3, shuffle=True, **options) for _ in range(2))
    n = plain.sequences_per_epoch
    assert shuffled.sequences_per_epoch == n
    for epoch in (0, 1):
        seen = [tuple(shuffled[epoch * n + i]["input_ids"][0].tolist()) for i in range(n)]
        stream = [tuple(plain[epoch * n + i]["input_ids"][0].tolist()) for i in range(n)]
        assert Counter(seen) == Counter(stream) and seen != stream  # the same sequences, another order
        assert seen == [tuple(again[epoch * n + i]["input_ids"][0].tolist()) for i in range(n)]
    with pytest.raises(DataError, match="data.shuffle must be true or false, got 'yes'"):
        CorpusDataset(VOCAB, SEQ, seed=3, shuffle="yes", **options)
