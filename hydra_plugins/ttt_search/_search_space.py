"""`hydra.sweeper.params` (and sweep arguments on the command line) -> Optuna distributions.

The syntax is Hydra's override grammar, read with Hydra's own parser:

    choice(16, 32, 64)              CategoricalDistribution
    range(1, 9, step=2)             IntDistribution(1, 8, step=2), or a FloatDistribution with a float bound
    interval(0.1, 10.0)             FloatDistribution(0.1, 10.0) (Hydra reads an interval's bounds as floats)
    int(interval(1, 64))            IntDistribution(1, 64)
    tag(log, interval(0.1, 10.0))   on a log scale (also tag(log, int(interval(...))))
    4, true, ~key                   fixed: passed to every trial as it is

A module whose name starts with `_`, so that Hydra's plugin scan does not run it a second time (it re-executes
the modules of hydra_plugins, which would make a second SearchSpaceError class).
"""

from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer


class SearchSpaceError(ValueError):
    """A parameter the sweeper cannot search; the message is one line naming it."""


def _distribution(override: Override):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and sweep.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.identity))
        if not all(isinstance(c, (str, int, float, bool, type(None))) for c in choices):
            raise SearchSpaceError(
                f"{override.input_line}: choice() takes plain values (numbers, strings, booleans, null)"
            )
        return CategoricalDistribution(choices)
    if override.is_range_sweep():  # Hydra's range() excludes its stop, Optuna's bounds are inclusive
        count = math.ceil((sweep.stop - sweep.start) / sweep.step)
        if count < 1:
            raise SearchSpaceError(f"{override.input_line}: an empty range")
        last = sweep.start + (count - 1) * sweep.step
        if any(isinstance(v, float) for v in (sweep.start, sweep.stop, sweep.step)):
            return FloatDistribution(float(sweep.start), float(last), step=float(sweep.step))
        return IntDistribution(sweep.start, last, step=sweep.step)
    if override.is_interval_sweep():
        log = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    raise SearchSpaceError(f"{override.input_line}: not a search space (choice, range, interval, tag)")


def parse_search_space(arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions to search ({key: distribution}) and the overrides every trial gets unchanged.
    A key given twice takes its last value (the command line comes after `hydra.sweeper.params`)."""
    distributions, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = _distribution(override)
        else:
            fixed[key] = override.input_line
    return distributions, list(fixed.values())


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """The overrides that set a trial's parameters: strings quoted, so that '1e-3' or 'a,b' stay one value."""
    return [f"{key}={quoted(value)}" for key, value in params.items()]


def quoted(value: Any) -> str:
    """`value` as an override's value."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)
