"""Documents from local files, in a fixed order, with one-line errors naming the file (and line).

- `.txt`: the whole file is one document (UTF-8).
- `.jsonl`: one JSON object per line, the document in field `text_key`; blank lines are skipped.
- `.parquet`: the string column `text_key` (needs pyarrow).
- a Hugging Face `datasets` folder written by `Dataset.save_to_disk`: its column `text_key` (needs datasets).
- any other folder: the files above found under it, in sorted path order.

An empty document is yielded as "" (the caller skips and counts it); an empty input file is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
_INSTALL = "install it with: pip install 'ttt-longctx[data]'"


@dataclass(frozen=True)
class Input:
    path: Path
    kind: str  # "txt", "jsonl", "parquet" or "hf"
    size: int  # bytes on disk (for the preparation's fingerprint)


def _hf_kind(folder: Path) -> str | None:
    if (folder / "dataset_dict.json").is_file():
        splits = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        raise DataError(f"{folder}: a DatasetDict with splits {splits}; pass one split's folder")
    return "hf" if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file() else None


def _file_input(path: Path) -> Input:
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported input (expected {', '.join(SUFFIXES)} or a datasets folder)")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file")
    return Input(path, path.suffix[1:], size)


def resolve_inputs(paths: list[str | Path]) -> list[Input]:
    inputs = []
    for given in map(Path, paths):
        if given.is_file():
            inputs.append(_file_input(given))
        elif given.is_dir():
            if _hf_kind(given):
                size = sum(p.stat().st_size for p in given.iterdir() if p.is_file())
                inputs.append(Input(given, "hf", size))
                continue
            found = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise DataError(f"{given}: no {', '.join(SUFFIXES)} files in this folder")
            inputs.extend(_file_input(p) for p in found)
        else:
            raise DataError(f"{given}: no such file or folder")
    if not inputs:
        raise DataError("no inputs given")
    return inputs


def _text(path: Path) -> Iterator[str]:
    data = path.read_bytes()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte {err.start})") from None


def _jsonl(path: Path, text_key: str) -> Iterator[str]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 (byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                cut = "" if raw.endswith(b"\n") else ", the file looks truncated"
                raise DataError(f"{where}: invalid JSON ({err.msg}{cut})") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{where}: no string field {text_key!r}")
            yield text


def _column(batches, where: str, text_key: str) -> Iterator[str]:
    """Strings of column `text_key` from pyarrow record batches; nulls count as empty documents."""
    import pyarrow as pa

    for batch in batches:
        column = batch.column(text_key)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{where}: column {text_key!r} holds {column.type}, not strings")
        yield from (text or "" for text in column.to_pylist())


def _parquet(path: Path, text_key: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; {_INSTALL}") from None
    try:
        table = pq.ParquetFile(path)
        if text_key not in table.schema_arrow.names:
            raise DataError(f"{path}: no column {text_key!r} (columns: {', '.join(table.schema_arrow.names)})")
        yield from _column(table.iter_batches(columns=[text_key]), str(path), text_key)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: unreadable Parquet ({str(err).splitlines()[0]})") from None


def _hf_dataset(folder: Path, text_key: str) -> Iterator[str]:
    try:
        import datasets
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{folder}: reading a datasets folder needs datasets; {_INSTALL}") from None
    try:
        dataset = datasets.load_from_disk(str(folder))
        if text_key not in dataset.column_names:
            raise DataError(f"{folder}: no column {text_key!r} (columns: {', '.join(dataset.column_names)})")
        yield from _column(dataset.data.table.select([text_key]).to_batches(), str(folder), text_key)
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{folder}: unreadable datasets folder ({str(err).splitlines()[0]})") from None


def iter_documents(inputs: list[Input], text_key: str = "text") -> Iterator[str]:
    """Every document of every input, in order; each input must hold at least one."""
    for source in inputs:
        if source.kind == "txt":
            documents = _text(source.path)
        elif source.kind == "jsonl":
            documents = _jsonl(source.path, text_key)
        elif source.kind == "parquet":
            documents = _parquet(source.path, text_key)
        else:
            documents = _hf_dataset(source.path, text_key)
        empty = True
        for text in documents:
            empty = False
            yield text
        if empty:
            raise DataError(f"{source.path}: no documents")
