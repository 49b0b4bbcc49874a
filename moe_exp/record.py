"""The run record: ``summary.json`` in the run folder, always written atomically.

Status is ``running`` while a run trains, then ``completed``, ``failed`` or ``diverged``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STATUSES = ("running", "completed", "failed", "diverged")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=float)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunRecord:
    """Keeps ``summary.json`` current: created as running, finished exactly once."""

    def __init__(self, run_dir: Path, overrides: list[str] | None = None) -> None:
        self.path = Path(run_dir) / "summary.json"
        self.start = time.perf_counter()
        self.data: dict[str, Any] = {"status": "running", "overrides": list(overrides or [])}
        write_json_atomic(self.path, self.data)

    def update(self, **values: Any) -> None:
        self.data.update(values)
        write_json_atomic(self.path, self.data)

    def finish(self, status: str, error: str | None = None, **values: Any) -> None:
        assert status in STATUSES[1:], status
        self.data.update(values)
        self.data["status"] = status
        self.data["wall_time_s"] = round(time.perf_counter() - self.start, 3)
        if error is not None:
            self.data["error"] = error
        write_json_atomic(self.path, self.data)
