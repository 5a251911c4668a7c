"""Reconciling one LoRATrainingJob: children exist, the Job's suspend matches, status is current.

`reconcile()` is the single entry point the kopf handlers and the poller call (on create/resume/update,
on the poller's cadence, and when a child Job or pod changes). It reads everything fresh, builds children
with the pure builders, computes the status with the pure state machine and patches it only when something
changed. Calls for one job are serialized by a per-job lock, so a refresh and a child event never interleave.
Jobs are addressed by JobKey everywhere (names.py says why, and where the uid is used instead).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from . import builders
from .events import EVENT_MESSAGE_LIMIT, Transition, build_event, transitions
from .kube import ApiClient, ApiError, core_path, group_path
from .names import COMPONENT_LABEL, JOB_LABEL, OWNER_UID_ANNOTATION, JobKey, ltj_path
from .observability import OperatorMetrics
from .outputs import OutputClaim, output_conflict
from .pods import exit_summary_problems, pod_finished, pod_order, terminated_state, trainer_running
from .poller import Poller
from .progress import ProgressSample, scrape, with_rate
from .reasons import Reason, shorten
from .settings import Settings
from .status import Observed, Phase, compute_status, is_terminal, output_uri, parse_time, plan_group, status_patch

log = logging.getLogger("lora_operator")

# Reconciles in flight at once, whoever asked (kopf's handlers, the poller): a thousand new jobs queue here
# instead of filling the API client's connection pool (kube.MAX_CONNECTIONS) and each other's timeouts.
MAX_CONCURRENT_RECONCILES = 20
# How long kopf waits before calling the clean-up handler again while it waits for the trainer to stop or
# the cleanup Job to finish (both take seconds).
CLEANUP_RETRY_SECONDS = 2


@dataclass
class JobCaches:
    """What the operator remembers about each job between reconciles, keyed by JobKey."""

    locks: dict[JobKey, asyncio.Lock] = field(default_factory=dict)  # one reconcile of a job at a time
    # a reconcile asked for and not started yet: later requests join it (it reads everything when it starts)
    queued: dict[JobKey, asyncio.Future] = field(default_factory=dict)
    # trainer pods from watch events since the last reconcile started, by uid (the newest state of each)
    seen_pods: dict[JobKey, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # the last scrape of the job's trainer: pod name, sample, time.monotonic() (samples/s needs two)
    samples: dict[JobKey, tuple[str, ProgressSample, float]] = field(default_factory=dict)
    # Warning Events already posted about what the job's pods sent back (Context.warn_once)
    warned: dict[JobKey, set[str]] = field(default_factory=dict)
    # every job's spec.output.uri as last watched: one live job per output prefix (outputs.py)
    outputs: dict[JobKey, OutputClaim] = field(default_factory=dict)

    def lock(self, key: JobKey) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def busy(self, key: JobKey) -> bool:
        lock = self.locks.get(key)
        return lock is not None and lock.locked()

    def forget(self, key: JobKey) -> None:
        self.locks.pop(key, None)
        self.seen_pods.pop(key, None)
        self.samples.pop(key, None)
        self.warned.pop(key, None)
        self.outputs.pop(key, None)


@dataclass
class Context:
    """What the handlers share; created once the operator runs (never at import). Its parts:

    settings          the operator's settings (settings.py)
    api, scraper      the clients: the Kubernetes API (kube.py) and an aiohttp session for the trainers'
                      metrics endpoints (no credentials; main.py opens it once leading)
    metrics           the operator's own metrics (observability.py)
    jobs              the per-job caches (JobCaches)
    poller            the task that re-reconciles non-terminal jobs (poller.py)
    """

    settings: Settings
    api: ApiClient
    metrics: OperatorMetrics
    scraper: Any = None
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    jobs: JobCaches = field(default_factory=JobCaches)
    poller: Poller = field(init=False)
    # set when the operator stops leading (or shuts down): no reconcile starts after it
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_RECONCILES))

    def __post_init__(self) -> None:
        self.poller = Poller(self.settings, refresh=functools.partial(reconcile, self), busy=self.jobs.busy)

    async def post_event(self, job: dict[str, Any], event: Transition) -> None:
        """Record an Event; best effort (a lost Event must never fail a reconcile)."""
        body = build_event(job, event, self.now(), self.settings.identity or "lora-operator")
        try:
            await self.api.create(core_path("events", job["metadata"]["namespace"]), body)
        except (TimeoutError, ApiError, OSError) as err:
            log.warning("event %s for %s not recorded: %s", event.reason, JobKey.of(job), err)

    async def warn_once(self, job: dict[str, Any], about: str, reason: str, text: str) -> None:
        """A Warning Event about something a pod sent back, once per job and `about` (what, which pod)."""
        seen = self.jobs.warned.setdefault(JobKey.of(job), set())
        if about not in seen:
            seen.add(about)
            await self.post_event(job, Transition("Warning", reason, shorten(text, EVENT_MESSAGE_LIMIT)))

    def track(self, key: JobKey, job: dict[str, Any]) -> None:
        """Called on every watch event of a job: which jobs the poller refreshes, whose output is where."""
        meta, status = job["metadata"], job.get("status") or {}
        self.metrics.observe_phase(meta["uid"], status.get("phase"))
        self.jobs.outputs[key] = output_claim(job)
        if meta.get("deletionTimestamp") or is_terminal(status):
            self.poller.drop(key)
        else:
            self.poller.follow(key, Phase.parse(status.get("phase")).value)

    def forget(self, key: JobKey, uid: str | None) -> None:
        """The job is gone: drop everything kept about it."""
        self.poller.forget(key)
        self.jobs.forget(key)
        if uid:
            self.metrics.forget(uid)

    async def close(self) -> None:
        await self.poller.close()
        queued = list(self.jobs.queued.values())
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        if self.scraper is not None:
            await self.scraper.close()


class ChildConflict(Exception):
    """A child's name is taken by an object another controller owns."""


class ChildRejected(Exception):
    """The API server refused a child as invalid (400, 422): retrying the same object cannot help."""


class ChildForbidden(Exception):
    """The API server forbade a child (403: a ResourceQuota, an admission policy): retried, and said so."""


async def reconcile(ctx: Context, key: JobKey, seen_pod: dict[str, Any] | None = None) -> None:
    """Bring the job's children and status in line; returns when a reconcile that started after this call
    has ended (and raises what it raised).

    Requests for a job whose reconcile is queued but not started join it: a burst of a thousand jobs' pod,
    Job and status events costs one reconcile per job and burst, not one per event. `seen_pod`: a trainer
    pod from a watch event, kept even when it is already deleted (a suspended or evicted pod's final state
    carries the trainer's exit summary and last checkpoint)."""
    queued = request(ctx, key, seen_pod)
    if queued is not None:
        await asyncio.shield(queued)  # a caller that is cancelled leaves the others their reconcile


def request(ctx: Context, key: JobKey, seen_pod: dict[str, Any] | None = None) -> asyncio.Future | None:
    """Queue a reconcile of the job (or join the queued one) without waiting for it: what a watch event of
    a child needs. Its handler then returns at once, and kopf lets go of the event's body instead of a
    thousand handlers holding theirs while their reconciles wait for a slot."""
    if ctx.stopped.is_set():
        return None
    jobs = ctx.jobs
    if seen_pod is not None:
        jobs.seen_pods.setdefault(key, {})[seen_pod["metadata"]["uid"]] = seen_pod
    queued = jobs.queued.get(key)
    if queued is None:
        queued = jobs.queued[key] = asyncio.ensure_future(_queued_reconcile(ctx, key))
        queued.add_done_callback(functools.partial(_logged, key))
    return queued


def _logged(key: JobKey, done: asyncio.Future) -> None:
    """A failed reconcile nobody waited for (a child's watch event) is logged here; the poller retries it."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("%s: reconcile failed: %s", key, done.exception())


async def _queued_reconcile(ctx: Context, key: JobKey) -> None:
    jobs = ctx.jobs
    started = time.perf_counter()
    try:
        async with jobs.lock(key), ctx.slots:
            jobs.queued.pop(key, None)  # from here on, a new request queues a new reconcile
            seen = list(jobs.seen_pods.pop(key, {}).values())
            if ctx.stopped.is_set():  # the lease was lost while this one waited
                return
            await _reconcile(ctx, key, seen)
    except Exception:
        ctx.metrics.reconcile_errors.inc()
        raise
    finally:
        if jobs.queued.get(key) is asyncio.current_task():  # ended before it started (cancelled)
            jobs.queued.pop(key, None)
        ctx.metrics.reconcile_seconds.observe(time.perf_counter() - started)


async def _reconcile(ctx: Context, key: JobKey, seen_pods: list[dict[str, Any]]) -> None:
    api, settings = ctx.api, ctx.settings
    namespace, name = key.namespace, key.name
    try:
        job = await api.get(ltj_path(namespace, name))
    except ApiError as err:
        if err.status == 404:
            ctx.poller.drop(key)
            return
        raise
    meta = job["metadata"]
    status = job.get("status") or {}
    generation = int(meta.get("generation") or 0)
    ctx.metrics.observe_phase(meta["uid"], status.get("phase"))
    if meta.get("deletionTimestamp"):
        ctx.poller.drop(key)
        return
    if is_terminal(status):  # a finished job is never brought back, even when its children are gone
        if status.get("observedGeneration") != generation:
            await _patch_status(ctx, job, {"observedGeneration": generation})
        return
    children = builders.children_of(job)
    if status.get("children") != children.as_status():  # names go into status before the objects exist
        status = (
            await _patch_status(
                ctx,
                job,
                {
                    "children": children.as_status(),
                    "phase": status.get("phase") or Phase.PENDING.value,
                    "observedGeneration": generation,
                },
            )
            or status
        )
        job["status"] = status
    spec = job.get("spec") or {}
    problem = builders.config_problem(spec, settings)
    if problem:
        await _publish(ctx, job, Observed(generation, spec, status, config_error=problem))
        return
    claim = output_claim(job)
    ctx.jobs.outputs[key] = claim
    if not claim.started:  # once its Job exists, a job keeps its prefix
        conflict = output_conflict(claim, (c for k, c in ctx.jobs.outputs.items() if k != key))
        if conflict:
            await _publish(ctx, job, Observed(generation, spec, status, refused=(Reason.OUTPUT_IN_USE, conflict)))
            return
    try:
        await _ensure_config_map(ctx, job, allow_overwrite=not status.get("progress"))
        if children.service:  # before the Job: its workers look each other up through it from the start
            await _ensure(
                ctx, builders.build_worker_service(job, settings), core_path("services", namespace), meta["uid"]
            )
        training = await _ensure(
            ctx, builders.build_training_job(job, settings), group_path("batch/v1", "jobs", namespace), meta["uid"]
        )
    except (ChildConflict, ChildForbidden) as err:
        reason = Reason.CHILD_CONFLICT if isinstance(err, ChildConflict) else Reason.CHILD_FORBIDDEN
        await _publish(ctx, job, Observed(generation, spec, status), blocked=(reason, str(err)))
        return
    except ChildRejected as err:
        await _publish(ctx, job, Observed(generation, spec, status, refused=(Reason.CHILD_REJECTED, str(err))))
        return
    pods = await _trainer_pods(ctx, training, seen_pods)
    plan = plan_group(Observed(generation, spec, status, training, pods), ctx.now(), settings)
    if plan.scheduling is not None:
        status = {**status, "scheduling": plan.scheduling}
    if plan.recheck is not None:
        ctx.poller.wake(key, plan.recheck)
    if bool((training.get("spec") or {}).get("suspend")) != plan.suspend:
        training = await api.patch(
            group_path("batch/v1", "jobs", namespace, training["metadata"]["name"]), {"spec": {"suspend": plan.suspend}}
        )
    await _warn_about_exit_summaries(ctx, job, pods)
    sample = await _scrape(ctx, job, pods)
    await _publish(ctx, job, Observed(generation, spec, status, training, pods, sample))


def output_claim(job: dict[str, Any]) -> OutputClaim:
    meta, status = job["metadata"], job.get("status") or {}
    return OutputClaim(
        key=JobKey.of(job),
        uid=meta["uid"],
        uri=str(((job.get("spec") or {}).get("output") or {}).get("uri") or ""),
        created=meta.get("creationTimestamp") or "",
        phase=status.get("phase") or "",
        live=not meta.get("deletionTimestamp") and not is_terminal(status),
        started=bool(status.get("startTime")),
    )


async def _trainer_pods(
    ctx: Context, training: dict[str, Any], seen_pods: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The training Job's pods, plus watched pods that are already gone (their final state counts)."""
    selector = f"batch.kubernetes.io/controller-uid={training['metadata']['uid']}"
    namespace = training["metadata"]["namespace"]
    pods = (await ctx.api.get(core_path("pods", namespace), labelSelector=selector)).get("items") or []
    listed = {p["metadata"]["uid"] for p in pods}
    return pods + [p for p in seen_pods if _belongs(p, training) and p["metadata"]["uid"] not in listed]


def _belongs(pod: dict[str, Any], training: dict[str, Any]) -> bool:
    labels = pod.get("metadata", {}).get("labels") or {}
    return labels.get("batch.kubernetes.io/controller-uid") == training["metadata"]["uid"]


async def _publish(ctx: Context, job: dict[str, Any], obs: Observed, blocked: tuple[str, str] | None = None) -> None:
    """`blocked`: (reason, message) of a child that cannot be created yet; the job stays Pending, saying why."""
    old = job.get("status") or {}
    new = compute_status(obs, ctx.now())
    if blocked:
        reason, message = blocked
        new.update(phase=Phase.PENDING.value, reason=reason, message=message)
        for condition in new["conditions"]:
            condition.update(reason=reason, message=message)
    if new == old:
        return
    await _patch_status(ctx, job, status_patch(old, new))
    for event in transitions(old, new):
        await ctx.post_event(job, event)
    ctx.metrics.observe_phase(job["metadata"]["uid"], new.get("phase"))
    key = JobKey.of(job)
    if not is_terminal(new):
        ctx.poller.follow(key, new["phase"])  # the poller's cadence follows the phase
    else:
        ctx.poller.drop(key)
        created = parse_time(job["metadata"].get("creationTimestamp"))
        done = parse_time(new.get("completionTime"))
        if created and done:
            ctx.metrics.job_duration.labels(new["phase"]).observe(max((done - created).total_seconds(), 0))
        ctx.jobs.samples.pop(key, None)
    log.info(
        "%s: %s (%s) attempts=%s step=%s",
        key,
        new.get("phase"),
        new.get("reason"),
        new.get("attempts"),
        (new.get("progress") or {}).get("step"),
    )


async def _patch_status(ctx: Context, job: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any] | None:
    meta = job["metadata"]
    try:
        answer = await ctx.api.patch(ltj_path(meta["namespace"], meta["name"], status=True), {"status": patch})
    except ApiError as err:
        if err.status == 404:
            return None
        raise
    return answer.get("status") or {}


async def _ensure_config_map(ctx: Context, job: dict[str, Any], allow_overwrite: bool) -> dict[str, Any]:
    body = builders.build_config_map(job, ctx.settings, allow_overwrite=allow_overwrite)
    meta = job["metadata"]
    current = await _ensure(ctx, body, core_path("configmaps", meta["namespace"]), meta["uid"])
    if current.get("data") != body["data"]:  # e.g. `overwrite` ends once the first trainer reported
        current = await ctx.api.patch(
            core_path("configmaps", meta["namespace"], body["metadata"]["name"]), {"data": body["data"]}
        )
    return current


async def _ensure(ctx: Context, body: dict[str, Any], collection: str, owner_uid: str) -> dict[str, Any]:
    """Read a child, creating it when missing; a name taken by an uncontrolled object is adopted, one
    controlled by someone else is refused. (GET first: in the steady state the child exists.)"""
    name = body["metadata"]["name"]
    try:
        existing = await ctx.api.get(f"{collection}/{name}")
    except ApiError as err:
        if err.status != 404:
            raise
        try:
            created = await ctx.api.create(collection, body)
            log.info("created %s %s/%s", body["kind"], body["metadata"].get("namespace"), name)
            return created
        except ApiError as err2:
            refusal = f"the API server refused to create {body['kind']} {name}: {err2.message or err2.reason}"
            if err2.status in (400, 422):
                raise ChildRejected(refusal) from None
            if err2.status == 403:
                raise ChildForbidden(refusal + "; retrying") from None
            if err2.status != 409:
                raise
        existing = await ctx.api.get(f"{collection}/{name}")  # created meanwhile: adopt below
    refs = existing["metadata"].get("ownerReferences") or []
    controller = next((r for r in refs if r.get("controller")), None)
    if controller is None:
        ours = body["metadata"]["ownerReferences"]
        return await ctx.api.patch(
            f"{collection}/{name}",
            {"metadata": {"ownerReferences": refs + ours, "resourceVersion": existing["metadata"]["resourceVersion"]}},
        )
    if controller.get("uid") != owner_uid:
        raise ChildConflict(
            f"{body['kind']} {name} already exists and belongs to {controller.get('kind')} "
            f"{controller.get('name')} (uid {controller.get('uid')}); waiting for it to go away"
        )
    return existing


async def _warn_about_exit_summaries(ctx: Context, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
    """A Warning Event naming what a pod's termination message held against the contract (dropped from status)."""
    output = output_uri(job.get("spec") or {})
    for pod in pods:
        problems = exit_summary_problems(pod, output)
        if problems:
            name = pod["metadata"]["name"]
            fields = ", ".join(dict.fromkeys(p.split(":", 1)[0] for p in problems))  # the names first: Events are short
            text = f"pod {name}: dropped from its termination message: {fields}. " + "; ".join(problems)
            await ctx.warn_once(job, f"termination/{name}", Reason.TERMINATION_MESSAGE_INVALID, text)


async def _scrape(ctx: Context, job: dict[str, Any], pods: list[dict[str, Any]]) -> ProgressSample | None:
    """Progress read at $POD_IP:<metrics port>/metrics of the pods whose trainer runs, all at once: only
    the main worker (global rank 0) serves metrics, on whichever pod it landed; the others refuse the
    connection at once. The newest pod that answers wins (a single-node job has one). A page refused as
    hostile (progress.scrape) is named in a Warning Event."""
    key = JobKey.of(job)
    live = [
        p
        for p in sorted(pods, key=pod_order, reverse=True)
        if not pod_finished(p) and trainer_running(p) and (p.get("status") or {}).get("podIP")
    ]
    if not live or ctx.scraper is None:
        return None
    port, timeout = ctx.settings.trainer_metrics_port, ctx.settings.scrape_timeout
    scrapes = await asyncio.gather(
        *(scrape(ctx.scraper, f"http://{p['status']['podIP']}:{port}/metrics", timeout) for p in live)
    )
    for pod, result in zip(live, scrapes, strict=True):
        if result.refused:
            name = pod["metadata"]["name"]
            await ctx.warn_once(job, f"metrics/{name}", Reason.METRICS_REFUSED, f"pod {name}: {result.refused}")
    answered = next(((p, r.sample) for p, r in zip(live, scrapes, strict=True) if r.sample is not None), None)
    if answered is None:
        return None
    pod, sample = answered
    now = time.monotonic()
    previous = ctx.jobs.samples.get(key)
    if previous and previous[0] == pod["metadata"]["name"]:
        sample = with_rate(sample, previous[1], now - previous[2])
    ctx.jobs.samples[key] = (pod["metadata"]["name"], sample, now)
    return sample


async def delete_outputs(ctx: Context, job: dict[str, Any]) -> None:
    """cleanupPolicy DeleteOutputs, run while the job is being deleted (it holds a finalizer):
    stop the trainer, then run a cleanup Job with the job's S3 credentials; done when it succeeds."""
    api, meta = ctx.api, job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    children = builders.children_of(job)
    jobs = group_path("batch/v1", "jobs", namespace)
    try:
        await api.delete(f"{jobs}/{children.job}", propagation="Foreground")
    except ApiError as err:
        if err.status != 404:
            raise
    trainers = await api.get(
        core_path("pods", namespace), labelSelector=f"{JOB_LABEL}={name},{COMPONENT_LABEL}=trainer"
    )
    if trainers.get("items"):
        raise kopf.TemporaryError(
            "waiting for the trainer to stop before deleting its outputs", delay=CLEANUP_RETRY_SECONDS
        )
    try:
        cleanup = await api.get(f"{jobs}/{children.cleanup_job}")
    except ApiError as err:
        if err.status != 404:
            raise
        await api.create(jobs, builders.build_cleanup_job(job, ctx.settings))
        text = f"deleting {job['spec']['output']['uri']} (cleanupPolicy DeleteOutputs)"
        await ctx.post_event(job, Transition("Normal", "DeletingOutputs", text))
        raise kopf.TemporaryError("deleting the outputs", delay=CLEANUP_RETRY_SECONDS) from None
    owner = (cleanup["metadata"].get("annotations") or {}).get(OWNER_UID_ANNOTATION)
    if owner != meta["uid"]:  # left over from an earlier job of the same name
        await api.delete(f"{jobs}/{children.cleanup_job}", propagation="Background")
        raise kopf.TemporaryError("removing an old cleanup Job", delay=CLEANUP_RETRY_SECONDS)
    conditions = {
        c["type"]: c for c in (cleanup.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    }
    if "Complete" in conditions:
        outcome = await _cleanup_outcome(ctx, cleanup)
        kept = "kept:" in outcome
        await ctx.post_event(
            job, Transition("Warning" if kept else "Normal", "OutputsKept" if kept else "OutputsDeleted", outcome)
        )
        log.info("%s: %s", JobKey.of(job), outcome)
        return
    if "Failed" in conditions:
        message = conditions["Failed"].get("message") or conditions["Failed"].get("reason")
        await ctx.post_event(job, Transition("Warning", "DeleteOutputsFailed", f"the cleanup Job failed: {message}"))
        raise kopf.PermanentError(f"deleting the outputs failed: {message}")
    raise kopf.TemporaryError("deleting the outputs", delay=CLEANUP_RETRY_SECONDS)


async def _cleanup_outcome(ctx: Context, cleanup: dict[str, Any]) -> str:
    """What the cleanup pod said it did (lora_trainer/cleanup.py's termination message)."""
    selector = f"batch.kubernetes.io/controller-uid={cleanup['metadata']['uid']}"
    pods = await ctx.api.get(core_path("pods", cleanup["metadata"]["namespace"]), labelSelector=selector)
    for pod in sorted(pods.get("items") or [], key=pod_order, reverse=True):
        message = (terminated_state(pod) or {}).get("message")
        if message:
            return shorten(message, EVENT_MESSAGE_LIMIT)
    return "the cleanup Job completed"
