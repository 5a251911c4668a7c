"""The poller: one task that re-reconciles every non-terminal job on a cadence that follows its phase."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .names import JobKey
from .settings import Settings
from .status import Phase

log = logging.getLogger("lora_operator")

# At most this many refreshes run at once: with hundreds of running jobs, a round is spread out instead of
# opening hundreds of API requests and scrapes together (the API client pools 50 connections).
MAX_CONCURRENT_REFRESHES = 16
# The loop wakes every second (or each poll interval, when shorter) to see which jobs are due.
TICK_SECONDS = 1.0
# A job is due once 95% of its interval has passed: the ticks drift by a few milliseconds, and a job due
# after 5 s but looked at after 4.99 s would otherwise wait a whole extra tick.
DUE_FRACTION = 0.95
# Jobs that are not running change through their pods' and Jobs' events; the poller only re-syncs them
# every RESYNC_POLLS poll intervals (at least MIN_RESYNC_SECONDS), a safety net for a missed watch event.
RESYNC_POLLS = 6
MIN_RESYNC_SECONDS = 30.0
# ... and however many jobs wait (a thousand jobs queued for GPUs), the safety net costs at most this many
# reconciles per second: their interval grows with their number.
MAX_RESYNCS_PER_SECOND = 2.0


class Poller:
    """Refresh running jobs each poll_interval (progress comes from a scrape, not from an event).

    Other non-terminal jobs change through events (their pods' and Jobs'), so they are only
    re-synced every resync_interval. One task for all jobs rather than a kopf timer per job: kopf
    puts a finalizer on every object with a timer, so `kubectl delete` would hang while the
    operator is down.
    """

    def __init__(
        self, settings: Settings, refresh: Callable[[JobKey], Awaitable[None]], busy: Callable[[JobKey], bool]
    ):
        self.settings = settings
        self.refresh = refresh  # one reconcile of a job
        self.busy = busy  # whether a reconcile of the job is under way (the poller then skips it)
        self.active: dict[JobKey, str] = {}  # non-terminal jobs -> phase
        self.last_poll: dict[JobKey, float] = {}  # when a refresh last started (time.monotonic)
        self.wake_at: dict[JobKey, float] = {}  # an earlier refresh a job asked for (time.monotonic)
        self.polling: dict[JobKey, asyncio.Task] = {}  # refreshes under way
        self.task: asyncio.Task | None = None

    def follow(self, key: JobKey, phase: str) -> None:
        """Refresh a non-terminal job at the cadence of its phase."""
        self.active[key] = phase

    def drop(self, key: JobKey) -> None:
        """Stop refreshing a job (terminal, being deleted or gone)."""
        self.active.pop(key, None)
        self.wake_at.pop(key, None)

    def forget(self, key: JobKey) -> None:
        self.active.pop(key, None)
        self.last_poll.pop(key, None)
        self.wake_at.pop(key, None)

    def wake(self, key: JobKey, seconds: float) -> None:
        """Refresh a followed job once `seconds` from now, whatever its cadence (a deadline of its own: a
        multi-node group to release or to retry)."""
        self.wake_at[key] = time.monotonic() + max(seconds, 0.0)

    @property
    def resync_interval(self) -> float:
        waiting = sum(1 for phase in self.active.values() if not _active(phase))
        return max(MIN_RESYNC_SECONDS, RESYNC_POLLS * self.settings.poll_interval, waiting / MAX_RESYNCS_PER_SECOND)

    def due(self, key: JobKey, phase: str, now: float) -> bool:
        if now >= self.wake_at.get(key, float("inf")):
            return True
        every = self.settings.poll_interval if _active(phase) else self.resync_interval
        return now - self.last_poll.get(key, 0.0) >= every * DUE_FRACTION

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the loop and wait for the refreshes under way."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, *self.polling.values(), return_exceptions=True)
            self.task = None

    async def _run(self) -> None:
        slots = asyncio.Semaphore(MAX_CONCURRENT_REFRESHES)

        async def refresh(key: JobKey) -> None:
            async with slots:
                try:
                    await self.refresh(key)
                except Exception as err:  # noqa: BLE001 - the loop survives; counted in reconcile, retried next round
                    log.warning("%s: refresh failed: %s", key, err)
                finally:
                    self.polling.pop(key, None)

        while True:
            await asyncio.sleep(min(self.settings.poll_interval, TICK_SECONDS))
            now = time.monotonic()
            for key, phase in sorted(self.active.items()):
                if key in self.polling or self.busy(key) or not self.due(key, phase, now):
                    continue
                self.last_poll[key] = now
                self.wake_at.pop(key, None)
                self.polling[key] = asyncio.create_task(refresh(key))


def _active(phase: str) -> bool:
    """A job whose progress only a scrape shows: refreshed every poll interval."""
    return phase in (Phase.LABELING.value, Phase.RUNNING.value)
