"""The work pool as the worker needs it: read, created if missing, with a job template."""

from __future__ import annotations

import attrs
import structlog

from worker.host.logs import Once
from worker.host.settings import Settings, read_job_template
from worker.prefect.answers import ApiNotFound
from worker.prefect.api import PrefectClient
from worker.rules.job import ProcessJobConfiguration
from worker.rules.models import WorkPool

log = structlog.get_logger("flow_worker")


async def ensure_pool(client: PrefectClient, settings: Settings, once: Once) -> WorkPool:
    """Read the pool; create it if missing (unless ``create_pool_if_not_found`` is off:
    then a 404 is raised, a configuration error); give an empty template Prefect's
    default, as Prefect's worker does. A pool of another type, or paused, is said once."""
    name = settings.pool
    assert name is not None
    pool = await client.read_work_pool(name)
    if pool is None:
        if not settings.create_pool_if_not_found:
            raise ApiNotFound("GET", f"/work_pools/{name}", 404, f"Work pool {name!r} not found!")
        template = read_job_template(settings.base_job_template) if settings.base_job_template else None
        pool = await client.create_work_pool(name, template)
        log.info("pool.created", work_pool=name, base_job_template=settings.base_job_template)
    elif settings.base_job_template:
        once.say(
            "pool.exists",
            log,
            "info",
            "pool.template_not_applied",
            work_pool=name,
            reason="the pool exists; --base-job-template is used only when creating it",
        )
    if pool.base_job_template == {}:
        template = ProcessJobConfiguration.default_base_job_template()
        await client.set_base_job_template(name, template)
        pool = attrs.evolve(pool, base_job_template=template)
        log.info("pool.template_set", work_pool=name)
    said(pool, once)
    return pool


def said(pool: WorkPool, once: Once) -> None:
    """A pool of another type, or paused, is said once (until it changes)."""
    for key, condition, fields in (
        ("pool.type_mismatch", pool.type != "process", {"pool_type": pool.type}),
        ("pool.paused", pool.is_paused, {}),
    ):
        if condition:
            once.say(key, log, "warning", key, work_pool=pool.name, **fields)
        else:
            once.clear(key)
