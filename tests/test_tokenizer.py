"""`ttt-train-tokenizer`: a byte-level BPE trained locally, the same bytes for the same documents, kept on a rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from tools.commands.train_tokenizer import main, train_tokenizer
from tools.textdata import make_documents
from trainer.data.errors import DataError


@pytest.fixture
def documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in make_documents(300, seed=1)))
    return path


def test_trained_twice_it_is_the_same_tokenizer_whatever_the_threads(tmp_path, documents):
    first = train_tokenizer([str(documents)], 400, tmp_path / "a")
    command = [sys.executable, "-m", "tools.commands.train_tokenizer", str(documents), "--vocab-size", "400",
               "--out", str(tmp_path / "b")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "RAYON_NUM_THREADS": "1"})
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert (
        first["tokenizer_json_sha256"]
        == json.loads((tmp_path / "b" / "training.json").read_text())["tokenizer_json_sha256"]
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    text = "The quiet river finds a model. Ünïcode and tabs\t too"
    assert len(tokenizer) == 400 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_a_rerun_keeps_the_folder_and_other_inputs_retrain_it(tmp_path, documents):
    out = tmp_path / "tok"
    train_tokenizer([str(documents)], 400, out)
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert train_tokenizer([str(documents)], 400, out)["kept"] is True
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    retrained = train_tokenizer([str(documents)], 350, out)
    assert "kept" not in retrained and len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) == 350


def test_bad_input_is_one_line(tmp_path, documents, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("not a tokenizer")
    with pytest.raises(DataError, match="is not a tokenizer folder this command wrote"):
        train_tokenizer([str(documents)], 400, tmp_path / "other")
    assert (tmp_path / "other" / "mine.txt").read_text() == "not a tokenizer"
    for argv, message in (
        ([str(documents), "--vocab-size", "100", "--out", str(tmp_path / "t")], "--vocab-size must be at least 257"),
        ([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t")], "missing.jsonl"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()
