"""The generators `data.name` selects: each task in a tokenizer-free and a text version.

Their keyword arguments are the `data.*` keys of conf/data/<name>.yaml (besides vocab_size, seq_len and
seed, which the job passes). Templates: the tokenizer-free ones name marker tokens, the text ones
follow the passkey test of Mohtashami & Jaggi (2023) and RULER's needle.
"""

from __future__ import annotations

from trainer.data.synthetic.language import TokenLanguage
from trainer.data.synthetic.tasks import CommonWords, MultiValue, Needle, Recall, VariableTracking, require
from trainer.data.synthetic.text import TextLanguage

_RECALL = {"head": (), "write": ("{key}", "{value}"), "query": ("{key}", "{value}")}
_PASSKEY = {"head": (), "write": ("needle", "{value}"), "query": ("query", "{value}")}
_NEEDLE = {"head": (), "write": ("needle", "{key}", "{value}"), "query": ("query", "{key}", "{value}")}
_MULTIVALUE = {**_NEEDLE, "more": ("and", "{value}")}
_VARIABLES = {
    "head": (),
    "write": ("var", "{key}", "is", "{value}"),
    "hop": ("var", "{key}", "is", "var", "{key}"),
    "query": ("query", "{value}"),
    "answer": ("{key}",),
    "more": ("{key}",),
}
_COMMON_WORDS = {"head": (), "entry": ("{key}",), "query": ("query",), "answer": ("{key}",), "more": ("{key}",)}

_RECALL_TEXT = {
    "head": "Memorize the codes below. I will ask for them later.",
    "write": " The code for {key} is {value}.",
    "query": " The code for {key} is {value}.",
}
_PASSKEY_TEXT = {
    "head": "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.",
    "write": " The pass key is {value}. Remember it. {value} is the pass key.",
    "query": " What is the pass key? The pass key is {value}.",
}
_NEEDLE_TEXT = {
    "head": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.",
    "write": " One of the special magic numbers for {key} is: {value}.",
    "query": " What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is {value}.",
}
_MULTIVALUE_TEXT = {
    **_NEEDLE_TEXT,
    "query": " What are all the special magic numbers for {key} mentioned in the provided text? "
    "The special magic numbers for {key} mentioned in the provided text are {value}",
    "more": ", {value}",
}
_VARIABLES_TEXT = {
    "head": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
    "write": " VAR {key} = {value}.",
    "hop": " VAR {key} = VAR {key}.",
    "query": " Question: Find all variables that are assigned the value {value} in the text above. Answer: "
    "According to the chain(s) of variable assignment in the text above, the variables assigned the value "
    "{value} are:",
    "answer": " {key}",
    "more": ", {key}",
}


def _common_words_text(num_common: int) -> dict[str, str]:
    return {
        "head": "Below is a list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        "entry": " {key},",
        "query": f" Question: What are the {num_common} most common words in the above list? Answer: "
        f"The top {num_common} words that appear most often in the list are:",
        "answer": " {key}",
        "more": ", {key}",
    }


class SyntheticRecall(Recall):
    """Multi-query associative recall in its own small vocabulary: a key token then a value token per
    pair, random filler tokens in between (see `Recall` for the layout and `query_gap`)."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, num_pairs: int = 8, query_gap: int | None = None,
        query_gap_max: int | None = None, docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TokenLanguage(vocab_size, _RECALL, None, num_pairs, f"num_pairs={num_pairs}")
        super().__init__(language, seq_len, seed, num_pairs, query_gap, query_gap_max, docs_per_sequence, loss_on)


class SyntheticPasskey(Needle):
    """Passkey retrieval in its own small vocabulary: a needle marker then `digits` digit tokens, and
    at the end a query marker the digits answer."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, digits: int = 5, depth: float | None = None,
        docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TokenLanguage(vocab_size, _PASSKEY, _digits(digits), 0, f"digits={digits}")
        super().__init__(language, seq_len, seed, 1, 1, depth, docs_per_sequence, loss_on)


class SyntheticNeedle(Needle):
    """Needle in a haystack in its own small vocabulary: needle marker, key token, `digits` digit
    tokens; each query is a query marker and a key, answered by that key's digits."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, num_needles: int = 1, num_queries: int = 1, digits: int = 7,
        depth: float | None = None, docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TokenLanguage(vocab_size, _NEEDLE, _digits(digits), num_needles, f"num_needles={num_needles}")
        super().__init__(language, seq_len, seed, num_needles, num_queries, depth, docs_per_sequence, loss_on)


class TextRecall(Recall):
    """Multi-query associative recall as text: "The code for amber-falcon is 4821." written, then asked."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, tokenizer: str | None = None, num_pairs: int = 8,
        digits: int = 4, query_gap: int | None = None, query_gap_max: int | None = None, docs_per_sequence: int = 1,
        loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TextLanguage(tokenizer, vocab_size, _RECALL_TEXT, _digits(digits))
        super().__init__(language, seq_len, seed, num_pairs, query_gap, query_gap_max, docs_per_sequence, loss_on)


class TextPasskey(Needle):
    """Passkey retrieval as text: "The pass key is 68123. Remember it." in filler sentences."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, tokenizer: str | None = None, digits: int = 5,
        depth: float | None = None, docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TextLanguage(tokenizer, vocab_size, _PASSKEY_TEXT, _digits(digits))
        super().__init__(language, seq_len, seed, 1, 1, depth, docs_per_sequence, loss_on)


class TextNeedle(Needle):
    """Needle in a haystack as text (RULER's): "One of the special magic numbers for amber-falcon is: 4821937." """

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, tokenizer: str | None = None, num_needles: int = 1,
        num_queries: int = 1, digits: int = 7, depth: float | None = None, docs_per_sequence: int = 1,
        loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TextLanguage(tokenizer, vocab_size, _NEEDLE_TEXT, _digits(digits))
        super().__init__(language, seq_len, seed, num_needles, num_queries, depth, docs_per_sequence, loss_on)


class SyntheticMultiValue(MultiValue):
    """Multi-value needle in its own small vocabulary: `num_values` needles (marker, key, digits) share one
    key; the query marker and the key are answered by every value, joined by an "and" marker."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, num_values: int = 4, digits: int = 7,
        depth: float | None = None, docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TokenLanguage(vocab_size, _MULTIVALUE, _digits(digits), 1, f"num_values={num_values}")
        super().__init__(language, seq_len, seed, num_values, depth, docs_per_sequence, loss_on)


class TextMultiValue(MultiValue):
    """Multi-value needle as text (RULER's niah_multivalue): "What are all the special magic numbers for
    amber-falcon ...? ... are 4821937, 1203945, ..." """

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, tokenizer: str | None = None, num_values: int = 4,
        digits: int = 7, depth: float | None = None, docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TextLanguage(tokenizer, vocab_size, _MULTIVALUE_TEXT, _digits(digits))
        super().__init__(language, seq_len, seed, num_values, depth, docs_per_sequence, loss_on)


class SyntheticVariableTracking(VariableTracking):
    """Variable tracking in its own small vocabulary: var marker, key, is marker, then digits (the first
    assignment) or var marker and key (a hop); the query marker and the value are answered by the keys."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, num_chains: int = 1, num_hops: int = 4, digits: int = 5,
        docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        needs = f"num_chains={num_chains} of num_hops={num_hops}"
        variables = num_chains * (num_hops + 1) if isinstance(num_chains, int) and isinstance(num_hops, int) else 1
        language = TokenLanguage(vocab_size, _VARIABLES, _digits(digits), variables, needs)
        super().__init__(language, seq_len, seed, num_chains, num_hops, docs_per_sequence, loss_on)


class TextVariableTracking(VariableTracking):
    """Variable tracking as text (RULER's vt): "VAR amber-falcon = 12345." then "VAR cobalt-comet = VAR
    amber-falcon." ...; "... the variables assigned the value 12345 are: amber-falcon, cobalt-comet, ..." """

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, tokenizer: str | None = None, num_chains: int = 1,
        num_hops: int = 4, digits: int = 5, docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TextLanguage(tokenizer, vocab_size, _VARIABLES_TEXT, _digits(digits))
        super().__init__(language, seq_len, seed, num_chains, num_hops, docs_per_sequence, loss_on)


class SyntheticCommonWords(CommonWords):
    """Common words extraction in its own small vocabulary: the words are key tokens; the query marker is
    answered by the `num_common` frequent ones."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, num_common: int = 10, ratio: int = 10,
        docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        words = num_common + 1 if isinstance(num_common, int) else 2
        language = TokenLanguage(vocab_size, _COMMON_WORDS, None, words, f"num_common={num_common}")
        super().__init__(language, seq_len, seed, num_common, ratio, docs_per_sequence, loss_on)


class TextCommonWords(CommonWords):
    """Common words extraction as text (RULER's cwe): "amber-falcon, jolly-harp, ..." and "... the top 10
    words that appear most often in the list are: amber-falcon, ..." (the words are the key names)."""

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, tokenizer: str | None = None, num_common: int = 10,
        ratio: int = 10, docs_per_sequence: int = 1, loss_on: str = "all",
    ) -> None:  # fmt: skip
        language = TextLanguage(tokenizer, vocab_size, _common_words_text(num_common), digits=1)
        super().__init__(language, seq_len, seed, num_common, ratio, docs_per_sequence, loss_on)


def _digits(digits: int) -> int:
    require(isinstance(digits, int) and 1 <= digits <= 18, "digits", "an integer in [1, 18]", digits)
    return digits
