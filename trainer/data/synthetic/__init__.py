"""Generated long-context tasks (no download): passkey retrieval, needle in a haystack (single, multi-key
or multi-value), multi-query associative recall, variable tracking and common words extraction (the last
three as in RULER), each tokenizer-free (its own small vocabulary, for tiny models) and as tokenized text
(for real models, `tokenizer=<local folder>`).

`dataset[i]` is the training item (input_ids, position_ids, labels, each (1, S)) made from (seed, i)
alone; `dataset.sample(i)` is the same sequence as a `Sample` with its documents and `Answer`s
(token spans, expected strings, needle depth, write -> query distance) for evaluation.
"""

from trainer.data.synthetic.generators import (
    SyntheticCommonWords,
    SyntheticMultiValue,
    SyntheticNeedle,
    SyntheticPasskey,
    SyntheticRecall,
    SyntheticVariableTracking,
    TextCommonWords,
    TextMultiValue,
    TextNeedle,
    TextPasskey,
    TextRecall,
    TextVariableTracking,
)
from trainer.data.synthetic.sample import Answer, Document, Sample

__all__ = ["GENERATORS", "Answer", "Document", "Sample", "SyntheticRecall"]

GENERATORS = {
    "synthetic_recall": SyntheticRecall,
    "synthetic_passkey": SyntheticPasskey,
    "synthetic_niah": SyntheticNeedle,
    "synthetic_recall_text": TextRecall,
    "synthetic_passkey_text": TextPasskey,
    "synthetic_niah_text": TextNeedle,
    "synthetic_niah_multivalue": SyntheticMultiValue,
    "synthetic_niah_multivalue_text": TextMultiValue,
    "synthetic_vt": SyntheticVariableTracking,
    "synthetic_vt_text": TextVariableTracking,
    "synthetic_cwe": SyntheticCommonWords,
    "synthetic_cwe_text": TextCommonWords,
}
