"""Evaluation: `answers` is the training loop's teacher-forced answer accuracy (`eval.every`); the rest
serves `ttt-eval` on a trained model: perplexity by position, a RULER-style suite scored by
string match on greedy generations, and a needle-in-a-haystack depth x length grid.
"""
