"""What a generated sequence is: tokens, documents, and the answers an evaluation scores.

A generator builds each document from `Piece`s (token ids, their text for text tasks, and which item's
value they write or answer), inserts blocks of pieces into a `Haystack` at chosen offsets
(`assemble`), and packs the documents into a `Sample` (`pack`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from parallel.sharding import IGNORE_INDEX, next_token_labels

LOSS_ON = ("all", "answers")


@dataclass(frozen=True)
class Piece:
    ids: torch.Tensor  # (n,) int64
    text: str | None = None  # text tasks: the string these ids encode
    writes: int | None = None  # the first write of item k's value
    answers: int | None = None  # item k's value recalled: an answer span


@dataclass(frozen=True)
class Haystack:
    """Filler that blocks are inserted into, at any offset or (text) only at sentence boundaries."""

    ids: torch.Tensor  # (H,)
    cuts: torch.Tensor | None = None  # ascending offsets where blocks may go, 0 and H included; None: anywhere
    texts: tuple[str, ...] | None = None  # text tasks: the text between consecutive cuts

    def __len__(self) -> int:
        return len(self.ids)

    def snap(self, offset: int) -> int:
        """The allowed insertion offset nearest to `offset`."""
        if self.cuts is None:
            return offset
        return int(self.cuts[(self.cuts - offset).abs().argmin()])

    def split(self, offsets: list[int]) -> list[Piece]:
        """The haystack cut at sorted, snapped `offsets`: len(offsets) + 1 pieces."""
        bounds = [0, *offsets, len(self)]
        return [self._slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def _slice(self, start: int, end: int) -> Piece:
        if self.texts is None:
            return Piece(self.ids[start:end])
        first, last = torch.searchsorted(self.cuts, torch.tensor([start, end])).tolist()
        return Piece(self.ids[start:end], "".join(self.texts[first:last]))


@dataclass(frozen=True)
class Answer:
    """Where one expected answer sits in a sample's sequence."""

    start: int  # index of the answer's first token in the sequence
    end: int  # one past its last token
    document: int  # index into Sample.documents
    distance: int  # tokens from the first write of this value to `start` (recall: key -> query distance)
    depth: float  # fraction of its document's haystack that precedes the block writing the value
    text: str | None = None  # text tasks: the expected answer string (compare after strip())
    char_start: int | None = None  # text tasks: where the answer's text begins in its document's text


@dataclass(frozen=True)
class Document:
    start: int  # index of its first token in the sequence
    length: int
    text: str | None = None  # text tasks: what its tokens encode


@dataclass(frozen=True)
class Sample:
    input_ids: torch.Tensor  # (1, S)
    position_ids: torch.Tensor  # (1, S), restarting at 0 at each document
    documents: tuple[Document, ...]
    answers: tuple[Answer, ...]

    def prompt(self, answer: Answer) -> str:
        """Text tasks: the text a model reads before generating `answer` (its document up to it)."""
        return self.documents[answer.document].text[: answer.char_start]

    def batch(self, loss_on: str = "all") -> dict[str, torch.Tensor]:
        """The training item; `loss_on="answers"` keeps only the labels that predict answer tokens."""
        labels = next_token_labels(self.input_ids, self.position_ids)
        if loss_on == "answers":
            scored = torch.zeros_like(labels, dtype=torch.bool)
            for answer in self.answers:  # labels[t] is the target input_ids[t + 1]
                scored[0, answer.start - 1 : answer.end - 1] = True
            labels = labels.masked_fill(~scored, IGNORE_INDEX)
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": labels}


@dataclass(frozen=True)
class Built:
    """One assembled document, before packing."""

    ids: torch.Tensor
    text: str | None
    answers: list[Answer]  # positions within the document


def assemble(head: list[Piece], haystack: Haystack, blocks: list[tuple[int, list[Piece]]], tail: list[Piece]) -> Built:
    """One document: `head`, the haystack with each block inserted at its (snapped) offset, `tail`."""
    blocks = sorted(blocks, key=lambda block: block[0])  # stable: blocks at one offset keep their order
    gaps = haystack.split([offset for offset, _ in blocks])
    placed = [(0, piece) for piece in head]
    for gap, (offset, block) in zip(gaps, blocks):
        placed += [(0, gap)] + [(offset, piece) for piece in block]
    placed += [(0, gaps[-1])] + [(len(haystack), piece) for piece in tail]

    has_text = all(piece.text is not None for _, piece in placed)
    position, chars, written, answers = 0, 0, {}, []
    for offset, piece in placed:
        if piece.writes is not None and piece.writes not in written:
            written[piece.writes] = (position, offset / max(len(haystack), 1))
        if piece.answers is not None:
            write_position, depth = written[piece.answers]
            text, char_start = (piece.text.strip(), chars) if has_text else (None, None)
            end = position + len(piece.ids)
            answers.append(Answer(position, end, 0, position - write_position, depth, text, char_start))
        position += len(piece.ids)
        chars += len(piece.text) if has_text else 0
    ids = torch.cat([piece.ids for _, piece in placed])
    return Built(ids, "".join(piece.text for _, piece in placed) if has_text else None, answers)


def pack(documents: list[Built]) -> Sample:
    """Documents one after another, position ids restarting at each."""
    records, answers, start = [], [], 0
    for index, document in enumerate(documents):
        records.append(Document(start, len(document.ids), document.text))
        answers += [
            replace(answer, start=answer.start + start, end=answer.end + start, document=index)
            for answer in document.answers
        ]
        start += len(document.ids)
    return Sample(
        input_ids=torch.cat([document.ids for document in documents]).unsqueeze(0),
        position_ids=torch.cat([torch.arange(len(document.ids)) for document in documents]).unsqueeze(0),
        documents=tuple(records),
        answers=tuple(answers),
    )
