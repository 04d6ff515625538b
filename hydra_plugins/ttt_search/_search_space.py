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
from hydra.core.override_parser.types import Override, Transformer, ValueType
from hydra.errors import OverrideParseException


class SearchSpaceError(ValueError):
    """A parameter the sweeper cannot search; the message is one line naming it."""


def _distribution(override: Override):
    """The distribution of a sweep override; every way it can be invalid, Optuna's own checks included, is a
    one-line SearchSpaceError naming it."""
    searchable = override.is_choice_sweep() or override.is_range_sweep() or override.is_interval_sweep()
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP or not searchable:  # glob(): config group options
        raise SearchSpaceError(f"{override.input_line}: not a search space (choice, range, interval, tag)")
    try:
        return _optuna_distribution(override)
    except ValueError as err:  # e.g. low > high, or log with a bound <= 0
        raise SearchSpaceError(f"{override.input_line}: {err}") from None


def _optuna_distribution(override: Override):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    log = "log" in sweep.tags
    if override.is_choice_sweep() or (override.is_range_sweep() and sweep.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.identity))
        if not all(isinstance(c, (str, int, float, bool, type(None))) for c in choices):
            raise ValueError("choice() takes plain values (numbers, strings, booleans, null)")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():  # Hydra's range() excludes its stop, Optuna's bounds are inclusive
        _require_finite(sweep.start, sweep.stop, sweep.step)
        if sweep.step <= 0:
            raise ValueError("a range's step must be positive")
        count = math.ceil((sweep.stop - sweep.start) / sweep.step)
        if count < 1:
            raise ValueError("an empty range")
        last = sweep.start + (count - 1) * sweep.step
        if any(isinstance(v, float) for v in (sweep.start, sweep.stop, sweep.step)):
            return FloatDistribution(float(sweep.start), float(last), step=float(sweep.step), log=log)
        return IntDistribution(sweep.start, last, step=sweep.step, log=log)
    _require_finite(sweep.start, sweep.end)
    if isinstance(sweep.start, int) and isinstance(sweep.end, int):
        return IntDistribution(sweep.start, sweep.end, log=log)
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log)


def _require_finite(*bounds: float) -> None:
    if not all(math.isfinite(b) for b in bounds):
        raise ValueError("bounds and steps must be finite numbers")


def parse_search_space(arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions to search ({key: distribution}) and the overrides every trial gets unchanged.
    A key given twice takes its last value (the command line comes after `hydra.sweeper.params`)."""
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
    except OverrideParseException as err:  # Hydra's message: the override, the reason, a link to the grammar
        raise SearchSpaceError(": ".join(str(err).splitlines()[:2])) from None
    distributions, fixed = {}, {}
    for override in overrides:
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = _distribution(override)
        else:
            fixed[key] = override.input_line
    return distributions, list(fixed.values())


def edge_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Points at the edges of a space, to check before searching it: every parameter at its first edge, then each
    parameter at each of its other edges (every choice, an interval's or a range's bounds), the rest at their first."""
    edges = {key: list(dict.fromkeys(getattr(d, "choices", None) or (d.low, d.high))) for key, d in space.items()}
    first = {key: values[0] for key, values in edges.items()}
    return [first] + [{**first, key: value} for key, values in edges.items() for value in values[1:]]


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
