"""The run record: ``summary.json`` in the run folder, always written atomically.

Status is ``running`` while a run trains, then ``completed``, ``failed``, ``diverged``,
``interrupted`` (stopped by SIGTERM/SIGINT with a checkpoint to resume from) or ``debug``
(a fast_dev_run: it ran one batch of each split and has no results). A resumed run
keeps its record: the resume count goes up, the epoch it resumed from is noted, and the wall
time adds up over the attempts (it is written at every update and epoch, so a part killed
outright counts up to its last epoch).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STATUSES = ("running", "completed", "failed", "diverged", "interrupted", "debug")


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
    """Keeps ``summary.json`` current: created as running, finished exactly once.

    ``resume=True`` continues the record of an earlier attempt in the same folder (its wall
    time and resume count); ``enabled=False`` (the non-zero ranks of a DDP run) writes nothing.
    """

    def __init__(
        self,
        run_dir: Path,
        overrides: list[str] | None = None,
        resume: bool = False,
        enabled: bool = True,
    ) -> None:
        self.path = Path(run_dir) / "summary.json"
        self.enabled = enabled
        self.start = time.perf_counter()
        self.earlier_s = 0.0
        self.data: dict[str, Any] = {"status": "running", "overrides": list(overrides or [])}
        if resume and self.path.is_file():
            before = json.loads(self.path.read_text())
            self.earlier_s = float(before.get("wall_time_s") or 0.0)
            self.data["resumes"] = int(before.get("resumes", 0)) + 1
            self.data["interrupted_before"] = before.get("error")
        self._write()

    def _write(self) -> None:
        # the wall time so far is in every write, so a run killed outright (SIGKILL) leaves
        # the time of its part for a resume to add to
        elapsed = time.perf_counter() - self.start
        self.data["wall_time_s"] = round(self.earlier_s + elapsed, 3)
        if self.enabled:
            write_json_atomic(self.path, self.data)

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self._write()

    def finish(self, status: str, error: str | None = None, **values: Any) -> None:
        assert status in STATUSES[1:], status
        self.data.update(values)
        self.data["status"] = status
        if error is not None:
            self.data["error"] = error
        else:
            self.data.pop("error", None)
        self._write()
