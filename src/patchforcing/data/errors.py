"""The one exception type of the data layer."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data set cannot be built or read: missing/empty folder, bad file, bad spec, ...

    Subclasses :class:`ValueError` so callers that already catch configuration errors catch it too.
    The message always names the offending path (or spec key) and what was expected.
    """
