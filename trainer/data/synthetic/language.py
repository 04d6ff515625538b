"""How a task's templates become pieces, and what fills the haystack.

A task speaks through three templates: "head" (opens a document), "write" (hides an item's value,
e.g. a needle or a key-value pair) and "query" (asks for the item; its value is the answer). Each is a
sequence of fixed parts and the placeholders `{key}` and `{value}`. `TokenLanguage` renders them in
a small tokenizer-free vocabulary; `trainer.data.synthetic.text.TextLanguage` as tokenized English.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace

import torch

from trainer.data.synthetic.sample import Haystack, Piece

BOS, SPECIALS = 1, 4  # token ids below SPECIALS are reserved
PLACEHOLDERS = ("{key}", "{value}")
_ROLES = {"write": "writes", "query": "answers", "more": "answers"}  # what the first {value} of a template does


class Language(ABC):
    """Renders templates; subclasses decide what keys, values, fixed parts and filler are."""

    bos: list[Piece]
    num_keys: int
    _templates: dict[str, list[Piece | str]]  # fixed parts as pieces, placeholders as strings

    def render(self, name: str, item: int | None = None, key: int | None = None, value=None) -> list[Piece]:
        pieces, role = [], _ROLES.get(name)
        for part in self._templates[name]:
            if part == "{key}":
                pieces.append(self.key(key))
            elif part == "{value}":
                piece = self.value(value)
                pieces.append(replace(piece, **{role: item}) if role else piece)
                role = None
            else:
                pieces.append(part)
        return pieces

    def fill(self, name: str, *keys: Piece, value: Piece | None = None) -> list[Piece]:
        """Template `name` with its i-th `{key}` replaced by `keys[i]` and every `{value}` by `value`: for
        tasks whose items are not one key's value (the caller sets the pieces' roles)."""
        keys, pieces = iter(keys), []
        for part in self._templates[name]:
            pieces.append(next(keys) if part == "{key}" else value if part == "{value}" else part)
        return pieces

    def bound(self, name: str) -> int:
        """At most how many tokens `render(name)` gives."""
        sizes = {"{key}": self._longest_key(), "{value}": self._longest_value()}
        return sum(sizes[part] if isinstance(part, str) else len(part.ids) for part in self._templates[name])

    @abstractmethod
    def key(self, index: int) -> Piece: ...

    @abstractmethod
    def value(self, value) -> Piece: ...

    @abstractmethod
    def draw_values(self, count: int, generator: torch.Generator) -> list: ...

    @abstractmethod
    def value_chance(self) -> float:
        """The probability that a uniform guess of one drawn value is right (an answer's chance level)."""

    @abstractmethod
    def haystack(self, length: int, generator: torch.Generator) -> Haystack: ...

    @abstractmethod
    def _longest_key(self) -> int: ...

    @abstractmethod
    def _longest_value(self) -> int: ...


class TokenLanguage(Language):
    """Tokenizer-free: markers, digits or values, keys and filler are disjoint id ranges above the
    reserved ids. A template is a tuple of marker names and placeholders, e.g. ("needle", "{key}",
    "{value}"); each marker name gets its own id.

    Values are `digits` digit tokens, or (digits=None) one token from a value range as large as the
    key range. Keys take a quarter of the ids left after markers and digits; filler takes the rest.
    """

    def __init__(
        self, vocab_size: int, templates: dict[str, tuple[str, ...]], digits: int | None, min_keys: int, needs: str
    ) -> None:
        parts = [part for template in templates.values() for part in template if part not in PLACEHOLDERS]
        markers = list(dict.fromkeys(parts))
        uses_keys = any("{key}" in template for template in templates.values())
        first = SPECIALS + len(markers)
        free = vocab_size - first - (10 if digits else 0)
        num_keys = max(free // 4, 0) if uses_keys else 0
        num_values = 10 if digits else num_keys
        if num_keys < min_keys or first + num_keys + num_values >= vocab_size:  # >= 1 filler id too
            raise ValueError(f"data: vocab_size={vocab_size} is too small for {needs}")
        if digits:
            self.values, self.keys = _consecutive(first, 10, num_keys)
        else:  # keys before values: the layout the synthetic_recall stream was made with
            self.keys, self.values = _consecutive(first, num_keys, num_keys)
        self.filler = torch.arange(first + num_keys + num_values, vocab_size)
        marker_ids = dict(zip(markers, range(SPECIALS, first)))
        self.digits, self.num_keys = digits, num_keys
        self.bos = [Piece(torch.tensor([BOS]))]
        self._templates = {
            name: [part if part in PLACEHOLDERS else Piece(torch.tensor([marker_ids[part]])) for part in template]
            for name, template in templates.items()
        }

    def key(self, index: int) -> Piece:
        return Piece(self.keys[index : index + 1])

    def value(self, value: torch.Tensor) -> Piece:
        return Piece(value)

    def draw_values(self, count: int, generator: torch.Generator) -> list[torch.Tensor]:
        shape = (count, self.digits) if self.digits else (count,)
        return list(self.values[torch.randint(len(self.values), shape, generator=generator)].view(count, -1))

    def value_chance(self) -> float:
        return len(self.values) ** -(self.digits or 1)

    def haystack(self, length: int, generator: torch.Generator) -> Haystack:
        return Haystack(self.filler[torch.randint(len(self.filler), (length,), generator=generator)])

    def _longest_key(self) -> int:
        return 1

    def _longest_value(self) -> int:
        return self.digits or 1


def _consecutive(first: int, *sizes: int) -> list[torch.Tensor]:
    """Adjacent id ranges of the given sizes, starting at `first`."""
    ranges = []
    for size in sizes:
        ranges.append(torch.arange(first, first + size))
        first += size
    return ranges
