"""Text versions of the tasks: English templates and generated filler sentences, tokenized by a local
Hugging Face tokenizer (never downloaded).

Every piece (a template's fixed text, a key, a value, a filler sentence) is tokenized on its own and
the ids are concatenated, so the tokens of each answer are known exactly. Placeholders take the space
before them (" {value}" renders " 4821"), which keeps word-initial tokens as a whole-text tokenizer
would make them.
"""

from __future__ import annotations

import random
import re
from itertools import product
from pathlib import Path

import torch

from trainer.data.synthetic.language import PLACEHOLDERS, Language
from trainer.data.synthetic.sample import Haystack, Piece

_SUBJECTS = "gardener sailor clock lantern merchant painter river train scholar baker fox kettle".split()
_VERBS = "carried painted watched mended followed counted opened described found crossed measured kept".split()
_OBJECTS = "bridge letter map basket window field song coat lamp road harbor garden".split()
_MANNERS = ["slowly", "at dawn", "with care", "again", "before noon", "in silence", "after the rain", "once more"]
_KEY_ADJECTIVES = "amber brisk cobalt dusky eager frosty gilded hollow ivory jolly keen lunar".split()
_KEY_NOUNS = "falcon walrus comet anchor beacon cactus dynamo ember glacier harp igloo jasmine".split()
_POOL = 1024  # distinct filler sentences


def _sentences() -> list[str]:
    """A fixed pool of plain sentences (the same in every process)."""
    rng = random.Random(0)
    return [
        f" The {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} the {rng.choice(_OBJECTS)} {rng.choice(_MANNERS)}."
        for _ in range(_POOL)
    ]


class TextLanguage(Language):
    """Templates are strings with ` {key}` / ` {value}`; keys are hyphenated word pairs ("amber-falcon"),
    values numbers of `digits` digits, filler whole sentences (blocks go between sentences)."""

    def __init__(self, tokenizer: str | None, vocab_size: int, templates: dict[str, str], digits: int) -> None:
        from transformers import AutoTokenizer

        if tokenizer is None or not Path(tokenizer).is_dir():
            raise ValueError(f"data.tokenizer must be a local tokenizer folder, got {tokenizer!r}")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:  # transformers' messages run over many lines
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0].strip()
            raise ValueError(f"data.tokenizer={tokenizer}: not a usable tokenizer folder ({reason})") from None
        if len(self._tokenizer) > vocab_size:
            raise ValueError(f"data: the tokenizer has {len(self._tokenizer)} ids, more than vocab_size={vocab_size}")
        bos = self._tokenizer.bos_token_id
        self.bos = [] if bos is None else [Piece(torch.tensor([bos]), "")]
        self.digits = digits
        self._keys = [self._piece(f" {a}-{n}") for a, n in product(_KEY_ADJECTIVES, _KEY_NOUNS)]
        self.num_keys = len(self._keys)
        self._templates = {
            name: [part.strip() if part.strip() in PLACEHOLDERS else self._piece(part) for part in _split(template)]
            for name, template in templates.items()
        }
        self._sentences = _sentences()
        self._sentence_ids = [torch.tensor(ids, dtype=torch.long) for ids in self._encode(self._sentences)]
        self._sentence_lengths = torch.tensor([len(ids) for ids in self._sentence_ids])

    def key(self, index: int) -> Piece:
        return self._keys[index]

    def value(self, value: str) -> Piece:
        return self._piece(f" {value}")

    def draw_values(self, count: int, generator: torch.Generator) -> list[str]:
        numbers = torch.randint(10 ** (self.digits - 1), 10**self.digits, (count,), generator=generator)
        return [str(number) for number in numbers.tolist()]

    def value_chance(self) -> float:
        return 1 / (9 * 10 ** (self.digits - 1))  # numbers of exactly `digits` digits

    def haystack(self, length: int, generator: torch.Generator) -> Haystack:
        """Random sentences up to `length` tokens, the last one cut to fit."""
        if length == 0:
            return Haystack(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), ())
        count = length // int(self._sentence_lengths.min()) + 1  # always enough
        picks = torch.randint(len(self._sentences), (count,), generator=generator)
        ends = self._sentence_lengths[picks].cumsum(0)
        used = int(torch.searchsorted(ends, length)) + 1
        picks = picks[:used].tolist()
        ids = torch.cat([self._sentence_ids[i] for i in picks])[:length]
        last = self._sentences[picks[-1]]
        if ends[used - 1] > length:  # the last sentence was cut
            last = self._tokenizer.decode(ids[int(ends[used - 2]) if used > 1 else 0 :])
        texts = (*(self._sentences[i] for i in picks[:-1]), last)
        cuts = torch.cat([torch.zeros(1, dtype=torch.long), ends[: used - 1], torch.tensor([length])])
        return Haystack(ids, cuts, texts)

    def _longest_key(self) -> int:
        return max(len(key.ids) for key in self._keys)

    def _longest_value(self) -> int:
        return self.digits + 2  # a space and the digits, one token per byte at most, plus a prefix token

    def _piece(self, text: str) -> Piece:
        return Piece(torch.tensor(self._encode([text])[0], dtype=torch.long), text)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]


def _split(template: str) -> list[str]:
    """Fixed text and placeholders (each with the space before it), in order, empty parts dropped."""
    return [part for part in re.split(r"( \{(?:key|value)\})", template) if part]
