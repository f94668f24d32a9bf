"""``Job.*`` methods over the :class:`~virtnode.jobs.manager.JobManager`."""

from __future__ import annotations

from virtnode.api_schema.params import (
    JobCancelParams,
    JobGetParams,
    JobListParams,
    JobWaitParams,
)
from virtnode.jobs.manager import JobManager
from virtnode.util.jsontypes import JsonObject


class JobService:
    """List, read, wait for and cancel jobs."""

    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    async def list(self, params: JobListParams) -> JsonObject:
        jobs = self._jobs.list(state=params.get("state"), kind=params.get("kind"),
                               target=params.get("target"))
        return {"jobs": [job.to_api() for job in jobs]}

    async def get(self, params: JobGetParams) -> JsonObject:
        return {"job": self._jobs.get(params["job_id"]).to_api()}

    async def wait(self, params: JobWaitParams) -> JsonObject:
        job = await self._jobs.wait(params["job_id"], params["timeout"])
        return {"job": job.to_api()}

    async def cancel(self, params: JobCancelParams, by: str) -> JsonObject:
        """Cancel a job; ``by`` names the caller in the job's record."""
        job = await self._jobs.cancel(params["job_id"], by=by)
        return {"job": job.to_api()}
