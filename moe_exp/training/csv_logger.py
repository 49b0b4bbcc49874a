"""Lightning's CSV logger, with columns a callback adds to every row it writes.

Every row of ``metrics.csv`` says its phase (fit, validate, test) and, in staged training,
its stage (``row_tags``): words the numeric metrics Lightning logs cannot carry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightning.pytorch.loggers import CSVLogger


class TaggedCSVLogger(CSVLogger):
    """A CSVLogger whose rows also get ``row_tags``: column name -> a function giving its value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.row_tags: dict[str, Callable[[], Any]] = {}

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        tags = {name: value() for name, value in self.row_tags.items()}
        super().log_metrics({**metrics, **tags}, step)


def tag_rows(loggers: Iterable[Any], column: str, value: Callable[[], Any]) -> None:
    """Give every row the loggers that take tags write a ``column`` (``value()`` at write
    time); other loggers, and Lightning's dummy ones, are left alone."""
    for logger in loggers:
        if isinstance(getattr(logger, "row_tags", None), dict):
            logger.row_tags[column] = value
