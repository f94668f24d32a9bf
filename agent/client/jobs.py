"""``virtnode job ...``: follow, list and cancel jobs from the command line.

Watching long-polls ``Job.wait`` with a short timeout, so progress shows about once a
second and a lost event subscription cannot make it miss the end. On a terminal the
progress bar is redrawn in place; otherwise a line is printed whenever the state or the
progress changes, for logs and scripts.
"""

from __future__ import annotations

import json
from typing import TextIO

from virtnode.client.connection import Client
from virtnode.util.jsontypes import JsonObject

BAR_WIDTH = 30
TERMINAL = ("succeeded", "failed", "cancelled")


def bar_line(job: JsonObject, width: int = BAR_WIDTH) -> str:
    """One line with a progress bar, for a terminal."""
    filled = job["progress"] * width // 100
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}] {job['progress']:3d}%  {job['state']:<9}  {job['description']}"


def plain_line(job: JsonObject) -> str:
    """One line without control characters, for logs."""
    return f"job {job['job_id']} {job['state']} {job['progress']}%"


def outcome_lines(job: JsonObject) -> tuple[str, str]:
    """What to print when the job has ended: (stdout, stderr) text, either may be empty."""
    if job["state"] == "succeeded":
        return json.dumps(job["result"], indent=2, sort_keys=True), ""
    summary = f"job {job['job_id']} {job['state']}"
    return "", f"{summary}\n{json.dumps(job['error'], indent=2, sort_keys=True)}"


async def watch(client: Client, job_id: str, out: TextIO, *, tty: bool,
                poll: float = 1.0) -> JsonObject:
    """Follow ``job_id`` until it ends, drawing its progress on ``out``; returns the job."""
    shown: tuple[str, int] | None = None
    while True:
        job: JsonObject = (await client.call(
            "Job.wait", {"job_id": job_id, "timeout": poll}, timeout=poll + 30))["job"]
        if tty:
            out.write("\r" + bar_line(job) + "\x1b[K")
            out.flush()
        elif (job["state"], job["progress"]) != shown:
            out.write(plain_line(job) + "\n")
            out.flush()
        shown = (job["state"], job["progress"])
        if job["state"] in TERMINAL:
            if tty:
                out.write("\n")
            return job


def job_table(jobs: list[JsonObject]) -> list[str]:
    """``Job.list`` as aligned lines, newest last."""
    rows = [(j["job_id"], j["kind"], j["state"], f"{j['progress']}%", j["target"] or "-",
             j["description"]) for j in jobs]
    header = ("JOB", "KIND", "STATE", "PROGRESS", "TARGET", "DESCRIPTION")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)) + "  "
            + str(row[-1]) for row in [header, *rows]]
