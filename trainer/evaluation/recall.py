"""The RULER-style suite and the needle-in-a-haystack grid: generated samples, greedy generation from each
question's prompt, RULER's string match.

A question is the prompt before an answer and the answers generated after it: one per answer (single,
multi-key, multi-query needles: each query is asked separately, the earlier ones answered in its
prompt) or one for all of a document's answers (multi-value, variable tracking, common words: RULER's
one question listing them). The model generates greedily the tokens the answers take in the sample plus
`extra_tokens`; a question scores the fraction of its expected strings the decoded output contains, a
sample the mean over its questions, a cell (task x length) the mean over its samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.synthetic import GENERATORS, Answer, Sample
from trainer.evaluation.scoring import string_match_all, token_text
from trainer.inference import generate


@dataclass(frozen=True)
class RulerTask:
    generator: str  # the tokenizer-free GENERATORS name; the text version is f"{generator}_text"
    one_question: bool  # one question asks for all answers of a document
    knobs: dict = field(default_factory=dict)


RULER_TASKS = {
    "niah_single": RulerTask("synthetic_niah", False),
    "niah_multikey": RulerTask("synthetic_niah", False, {"num_needles": 4}),
    "niah_multivalue": RulerTask("synthetic_niah_multivalue", True, {"num_values": 4}),
    "niah_multiquery": RulerTask("synthetic_niah", False, {"num_needles": 4, "num_queries": 4}),
    "vt": RulerTask("synthetic_vt", True, {"num_chains": 1, "num_hops": 4}),
    "cwe": RulerTask("synthetic_cwe", True, {"num_common": 10, "ratio": 10}),
}
NIAH_TASK = RULER_TASKS["niah_single"]  # the heatmap's task, at each depth


class RecallScorer:
    """Scores generated samples with `model`; text tasks when `tokenizer` (a loaded tokenizer, from the
    folder `tokenizer_dir`) is given, else the tokenizer-free versions."""

    def __init__(self, model, tokenizer=None, tokenizer_dir: str | None = None, extra_tokens: int = 8):
        self.model, self.tokenizer, self.tokenizer_dir = model, tokenizer, tokenizer_dir
        self.extra_tokens = extra_tokens
        self.device = next(model.parameters()).device

    def dataset(self, task: RulerTask, length: int, seed: int, **knobs):
        """The task's generator at `length` tokens (a ValueError with one line if it does not fit)."""
        options = {**task.knobs, **knobs}
        name = task.generator
        if self.tokenizer is not None:
            name, options = f"{name}_text", {**options, "tokenizer": self.tokenizer_dir}
        return GENERATORS[name](vocab_size=self.model.config.vocab_size, seq_len=length, seed=seed, **options)

    def score(self, sample: Sample, one_question: bool) -> float:
        answers = sorted(sample.answers, key=lambda answer: answer.start)
        questions = [answers] if one_question else [[answer] for answer in answers]
        return sum(self._question(sample, question) for question in questions) / len(questions)

    def _question(self, sample: Sample, answers: list[Answer]) -> float:
        first, ids = answers[0], sample.input_ids[0]
        new_tokens = answers[-1].end - first.start + self.extra_tokens
        if self.tokenizer is None:
            prompt = ids[sample.documents[first.document].start : first.start][None]
            references = [token_text(ids[answer.start : answer.end].tolist()) for answer in answers]
        else:
            prompt = self.tokenizer(sample.prompt(first), return_tensors="pt").input_ids
            references = [answer.text for answer in answers]
        output = generate(self.model, prompt.to(self.device), new_tokens)[0, prompt.shape[1] :].tolist()
        prediction = token_text(output) if self.tokenizer is None else self.tokenizer.decode(output)
        return string_match_all(prediction, references)


def score_cells(scorer: RecallScorer, cells: dict, samples: int, progress) -> dict:
    """The mean score over samples 0 .. samples-1 of each cell, {key: (dataset, one_question)} -> {key:
    score}; `progress.update()` after each sample."""
    scores = {}
    for key, (dataset, one_question) in cells.items():
        total = 0.0
        for index in range(samples):
            total += scorer.score(dataset.sample(index), one_question)
            progress.update()
        scores[key] = total / samples
    return scores
