"""``Job.*`` methods over the :class:`~virtnode.jobs.manager.JobManager`."""

from __future__ import annotations

from typing import Any

from virtnode.jobs.manager import JobManager
from virtnode.rpc.dispatch import CallContext, rpc_method

JsonObject = dict[str, Any]


class JobService:
    """List, read, wait for and cancel jobs."""

    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs

    @rpc_method("Job.list")
    async def list(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        jobs = self._jobs.list(state=params.get("state"), kind=params.get("kind"),
                               target=params.get("target"))
        return {"jobs": [job.to_api() for job in jobs]}

    @rpc_method("Job.get")
    async def get(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        return {"job": self._jobs.get(params["job_id"]).to_api()}

    @rpc_method("Job.wait")
    async def wait(self, _ctx: CallContext, params: JsonObject) -> JsonObject:
        job = await self._jobs.wait(params["job_id"], params["timeout"])
        return {"job": job.to_api()}

    @rpc_method("Job.cancel")
    async def cancel(self, ctx: CallContext, params: JsonObject) -> JsonObject:
        job = await self._jobs.cancel(params["job_id"], by=ctx.caller.identity)
        return {"job": job.to_api()}
