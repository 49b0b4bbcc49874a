"""Lightning's CSV logger, with columns a callback adds to every row it writes.

Staged training tags each row of ``metrics.csv`` with the stage it was logged in
(``row_tags["stage"]``), a word the numeric metrics Lightning logs cannot carry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
