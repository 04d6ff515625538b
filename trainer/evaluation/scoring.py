"""RULER's score of one generation: the fraction of the expected strings it contains, case-insensitive
(`string_match_all` in RULER's scripts/eval/synthetic/constants.py, used there for every NIAH, variable
tracking and common words task; as a fraction, not a percentage)."""

from __future__ import annotations

from collections.abc import Sequence


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    prediction = prediction.lower()
    return sum(reference.lower() in prediction for reference in references) / len(references)


def token_text(ids: Sequence[int]) -> str:
    """Tokenizer-free generations and answers as text: ids between spaces, so that containment only
    matches whole tokens (" 12 34 " is not in " 112 34 ")."""
    return " " + " ".join(str(int(i)) for i in ids) + " "
