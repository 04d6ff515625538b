"""The one error type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """A bad input file, shard or data option; the message is one line naming the file or key."""
