"""How ``virtnode job`` draws jobs: the progress bar, plain lines, the table, the outcome."""

from __future__ import annotations

import json
from typing import Any

from virtnode.client.jobs import bar_line, job_table, outcome_lines, plain_line

JOB_ID = "5c1a7e1e-0000-4000-8000-000000000001"


def job(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": JOB_ID, "kind": "VM.shutdown", "state": "running", "progress": 40,
        "description": "shut down VM x", "target": "x", "cancellable": True, "started": 1.0,
        "finished": None, "error": None, "result": None, "request_key": None,
    }
    return {**base, **fields}


def test_the_bar_fills_with_the_progress() -> None:
    assert bar_line(job(progress=0), width=10) == "[..........]   0%  running    shut down VM x"
    assert bar_line(job(progress=40), width=10).startswith("[####......]  40%")
    assert bar_line(job(progress=100, state="succeeded"), width=10).startswith("[##########] 100%")


def test_plain_lines_have_no_control_characters() -> None:
    line = plain_line(job())
    assert line == f"job {JOB_ID} running 40%"
    assert line.isprintable()


def test_outcome_goes_to_stdout_on_success_and_stderr_otherwise() -> None:
    out, err = outcome_lines(job(state="succeeded", result={"stopped_by": "acpi"}))
    assert json.loads(out) == {"stopped_by": "acpi"} and err == ""
    error = {"code": 1, "message": "cancelled by uid:0", "data": {"name": "Cancelled"}}
    out, err = outcome_lines(job(state="cancelled", error=error))
    assert out == "" and err.startswith(f"job {JOB_ID} cancelled\n")
    assert json.loads(err.split("\n", 1)[1]) == error


def test_the_table_aligns_columns() -> None:
    lines = job_table([job(), job(job_id="short", target=None, kind="Volume.copy")])
    assert lines[0].split() == ["JOB", "KIND", "STATE", "PROGRESS", "TARGET", "DESCRIPTION"]
    assert lines[2].split()[:5] == ["short", "Volume.copy", "running", "40%", "-"]
    starts = {line.find(word) for line, word in zip(lines, ("STATE", "running", "running"),
                                                    strict=True)}
    assert len(starts) == 1
