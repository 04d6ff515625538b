"""tools.commands.prepare_data: every input kind round-trips to the tokenizer's ids, the output does not depend on
the worker count, re-runs keep finished shards, and bad inputs end in one line with no partial files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import trainer.data.prepare
from tools.commands.prepare_data import main
from tools.textdata import make_documents
from trainer.data.errors import DataError
from trainer.data.prepare import prepare
from trainer.data.shards import MANIFEST, ShardWriter, length_histogram, merge_histograms, open_prepared, read_manifest

DOCS = make_documents(60, seed=3)


def write_inputs(folder: Path, kind: str, docs: list[str]) -> Path:
    """`docs` as one input of `kind`; returns the path to pass to prepare."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "txt":  # a folder of text files, one document each, read in sorted name order
        for index, doc in enumerate(docs):
            (folder / f"doc-{index:03d}.txt").write_text(doc)
        return folder
    if kind == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
        return path
    pa = pytest.importorskip("pyarrow")
    if kind == "parquet":
        import pyarrow.parquet as pq

        path = folder / "docs.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=16)
        return path
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder / "hf"))
    return folder / "hf"


def shard_documents(folder: Path) -> list[list[int]]:
    _, shards = open_prepared(folder)
    return [shard.tokens[a:b].tolist() for shard in shards for a, b in zip(shard.offsets[:-1], shard.offsets[1:])]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "hf"])
def test_each_input_kind_round_trips_to_direct_tokenization(tmp_path, tokenizer_dir, kind):
    empty = [] if kind == "txt" else [""]  # an empty document is skipped and counted (an empty file is an error)
    docs = [*DOCS[:30], *empty, *DOCS[30:]]
    source = write_inputs(tmp_path / "in", kind, docs)
    result = prepare([source], tokenizer_dir, tmp_path / "out", shard_tokens=3000, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    want = [tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for doc in DOCS]
    assert shard_documents(tmp_path / "out") == want
    manifest = read_manifest(tmp_path / "out")
    assert result.shards_written == len(manifest["shards"]) > 1  # several shards, each >= 3000 tokens but the last
    assert all(s["tokens"] >= 3000 for s in manifest["shards"][:-1])
    assert (manifest["documents"], manifest["skipped_empty"]) == (len(DOCS), len(empty))
    assert manifest["tokens"] == sum(map(len, want)) == result.tokens
    assert manifest["max_token_id"] == max(max(ids) for ids in want)
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer)
    assert manifest["length_histogram"] == length_histogram([len(ids) for ids in want])


def test_no_eos_and_another_text_key(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in DOCS[:5]))
    prepare([path], tokenizer_dir, tmp_path / "out", append_eos=False, text_key="body", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert shard_documents(tmp_path / "out") == [tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS[:5]]


def test_length_histogram_bins_by_powers_of_two():
    assert length_histogram([1, 2, 3, 4, 5, 1000]) == [[1, 1], [2, 1], [4, 2], [8, 1], [1024, 1]]
    assert merge_histograms([[[4, 2], [8, 1]], [[2, 1], [8, 3]]]) == [[2, 1], [4, 2], [8, 4]]


def test_workers_do_not_change_a_byte_and_reruns_keep_finished_shards(tmp_path, tokenizer_dir):
    source = write_inputs(tmp_path / "in", "jsonl", DOCS)
    one = prepare([source], tokenizer_dir, tmp_path / "one", shard_tokens=2000, workers=1, progress=False)
    two = prepare([source], tokenizer_dir, tmp_path / "two", shard_tokens=2000, workers=2, progress=False)
    assert one.shards_written == two.shards_written > 2
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")

    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()}
    again = prepare([source], tokenizer_dir, tmp_path / "two", shard_tokens=2000, workers=2, progress=False)
    assert (again.shards_written, again.shards_kept, again.tokens_written) == (0, two.shards_written, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()} == stamps

    with pytest.raises(DataError, match="other inputs or settings"):
        prepare([source], tokenizer_dir, tmp_path / "two", shard_tokens=1000, progress=False)


def test_an_interrupted_run_resumes_after_its_last_finished_shard(tmp_path, tokenizer_dir, monkeypatch):
    docs = [*DOCS[:20], "", "", *DOCS[20:]]
    source = write_inputs(tmp_path / "in", "jsonl", docs)
    reference = prepare([source], tokenizer_dir, tmp_path / "reference", shard_tokens=2000, progress=False)

    real_commit, commits = ShardWriter.commit, []

    def crash_on_third(writer):
        commits.append(writer.tokens_path.name)
        if len(commits) == 3:
            raise KeyboardInterrupt  # killed while writing shard 2
        return real_commit(writer)

    monkeypatch.setattr(trainer.data.prepare.ShardWriter, "commit", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare([source], tokenizer_dir, tmp_path / "out", shard_tokens=2000, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST] + [
        f"shard-{i:05d}.{ext}" for i in range(2) for ext in ("offsets", "tokens")
    ]  # no temporary or half-written file
    with pytest.raises(DataError, match="preparation did not finish"):
        open_prepared(tmp_path / "out")

    monkeypatch.setattr(trainer.data.prepare.ShardWriter, "commit", real_commit)
    resumed = prepare([source], tokenizer_dir, tmp_path / "out", shard_tokens=2000, progress=False)
    assert (resumed.shards_kept, resumed.shards_written) == (2, reference.shards_written - 2)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "reference")

    corrupt = tmp_path / "out" / "shard-00001.tokens"  # a damaged finished shard is written again
    corrupt.write_bytes(b"\x07" + corrupt.read_bytes()[1:])
    repaired = prepare([source], tokenizer_dir, tmp_path / "out", shard_tokens=2000, progress=False)
    assert (repaired.shards_kept, repaired.shards_written) == (1, reference.shards_written - 1)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "reference")


def _parquet_bytes(tmp_path: Path) -> bytes:
    return write_inputs(tmp_path / "parquet", "parquet", DOCS[:10]).read_bytes()


BAD_INPUTS = {  # name -> (file name, contents or a function of tmp_path, expected message)
    "empty": ("docs.jsonl", b"", "docs.jsonl: empty file"),
    "blank": ("docs.jsonl", b"\n\n  \n", "docs.jsonl: no documents"),
    "truncated-jsonl": ("docs.jsonl", b'{"text": "a b"}\n{"text": "the riv', "docs.jsonl:2: invalid JSON"),
    "no-text-field": ("docs.jsonl", b'{"body": "a b"}\n', "docs.jsonl:1: no string field 'text'"),
    "non-utf8-jsonl": ("docs.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "docs.jsonl:2: not UTF-8"),
    "non-utf8-txt": ("doc.txt", b"a quiet river \xff\xfe", "doc.txt: not UTF-8 (byte 14)"),
    "corrupted-parquet": ("docs.parquet", bytes(range(256)) * 4, "docs.parquet: unreadable Parquet"),
    "truncated-parquet": ("docs.parquet", lambda p: _parquet_bytes(p)[:-100], "docs.parquet: unreadable Parquet"),
    "unknown-suffix": ("docs.csv", b"text\nhello\n", "docs.csv: unsupported input"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_inputs_end_in_one_line_and_leave_no_partial_files(tmp_path, tokenizer_dir, capsys, case):
    name, contents, message = BAD_INPUTS[case]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(contents(tmp_path) if callable(contents) else contents)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_bad_input_after_finished_shards_leaves_only_listed_complete_files(
    tmp_path, tokenizer_dir, capsys, monkeypatch
):
    monkeypatch.setattr(trainer.data.prepare, "_BATCH_CHARS", 2000)  # small batches: shards finish before the error
    good = write_inputs(tmp_path / "in", "jsonl", DOCS)
    bad = tmp_path / "in" / "z-bad.jsonl"
    bad.write_bytes(b'{"text": "a quiet garden"}\n\xff\n')
    argv = [str(good), str(bad), "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit):
        main([*argv, "--shard-tokens", "2000"])
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {bad}:2: not UTF-8 (byte 0 of the line)"]
    manifest = read_manifest(tmp_path / "out")
    listed = {s[key] for s in manifest["shards"] for key in ("tokens_file", "offsets_file")}
    assert not manifest["complete"] and listed
    assert {p.name for p in (tmp_path / "out").iterdir()} == listed | {MANIFEST}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["missing.jsonl", "--tokenizer", "{tok}"], "error: missing.jsonl: no such file or folder"),
        (["{doc}", "--tokenizer", "nowhere"], "error: nowhere: the tokenizer must be a local Hugging Face"),
        (["{doc}", "--tokenizer", "{tok}", "--workers", "0"], "error: argument --workers: expected a positive"),
    ],
)
def test_bad_arguments_end_in_one_line(tmp_path, tokenizer_dir, capsys, argv, message):
    doc = write_inputs(tmp_path / "in", "jsonl", DOCS[:3])
    argv = [a.format(tok=tokenizer_dir, doc=doc) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_the_command_line_prints_a_summary(tmp_path, tokenizer_dir):
    doc = write_inputs(tmp_path / "in", "jsonl", DOCS[:10])
    command = [sys.executable, "-m", "tools.commands.prepare_data", str(doc), "--tokenizer", str(tokenizer_dir)]
    result = subprocess.run(
        [*command, "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["documents"], summary["shards_written"]) == (10, 1)
    assert summary["tokens"] == read_manifest(tmp_path / "out")["tokens"]
