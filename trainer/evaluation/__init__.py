"""Long-context evaluation of a trained model (`python -m tools.eval`): perplexity by position, a RULER-style
suite scored by string match on greedy generations, and a needle-in-a-haystack depth x length grid.

`trainer.evaluate` is the other kind: the training loop's teacher-forced answer accuracy.
"""
