"""The only module that registers kopf handlers. Each one is a few lines delegating to reconcile.py.

Handlers are registered by `register(registry)` when the operator starts, never at import
time. Running jobs are refreshed (metrics scrape) by one poller task (poller.py) that the startup handler starts.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import kopf

from . import reconcile as rec
from .login import login
from .names import (
    ANNOTATION_PREFIX,
    FINALIZER,
    GROUP,
    JOB_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PLURAL,
    VERSION,
    JobKey,
)

LTJ = dict(group=GROUP, version=VERSION, plural=PLURAL)
CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY},{JOB_LABEL}"
CHILD_LABELS = {MANAGED_BY_LABEL: MANAGED_BY, JOB_LABEL: kopf.PRESENT}


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's own settings, all in one place (called from the startup handler)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # kopf's own log lines; our transitions post their events
    settings.scanning.disabled = True  # no CRD/namespace watching: fewer permissions, static resources
    # Children are watched with a server-side label selector: the operator never lists foreign pods.
    settings.watching.label_selectors["batch", "jobs"] = CHILD_SELECTOR
    settings.watching.label_selectors["pods"] = CHILD_SELECTOR
    # kopf asks the API server to end each watch after 5 minutes and starts the next one; the client waits
    # 30 s longer, so a connection that died silently is noticed within 330 s and a healthy one never cut.
    # kopf's own requests (patches, events) give up after a minute, connecting after 30 s.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 4  # threads for sync handlers: only `track` and `credentials`, both quick


def wants_cleanup(spec: Any, **_: Any) -> bool:
    return (spec or {}).get("cleanupPolicy") == "DeleteOutputs"


def register(registry: kopf.OperatorRegistry) -> kopf.OperatorRegistry:
    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_kopf(settings)
        memo.ctx.poller.start()

    @kopf.on.login(registry=registry)
    def credentials(**_: Any) -> kopf.ConnectionInfo | None:
        return login()

    @kopf.on.cleanup(registry=registry)
    async def shutdown(memo: kopf.Memo, **_: Any) -> None:
        await memo.ctx.close()

    @kopf.on.create(**LTJ, registry=registry)
    @kopf.on.resume(**LTJ, registry=registry)
    @kopf.on.update(**LTJ, field="spec", registry=registry)
    async def changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        await rec.reconcile(memo.ctx, JobKey(namespace, name))

    @kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS, registry=registry)
    async def child_job(namespace: str, labels: Any, memo: kopf.Memo, **_: Any) -> None:
        # async (kopf runs sync handlers in threads), queued and not awaited: rec.request
        rec.request(memo.ctx, JobKey(namespace, labels[JOB_LABEL]))

    @kopf.on.event("", "v1", "pods", labels=CHILD_LABELS, registry=registry)
    async def trainer_pod(namespace: str, labels: Any, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        rec.request(memo.ctx, JobKey(namespace, labels[JOB_LABEL]), seen_pod=copy.deepcopy(dict(body)))

    @kopf.on.event(**LTJ, registry=registry)
    def track(event: Any, body: kopf.Body, uid: str, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
        key = JobKey(namespace, name)
        if event.get("type") == "DELETED":
            memo.ctx.forget(key, uid)
        else:
            memo.ctx.track(key, dict(body))

    # kopf gives up on the clean-up after 15 minutes: longer than the cleanup Job may run
    # (builders.CLEANUP_DEADLINE_SECONDS) plus the time to stop the trainer and start the Job's pod.
    @kopf.on.delete(**LTJ, when=wants_cleanup, timeout=900, registry=registry)
    async def delete_outputs(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await rec.delete_outputs(memo.ctx, dict(body))

    return registry
