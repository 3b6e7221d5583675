"""The gRPC health service, with a bound on its ``Watch`` streams (health needs no token)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from service.metrics import Metrics


class BoundedHealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """grpc's health service with at most ``max_watchers`` ``Watch`` streams open at once.

    Health needs no token (probes carry none), and each ``Watch`` holds a task and its buffers
    until the client leaves, so without a bound anyone who reaches the port could hold memory
    without limit. ``Check`` (what probes call) stays unbounded: it costs one reply. A ``Watch``
    beyond the bound is refused with RESOURCE_EXHAUSTED and counted; a finished one frees its
    place.

    ``Watch`` is grpc's, but for one fix: grpc's drops a service's condition when any of its
    watchers leaves, so the others stopped hearing of changes; here the last one leaving drops it.
    """

    def __init__(self, max_watchers: int, metrics: Metrics) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0
        self._metrics = metrics
        self._per_service: collections.Counter[str] = collections.Counter()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        if self.watchers >= self.max_watchers:
            self._metrics.health_watch_refused.inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.watchers} health Watch streams are open, the most the server allows "
                "(max_health_watchers); use Check, or close a Watch",
            )
        service = request.service
        self._admit(service)
        condition: asyncio.Condition = self._server_watchers[service]
        last_sent = None
        try:
            while True:
                async with condition:
                    while (status := self._status(service)) == last_sent:
                        await condition.wait()
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last_sent = status
        finally:
            self._release(service)

    def _status(self, service: str) -> Any:
        return self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    def _admit(self, service: str) -> None:
        self.watchers += 1
        self._per_service[service] += 1
        self._metrics.health_watchers.set(self.watchers)

    def _release(self, service: str) -> None:
        self.watchers -= 1
        self._per_service[service] -= 1
        if not self._per_service[service]:
            del self._per_service[service]
            self._server_watchers.pop(service, None)
        self._metrics.health_watchers.set(self.watchers)
