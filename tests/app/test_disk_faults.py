"""Faults of the machine: a run or sweep folder that cannot be made, a full disk while writing
a plot or the summary. Each ends with one message and a record that says failed, or the last
complete record where even that cannot be written; a sweep's other jobs go on."""

import errno
import json
import os

import matplotlib.figure
import pytest

from moe_exp.app import record
from tests.conftest import TINY, single_run_dir


def _disk_full(path, code=errno.ENOSPC):
    return OSError(code, os.strerror(code), str(path))


def test_a_run_or_sweep_folder_that_cannot_be_made_gets_one_message(app):
    for extra in ([], ["-m", "seed=0,1"]):
        out = app(*TINY, *extra, "paths.output_dir=/proc/moe-exp-cannot-be-here")
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "Could not create the" in out.stderr and "paths.output_dir=<folder>" in out.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])  # full, or read-only
def test_a_full_or_read_only_disk_while_drawing_ends_the_run_failed(
    app, tmp_path, monkeypatch, code
):
    def savefig(self, path, *args, **kwargs):
        raise _disk_full(path, code)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    out = app(*TINY, "plots=true")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{os.strerror(code)} (errno {code})" in out.stderr
    summary = json.loads((single_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("WriteError: Could not")
    assert ".png" in summary["error"]


def test_when_the_summary_itself_cannot_be_written_the_last_complete_one_stays(
    app, tmp_path, monkeypatch
):
    write = record.write_json_atomic

    def full_at_the_end(path, data):
        if data["status"] != "running":
            raise _disk_full(path.parent / f".{path.name}.tmp")
        write(path, data)

    monkeypatch.setattr(record, "write_json_atomic", full_at_the_end)
    out = app(*TINY)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    summary = json.loads((single_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "running" and summary["epochs"] == 1  # whole, as last written


def test_a_sweep_job_with_a_full_disk_does_not_stop_the_others(app, tmp_path, monkeypatch):
    def savefig(self, path, *args, **kwargs):
        raise _disk_full(path)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    out = app("-m", *TINY, "plots=true,false")  # job 0 draws and meets the full disk
    assert out.returncode == 1  # non-zero, after every job ran
    statuses = {
        p.parent.name: json.loads(p.read_text())["status"]
        for p in tmp_path.glob("outputs/multiruns/*/*/*/summary.json")
    }
    assert statuses == {"0": "failed", "1": "completed"}
