"""The real-document corpus (the standard library's source and pydoc topics) is built and split deterministically,
by name, and reads as `data=corpus` shards."""

from __future__ import annotations

import json

from tools.commands.stdlib_corpus import build, split_of


def _names(path) -> list[str]:
    return [json.loads(line)["name"] for line in path.read_text().splitlines()]


def test_built_twice_it_is_the_same_bytes_and_the_split_follows_the_names(tmp_path):
    first = build(tmp_path / "a", heldout_percent=10, min_chars=20000)
    build(tmp_path / "b", heldout_percent=10, min_chars=20000)
    for name in ("train.jsonl", "heldout.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, heldout = _names(tmp_path / "a" / "train.jsonl"), _names(tmp_path / "a" / "heldout.jsonl")
    assert train == sorted(train) and heldout == sorted(heldout) and not set(train) & set(heldout)
    assert first["documents"] == {"train": len(train), "heldout": len(heldout)} and heldout
    assert all(split_of(name, 10) == "heldout" for name in heldout) and all(split_of(n, 10) == "train" for n in train)
    assert any(name.startswith("pydoc:") for name in train + heldout)  # English docs beside the code
    assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.2
    assert not list((tmp_path / "a").glob("*.partial"))


def test_the_split_of_a_name_never_changes():
    """Fixed by the name's SHA-256 alone: what was held out stays held out on every machine and Python."""
    held_out, trained = (
        ("calendar.py", "bz2.py", "asyncio/subprocess.py"),
        ("json/decoder.py", "typing.py", "pydoc:assert"),
    )
    assert all(split_of(name, 10) == "heldout" for name in held_out)
    assert all(split_of(name, 10) == "train" for name in trained)
    assert all(split_of(name, 99) == "heldout" for name in trained)  # the share moves the cut, not the order


def test_a_split_prepares_into_token_shards(tmp_path, tokenizer_dir):
    from tools.commands.prepare_data import main as prepare_data

    built = build(tmp_path / "corpus", heldout_percent=10, min_chars=40000)
    prepare_data([str(tmp_path / "corpus" / "heldout.jsonl"), "--tokenizer", str(tokenizer_dir),
                  "--output", str(tmp_path / "shards"), "--quiet"])  # fmt: skip
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert sum(shard["documents"] for shard in manifest["shards"]) == built["documents"]["heldout"]
