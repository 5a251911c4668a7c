"""The operator's own metrics (docs/architecture.md, Metrics) and its HTTP endpoints: /metrics, /healthz, /readyz.

Metrics live in their own CollectorRegistry created at start (nothing is registered at import time):
  lora_operator_jobs{phase}                    LoRATrainingJobs by phase (every phase, zeros included)
  lora_operator_reconcile_errors_total         reconciles that raised
  lora_operator_reconcile_seconds              reconcile duration (histogram)
  lora_operator_job_duration_seconds{phase}    creation to Succeeded/Failed, seen at the transition
  lora_operator_leader                         1 on the replica that holds the lease
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .status import Phase

log = logging.getLogger("lora_operator.http")


class _PhaseCollector:
    def __init__(self, phases: dict[str, str]):
        self.phases = phases

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("lora_operator_jobs", "LoRATrainingJobs by phase", labels=["phase"])
        counts = {p.value: 0 for p in Phase}
        for phase in list(self.phases.values()):
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], count)
        yield family


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.phases: dict[str, str] = {}  # job uid -> phase (one entry per object, see names.JobKey)
        self.registry.register(_PhaseCollector(self.phases))
        self.reconcile_errors = Counter(
            "lora_operator_reconcile_errors", "Reconciles that raised", registry=self.registry
        )
        # a reconcile is a few API round trips (milliseconds); seconds mean a slow API server
        self.reconcile_seconds = Histogram(
            "lora_operator_reconcile_seconds",
            "Duration of one reconcile of a job",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        # training runs last from seconds (tiny tests) to a day
        self.job_duration = Histogram(
            "lora_operator_job_duration_seconds",
            "Creation to Succeeded/Failed of LoRATrainingJobs",
            ["phase"],
            registry=self.registry,
            buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400),
        )
        self.leader = Gauge(
            "lora_operator_leader", "1 on the replica that holds the leader lease", registry=self.registry
        )

    def observe_phase(self, uid: str, phase: str | None) -> None:
        self.phases[uid] = Phase.parse(phase).value

    def forget(self, uid: str) -> None:
        self.phases.pop(uid, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpServer:
    """/metrics, /healthz (the event loop answers) and /readyz (`ready()` says yes)."""

    def __init__(self, metrics: OperatorMetrics, host: str, port: int, ready: Callable[[], bool]):
        self.metrics, self.host, self.port, self.ready = metrics, host, port, ready
        self.runner: web.AppRunner | None = None

    async def start(self) -> HttpServer:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", self.host, self.port)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.Response(text="ok")
        return web.Response(status=503, text="not ready")
