"""Leader election on a coordination.k8s.io/v1 Lease, so two operator replicas never both act on a job.

The standby replicas wait; the leader renews every lease_duration/3 and stops its operator (and exits,
to be restarted as a standby) if it cannot renew within 2/3 of the lease duration. As in client-go, expiry
is judged by how long the lease record has stayed unchanged on *this* replica's clock, never by
comparing clocks across machines. A leader that shuts down cleanly releases the lease at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .kube import ApiClient, ApiError, group_path

log = logging.getLogger("lora_operator.leader")

# A leader that could not renew for 2/3 of the lease duration gives up (client-go's RenewDeadline: 10 s of a
# 15 s lease), so it stops acting before a standby, which waits a whole lease duration after the record
# last changed, takes over.
RENEW_DEADLINE = 2 / 3


def micro_time(moment: datetime | None = None) -> str:
    moment = moment or datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(
    name: str, namespace: str, identity: str, duration: float, transitions: int, acquire_time: str, renew_time: str
) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": max(int(round(duration)), 1),
            "acquireTime": acquire_time,
            "renewTime": renew_time,
            "leaseTransitions": transitions,
        },
    }


class LeaderElector:
    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        name: str,
        identity: str,
        duration: float,
        renew_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.api = api
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration, self.renew_interval = duration, renew_interval
        self.clock = clock
        self.path = group_path("coordination.k8s.io/v1", "leases", namespace, name)
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.is_leader = False

    def _expired(self, spec: dict[str, Any]) -> bool:
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        return self.clock() - self._observed_at > duration

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the lease; True while this replica holds it."""
        now = micro_time()
        try:
            lease = await self.api.get(self.path)
        except ApiError as err:
            if err.status != 404:
                raise
            try:
                await self.api.create(
                    group_path("coordination.k8s.io/v1", "leases", self.namespace),
                    lease_body(self.name, self.namespace, self.identity, self.duration, 0, now, now),
                )
            except ApiError as err2:
                if err2.status == 409:
                    return False
                raise
            return self._became(True)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        mine = holder == self.identity
        if not mine and holder and not self._expired(spec):
            return self._became(False)
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        body = lease_body(
            self.name,
            self.namespace,
            self.identity,
            self.duration,
            transitions,
            spec.get("acquireTime") if mine and spec.get("acquireTime") else now,
            now,
        )
        body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
        try:
            await self.api.replace(self.path, body)
        except ApiError as err:
            if err.status == 409:  # someone else wrote it first
                return self._became(False)
            raise
        return self._became(True)

    def _became(self, leader: bool) -> bool:
        if leader != self.is_leader:
            log.info(
                "%s %s the leader lease %s/%s",
                self.identity,
                "acquired" if leader else "does not hold",
                self.namespace,
                self.name,
            )
        self.is_leader = leader
        return leader

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica leads (True) or `stop` is set (False)."""
        logged = False
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    return True
            except (TimeoutError, ApiError, OSError) as err:
                log.warning("leader election: %s", err)
            if not logged:
                log.info("%s waits for the leader lease %s/%s", self.identity, self.namespace, self.name)
                logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.renew_interval)
        return False

    async def hold(self, stop: asyncio.Event, lost: asyncio.Event) -> None:
        """Renew until `stop`; set `lost` when the lease could not be renewed in time (or was taken)."""
        last_ok = self.clock()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.renew_interval)
                return
            except TimeoutError:
                pass
            try:
                if await self.try_acquire():
                    last_ok = self.clock()
                    continue
                log.error("leader lease %s/%s was taken over", self.namespace, self.name)
            except (TimeoutError, ApiError, OSError) as err:
                log.warning("renewing the leader lease failed: %s", err)
                if self.clock() - last_ok < self.duration * RENEW_DEADLINE:
                    continue
                log.error("could not renew the leader lease for %.0f s", self.clock() - last_ok)
            self.is_leader = False
            lost.set()
            return

    async def release(self) -> None:
        """Give the lease up (a successor need not wait for it to expire)."""
        if not self.is_leader:
            return
        try:
            lease = await self.api.get(self.path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            # no holder and a 1 s duration: a standby takes it at its next attempt
            body = lease_body(
                self.name,
                self.namespace,
                "",
                1,
                int(spec.get("leaseTransitions") or 0),
                spec.get("acquireTime") or micro_time(),
                micro_time(),
            )
            body["spec"].pop("holderIdentity")
            body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
            await self.api.replace(self.path, body)
            log.info("%s released the leader lease", self.identity)
        except (TimeoutError, ApiError, OSError) as err:
            log.warning("releasing the leader lease failed: %s", err)
        finally:
            self.is_leader = False
