"""``Job.*``: a cancel records who cancelled."""

from __future__ import annotations

from virtnode.jobs.service import JobService
from virtnode.rpc.bindings import Bound, params, with_caller


def handlers(jobs: JobService) -> dict[str, Bound]:
    return {
        "Job.list": params(jobs.list),
        "Job.get": params(jobs.get),
        "Job.wait": params(jobs.wait),
        "Job.cancel": with_caller(jobs.cancel),
    }
