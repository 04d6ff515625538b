"""Real long documents nobody here wrote, shipped with every Python: its standard library's source and docs.

    ttt-stdlib-corpus OUT [--heldout-percent 10] [--min-chars 4000]

Documents: every `.py` file of the running interpreter's standard library (`sysconfig`'s stdlib folder;
site-packages and caches left out), named by its path inside that folder, and every topic of
`pydoc_data.topics` (the English reference text `help()` prints), named `pydoc:<topic>`; those shorter than
--min-chars characters are dropped. Each document goes to the held-out split when the first 8 bytes of the
SHA-256 of its name, as an integer, fall in the lowest --heldout-percent of their range: a split by name
alone, so it is the same on every machine and run, and a file never crosses it. OUT gets `train.jsonl` and
`heldout.jsonl` (one {"name", "text"} per line, sorted by name) and `manifest.json` (the Python version the
documents come from, counts, characters), each written whole or not at all. `ttt-prepare-data` tokenizes the
splits for `data=corpus`; `ttt-eval --ppl-data OUT/heldout.jsonl` scores loss by position on the held-out one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tools.cli import OneLineErrorParser, positive_int
from trainer.tracking import write_json_atomically, write_text_atomically

SPLITS = ("train", "heldout")


def stdlib_documents(min_chars: int) -> Iterator[tuple[str, str]]:
    """(name, text) of the standard library's source files and pydoc topics of at least `min_chars`, by name."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    documents = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "__pycache__" in parts:
            continue
        documents[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8", errors="replace")
    documents.update({f"pydoc:{topic}": text for topic, text in topics.items()})
    for name in sorted(documents):
        if len(documents[name]) >= min_chars:
            yield name, documents[name]


def split_of(name: str, heldout_percent: float) -> str:
    """The split a document belongs to, from its name alone."""
    position = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return "heldout" if position < heldout_percent / 100 else "train"


def build(out: Path, heldout_percent: float = 10.0, min_chars: int = 4000) -> dict:
    lines = {split: [] for split in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    for name, text in stdlib_documents(min_chars):
        split = split_of(name, heldout_percent)
        lines[split].append(json.dumps({"name": name, "text": text}, ensure_ascii=False))
        chars[split] += len(text)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_text_atomically(out / f"{split}.jsonl", "".join(line + "\n" for line in lines[split]))
    manifest = {
        "python": platform.python_version(), "heldout_percent": heldout_percent, "min_chars": min_chars,
        "documents": {split: len(lines[split]) for split in SPLITS}, "characters": chars,
    }  # fmt: skip
    write_json_atomically(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="ttt-stdlib-corpus", description=__doc__.split("\n", 1)[0])
    parser.add_argument("out", type=Path, help="folder for train.jsonl, heldout.jsonl and manifest.json")
    parser.add_argument("--heldout-percent", type=float, default=10.0, help="share of the names held out (0-100)")
    parser.add_argument("--min-chars", type=positive_int, default=4000, help="shortest document kept, characters")
    args = parser.parse_args(argv)
    if not 0 < args.heldout_percent < 100:
        parser.error(f"--heldout-percent must be between 0 and 100, got {args.heldout_percent:g}")
    print(json.dumps(build(args.out, args.heldout_percent, args.min_chars)), file=sys.stdout)


if __name__ == "__main__":
    main()
