"""The task logic, written once for both languages: what is drawn for a document and where it goes.

Sequence i is made from (seed, i) alone, so any process, at any world size, regenerates exactly the
same sequence; the loader's position is one integer, saved in checkpoints.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from trainer.data.synthetic.language import Language
from trainer.data.synthetic.sample import LOSS_ON, Built, Piece, Sample, assemble, pack


class SyntheticTask:
    """Packs `docs_per_sequence` documents per sequence (position ids restart at each); `loss_on`
    chooses the labels: every next token ("all") or only the answer tokens ("answers")."""

    def __init__(self, language: Language, seq_len: int, seed: int, docs_per_sequence: int, loss_on: str) -> None:
        require(isinstance(docs_per_sequence, int) and 1 <= docs_per_sequence <= seq_len, "docs_per_sequence",
                f"an integer in [1, {seq_len}]", docs_per_sequence)  # fmt: skip
        require(loss_on in LOSS_ON, "loss_on", f"one of {', '.join(LOSS_ON)}", loss_on)
        self.language, self.seq_len, self.seed, self.docs, self.loss_on = (
            language, seq_len, seed, docs_per_sequence, loss_on,
        )  # fmt: skip
        self._cuts = torch.linspace(0, seq_len, docs_per_sequence + 1).long().tolist()
        self.shortest = min(b - a for a, b in zip(self._cuts[:-1], self._cuts[1:]))  # tokens in the shortest document

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(index).batch(self.loss_on)

    def sample(self, index: int) -> Sample:
        """Sequence `index` with its documents and answers (what an evaluation scores)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return pack([self._document(b - a, generator) for a, b in zip(self._cuts[:-1], self._cuts[1:])])

    def _document(self, length: int, generator: torch.Generator) -> Built:
        raise NotImplementedError

    def chance_accuracy(self) -> float | None:
        """The answer accuracy of guessing, where every answer is one uniformly drawn value; else None."""
        return None

    def _room(self, fixed: int, what: str) -> int:
        """Haystack tokens the shortest document has left around `fixed` tokens of task content."""
        if fixed > self.shortest:
            raise ValueError(f"data: documents of {self.shortest} tokens cannot hold {what}")
        return self.shortest - fixed

    def _head(self) -> list[Piece]:
        return self.language.bos + self.language.render("head")

    def _draw_keys(self, count: int, generator: torch.Generator) -> list[int | None]:
        if not self.language.num_keys:
            return [None] * count
        return torch.randperm(self.language.num_keys, generator=generator)[:count].tolist()


class Recall(SyntheticTask):
    """Multi-query associative recall: `num_pairs` key-value writes open the document; the keys are
    queried again (in another order), each followed by its value, `query_gap` filler tokens after the
    last write (default: at the document's end), or a gap drawn uniformly from
    [query_gap, query_gap_max] per document. Answer.distance is each pair's write -> query distance."""

    def __init__(self, language, seq_len, seed, num_pairs, query_gap, query_gap_max, docs_per_sequence, loss_on):
        super().__init__(language, seq_len, seed, docs_per_sequence, loss_on)
        require(isinstance(num_pairs, int) and 1 <= num_pairs <= language.num_keys, "num_pairs",
                f"an integer in [1, {language.num_keys}] (the keys there are)", num_pairs)  # fmt: skip
        fixed = _length(self._head()) + num_pairs * (language.bound("write") + language.bound("query"))
        room = self._room(fixed, f"{num_pairs} pairs")
        if query_gap is not None or query_gap_max is not None:
            require(isinstance(query_gap, int) and 0 <= query_gap <= room, "query_gap",
                    f"an integer in [0, {room}] (the shortest document's filler)", query_gap)  # fmt: skip
        if query_gap_max is not None:
            require(isinstance(query_gap_max, int) and query_gap <= query_gap_max <= room, "query_gap_max",
                    f"null or an integer in [query_gap, {room}]", query_gap_max)  # fmt: skip
        self.num_pairs, self.query_gap, self.query_gap_max = num_pairs, query_gap, query_gap_max

    def chance_accuracy(self) -> float:
        return self.language.value_chance()

    def _document(self, length: int, generator: torch.Generator) -> Built:
        n, language = self.num_pairs, self.language
        keys = self._draw_keys(n, generator)
        values = language.draw_values(n, generator)
        order = torch.randperm(n, generator=generator).tolist()
        head = self._head()
        writes = [piece for i in range(n) for piece in language.render("write", i, keys[i], values[i])]
        queries = [piece for i in order for piece in language.render("query", i, keys[i], values[i])]
        haystack = language.haystack(length - _length(head, writes, queries), generator)
        gap = len(haystack) if self.query_gap is None else self.query_gap
        if self.query_gap_max not in (None, self.query_gap):  # drawn last: a fixed gap leaves the stream as it was
            gap = int(torch.randint(self.query_gap, self.query_gap_max + 1, (1,), generator=generator))
        return assemble(head, haystack, [(0, writes), (haystack.snap(gap), queries)], [])


class Needle(SyntheticTask):
    """Needle in a haystack: `num_needles` needles (each writes a key's value) hidden at `depth` (the
    fraction of the filler before them; null: each at a uniform random depth), then `num_queries`
    questions at the document's end, each answered by one needle's value. Text tasks put needles
    between sentences, at the boundary nearest to the depth; Answer.depth is where it really went."""

    def __init__(self, language, seq_len, seed, num_needles, num_queries, depth, docs_per_sequence, loss_on):
        super().__init__(language, seq_len, seed, docs_per_sequence, loss_on)
        keys = language.num_keys or 1  # a keyless needle (the passkey) is asked for once
        require(isinstance(num_needles, int) and 1 <= num_needles <= keys, "num_needles",
                f"an integer in [1, {keys}] (the keys there are)", num_needles)  # fmt: skip
        require(isinstance(num_queries, int) and 1 <= num_queries <= num_needles, "num_queries",
                f"an integer in [1, num_needles={num_needles}]", num_queries)  # fmt: skip
        require(depth is None or (isinstance(depth, (int, float)) and 0 <= depth <= 1), "depth",
                "null or a number in [0, 1]", depth)  # fmt: skip
        fixed = _length(self._head()) + num_needles * language.bound("write") + num_queries * language.bound("query")
        self._room(fixed, f"{num_needles} needle(s) and {num_queries} query(ies)")
        self.num_needles, self.num_queries, self.depth = num_needles, num_queries, depth

    def chance_accuracy(self) -> float:
        return self.language.value_chance()

    def _document(self, length: int, generator: torch.Generator) -> Built:
        n, language = self.num_needles, self.language
        keys = self._needle_keys(generator)
        values = language.draw_values(n, generator)
        queried = torch.randperm(n, generator=generator)[: self.num_queries].tolist()
        depths = [self.depth] * n if self.depth is not None else torch.rand(n, generator=generator).tolist()
        head = self._head()
        needles = [language.render("write", i, keys[i], values[i]) for i in range(n)]
        queries = self._questions(queried, keys, values)
        haystack = language.haystack(length - _length(head, *needles, queries), generator)
        blocks = [(haystack.snap(round(depth * len(haystack))), needle) for depth, needle in zip(depths, needles)]
        return assemble(head, haystack, blocks, queries)

    def _needle_keys(self, generator: torch.Generator) -> list[int | None]:
        return self._draw_keys(self.num_needles, generator)

    def _questions(self, queried: list[int], keys: list[int | None], values: list) -> list[Piece]:
        return [piece for i in queried for piece in self.language.render("query", i, keys[i], values[i])]


class MultiValue(Needle):
    """Multi-value needle (RULER's niah_multivalue): `num_values` needles write values of one key, and
    one question at the end asks for all of them ("query" answered by one value, then "more" per
    other value, in random order)."""

    def __init__(self, language, seq_len, seed, num_values, depth, docs_per_sequence, loss_on):
        require(isinstance(num_values, int) and 1 <= num_values <= max(language.num_keys, 1), "num_values",
                f"an integer in [1, {language.num_keys}]", num_values)  # fmt: skip
        super().__init__(language, seq_len, seed, num_values, num_values, depth, docs_per_sequence, loss_on)

    def _needle_keys(self, generator: torch.Generator) -> list[int | None]:
        return self._draw_keys(1, generator) * self.num_needles

    def _questions(self, queried: list[int], keys: list[int | None], values: list) -> list[Piece]:
        first, *others = queried
        pieces = self.language.render("query", first, keys[first], values[first])
        return pieces + [piece for i in others for piece in self.language.render("more", i, keys[i], values[i])]


class VariableTracking(SyntheticTask):
    """Variable tracking (RULER's vt): `num_chains` chains of assignments ("VAR a = 12345", then
    `num_hops` times "VAR b = VAR a"), each statement at a uniform random place in the filler (a
    chain's statements in order); the question gives the first chain's value and is answered by all of
    its variables, in chain order ("answer", then "more" per further variable). The other chains are
    distractors. Item k is the first chain's k-th variable, written where it is assigned."""

    def __init__(self, language, seq_len, seed, num_chains, num_hops, docs_per_sequence, loss_on):
        super().__init__(language, seq_len, seed, docs_per_sequence, loss_on)
        require(isinstance(num_hops, int) and num_hops >= 0, "num_hops", "an integer >= 0", num_hops)
        variables = language.num_keys // (num_hops + 1)
        require(isinstance(num_chains, int) and 1 <= num_chains <= variables, "num_chains",
                f"an integer in [1, {variables}] (the chains of {num_hops + 1} keys)", num_chains)  # fmt: skip
        statements = num_chains * (language.bound("write") + num_hops * language.bound("hop"))
        answers = language.bound("query") + language.bound("answer") + num_hops * language.bound("more")
        self._room(_length(self._head()) + statements + answers, f"{num_chains} chain(s) of {num_hops} hop(s)")
        self.num_chains, self.num_hops = num_chains, num_hops

    def _document(self, length: int, generator: torch.Generator) -> Built:
        language, links = self.language, self.num_hops + 1
        keys = self._draw_keys(self.num_chains * links, generator)
        values = language.draw_values(self.num_chains, generator)
        chains = []
        for c in range(self.num_chains):
            names = [language.key(k) for k in keys[c * links : (c + 1) * links]]
            if c == 0:  # the asked chain: its variables are the items
                names = [replace(name, writes=k) for k, name in enumerate(names)]
            first = language.fill("write", names[0], value=language.value(values[c]))
            chains.append([first] + [language.fill("hop", names[k], names[k - 1]) for k in range(1, links)])
        head = self._head()
        tail = language.fill("query", value=language.value(values[0]))
        tail += language.fill("answer", replace(language.key(keys[0]), answers=0))
        for k in range(1, links):
            tail += language.fill("more", replace(language.key(keys[k]), answers=k))
        statements = [statement for chain in chains for statement in chain]
        haystack = language.haystack(length - _length(head, *statements, tail), generator)
        blocks = []
        for chain in chains:
            offsets = torch.randint(len(haystack) + 1, (links,), generator=generator).sort().values.tolist()
            blocks += [(haystack.snap(offset), statement) for offset, statement in zip(offsets, chain)]
        return assemble(head, haystack, blocks, tail)


class CommonWords(SyntheticTask):
    """Common words extraction (RULER's cwe): a list of words ("entry" each) in which `num_common` words
    appear `ratio` times as often as each of the others; the question asks for the common ones and is
    answered by them ("answer", then "more" per further word). The counts grow with the length: the
    list fills the document (at short lengths fewer rare words are used), and filler after the head
    takes the tokens a whole entry no longer fits in. Item k is the k-th common word, written at its
    first occurrence."""

    def __init__(self, language, seq_len, seed, num_common, ratio, docs_per_sequence, loss_on):
        super().__init__(language, seq_len, seed, docs_per_sequence, loss_on)
        require(isinstance(num_common, int) and 1 <= num_common < language.num_keys, "num_common",
                f"an integer in [1, {language.num_keys - 1}] (fewer than the words there are)", num_common)  # fmt: skip
        require(isinstance(ratio, int) and ratio >= 2, "ratio", "an integer >= 2", ratio)
        answers = language.bound("query") + language.bound("answer") + (num_common - 1) * language.bound("more")
        entries = num_common * ratio * language.bound("entry")
        self._room(_length(self._head()) + answers + entries, f"{num_common} common words {ratio} times each")
        self.num_common, self.ratio = num_common, ratio

    def _document(self, length: int, generator: torch.Generator) -> Built:
        language, n = self.language, self.num_common
        words = torch.randperm(language.num_keys, generator=generator).tolist()
        entries = [language.fill("entry", language.key(k)) for k in words]
        entries[:n] = [language.fill("entry", replace(language.key(k), writes=i)) for i, k in enumerate(words[:n])]
        head = self._head()
        tail = language.fill("query") + language.fill("answer", replace(language.key(words[0]), answers=0))
        for i in range(1, n):
            tail += language.fill("more", replace(language.key(words[i]), answers=i))
        room = length - _length(head, tail)
        common = self.ratio * _length(*entries[:n])  # the common words' tokens per occurrence of a rare word
        rare = [_length(entry) for entry in entries[n:]]
        per_rare = max(1, room // (common + sum(rare)))
        used = len(rare)
        while used and per_rare * (common + sum(rare[:used])) > room:  # short documents: fewer rare words
            used -= 1
        listed = entries[:n] * (self.ratio * per_rare) + entries[n : n + used] * per_rare
        order = torch.randperm(len(listed), generator=generator).tolist()
        block = [piece for i in order for piece in listed[i]]
        haystack = language.haystack(room - _length(block), generator)
        return assemble(head, haystack, [(len(haystack), block)], tail)


def _length(*groups: list[Piece]) -> int:
    return sum(len(piece.ids) for group in groups for piece in group)


def require(ok: bool, key: str, requirement: str, value) -> None:
    """A bad knob ends with one line naming it, as trainer.config does for the rest of the job."""
    if not ok:
        raise ValueError(f"data.{key} must be {requirement}, got {value!r}")
