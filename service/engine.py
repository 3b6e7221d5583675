"""The core: models, their session stores and schedulers, behind a protocol-neutral API.

Both protocol adapters (``service.api.native`` and ``service.api.kserve``) call only this module.
It speaks numpy and domain errors, never protobuf or grpc.

Concurrency: every public method runs on the event loop thread (the adapters are asyncio
servicers), so sessions and stores are mutated from one thread only; model calls happen in each
scheduler's worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.durability import Durability, DurableModel, RestoreReport, make_durability
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelContractError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from service.metrics import LoopHistogramChild, Metrics
from service.repository import ModelSpec, check_contract, discover, read_spec, version_key
from service.runtime import CallCost, ModelRuntime
from service.scheduler import BatchScheduler
from service.session_store import EndReason, Session, SessionStore, session_not_found
from service.settings import Settings

logger = logging.getLogger(__name__)


SUMMED_IN_PYTHON_BELOW = 64  # values; under this a numpy reduction costs more than a Python sum


def all_finite(array: np.ndarray) -> bool:
    """True if no value is NaN or Inf.

    A finite sum proves every value finite (NaN and Inf propagate through a sum), so only a sum
    that is not finite needs the element-wise check; it may still be all finite values whose
    float32 sum overflowed. Small arrays are summed as Python floats (doubles: a sum of fewer than
    64 float32 values cannot overflow), which skips numpy's per-call overhead on the hot path.
    """
    if array.size < SUMMED_IN_PYTHON_BELOW:
        return math.isfinite(sum(array.ravel().tolist()))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here
        total = array.sum()
    return math.isfinite(total) or bool(np.isfinite(array).all())


@dataclass(frozen=True)
class Caller:
    """Who sends a request. ``owner`` is the authenticated identity (bearer token or client
    certificate; "" without authentication): sessions belong to it, and another owner is told a
    session does not exist. ``client`` is what per-client limits count: the owner, or the peer's
    address for anonymous callers."""

    owner: str = ""
    client: str = ""


ANONYMOUS = Caller()


@dataclass(slots=True)  # built once per chunk: a frozen dataclass's __init__ costs ~3x more
class StepResult:
    session_id: str
    output: np.ndarray  # [steps, outputs] float32
    steps: int  # steps the session has consumed, this chunk included
    ended: bool
    durable_steps: int = 0  # steps covered by the latest written snapshot


@dataclass(frozen=True)
class SessionView:
    session_id: str
    model: str
    version: str
    steps: int
    idle_s: float
    state: list[np.ndarray] | None = None
    durable_steps: int = 0
    last_output: np.ndarray | None = None  # the reply to the session's last chunk


@dataclass(frozen=True)
class SessionEnd:
    session_id: str
    reason: EndReason
    steps: int


class ModelHandle:
    """One loaded model version: spec, runtime, sessions and (once started) its scheduler."""

    def __init__(
        self,
        spec: ModelSpec,
        runtime: ModelRuntime,
        store: SessionStore,
        call_cost: CallCost | None = None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.store = store
        self.call_cost = call_cost  # measured at load; None when nothing runs inline
        self._scheduler: BatchScheduler | None = None
        # per API, labelled once (hot path)
        self.request_latency: dict[str, LoopHistogramChild] = {}

    @property
    def scheduler(self) -> BatchScheduler:
        if self._scheduler is None:
            raise Unavailable("the server is not started yet")
        return self._scheduler


class InferenceEngine:
    """Loads the repository, owns every session, and runs chunks through the batch schedulers."""

    def __init__(
        self, settings: Settings, metrics: Metrics, runtime_class: type[ModelRuntime] = ModelRuntime
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime_class = runtime_class
        self._models: dict[str, dict[str, ModelHandle]] = {}
        self._latest: dict[str, ModelHandle] = {}  # name -> highest version (hot path lookup)
        self._ttl_task: asyncio.Task[None] | None = None
        self.durability: Durability | None = None
        self.restore_report: RestoreReport | None = None
        self.ready = False
        self._closing = False

    # ----- loading -------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load and check every model of the repository; raises ModelContractError on any problem."""
        s = self.settings
        directories = discover(s.model_repository)
        if not directories:
            raise ModelContractError(
                f"model repository {s.model_repository} holds no */*/model.onnx"
            )
        for directory in directories:
            spec = read_spec(directory)
            runtime = self.runtime_class(
                spec.onnx_path,
                provider=s.execution_provider,
                fallback=s.provider_fallback,
                intra_op_threads=s.intra_op_threads,
                inter_op_threads=s.inter_op_threads,
                spin_wait=s.ort_spin_wait,
                single_thread_twin=s.inline_compute_below_s > 0,
            )
            check_contract(spec, runtime)
            call_cost = None
            if s.inline_compute_below_s > 0:
                call_cost = runtime.measure_cost(
                    input_size=spec.input_size,
                    layers=spec.num_layers,
                    hidden=spec.hidden_size,
                    max_rows=s.max_batch_size,
                )
            store = SessionStore(
                state_count=len(spec.state_inputs),
                layers=spec.num_layers,
                hidden=spec.hidden_size,
                max_sessions=s.max_sessions,
                evict_when_full=s.evict_when_full,
                on_end=self._make_end_hook(spec),
            )
            handle = ModelHandle(spec, runtime, store, call_cost)
            self._models.setdefault(spec.name, {})[spec.version] = handle
            self._latest[spec.name] = self._models[spec.name][self.versions(spec.name)[-1]]
            self.metrics.state_bytes.labels(spec.name, spec.version).set(store.state_bytes)
            self.metrics.active_sessions.labels(spec.name, spec.version).set(0)
            self.metrics.session_capacity.labels(spec.name, spec.version).set(s.max_sessions)
            logger.info(
                "loaded model %s (%s, %d layer(s), hidden %d) on %s",
                spec.label,
                spec.cell,
                spec.num_layers,
                spec.hidden_size,
                ",".join(runtime.providers),
            )
            if call_cost is not None:
                logger.info(
                    "model %s: a one-step call takes %.0f µs + %.2f µs per session",
                    spec.label,
                    call_cost.fixed_s * 1e6,
                    call_cost.per_row_s * 1e6,
                )
        self.durability = make_durability(self.settings, self.metrics, self._durable_models)
        if self.durability is not None:
            self.restore_report = self.durability.restore()
            for handle in self.handles():
                self.metrics.active_sessions.labels(handle.spec.name, handle.spec.version).set(
                    len(handle.store)
                )

    def _durable_models(self) -> list[DurableModel]:
        return [
            DurableModel(h.spec.name, h.spec.version, h.spec.sha256, h.store)
            for h in self.handles()
        ]

    def _make_end_hook(self, spec: ModelSpec) -> Callable[[Session, EndReason], None]:
        ended = self.metrics.sessions_ended
        active = self.metrics.active_sessions.labels(spec.name, spec.version)

        def on_end(session: Session, reason: EndReason) -> None:
            ended.labels(spec.name, spec.version, reason.value).inc()
            active.dec()
            if reason != EndReason.SHUTDOWN:
                self._changed()
            logger.debug(
                "session ended model=%s reason=%s steps=%d", spec.label, reason.value, session.steps
            )

        return on_end

    async def start(self) -> None:
        """Create the schedulers on the running loop and start the idle-session sweeper."""
        s = self.settings
        for handle in self.handles():
            handle._scheduler = BatchScheduler(
                spec=handle.spec,
                runtime=handle.runtime,
                store=handle.store,
                metrics=self.metrics,
                max_batch_size=s.max_batch_size,
                max_queue_delay_s=s.max_queue_delay_s,
                max_queue_chunks=s.max_queue_chunks,
                inline_compute_below_s=s.inline_compute_below_s,
                call_cost=handle.call_cost,
            )
        if s.session_ttl_s > 0:
            self._ttl_task = asyncio.create_task(self._sweep_idle_forever(), name="ttl-sweeper")
        if self.durability is not None:
            self.durability.start()
        self.ready = True

    # ----- models --------------------------------------------------------------------------
    def handles(self) -> list[ModelHandle]:
        return [h for versions in self._models.values() for h in versions.values()]

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def model(self, name: str, version: str = "") -> ModelHandle:
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} not found; loaded models: {known}")
        if not version:
            return self._latest[name]
        try:
            return versions[version]
        except KeyError:
            raise NotFound(
                f"model {name!r} has no version {version!r}; versions: {', '.join(self.versions(name))}"
            ) from None

    # ----- sessions ------------------------------------------------------------------------
    def open_session(
        self,
        name: str,
        version: str = "",
        session_id: str | None = None,
        initial_state: Sequence[np.ndarray] | None = None,
        *,
        api: str,
        restart: bool = False,
        caller: Caller = ANONYMOUS,
    ) -> SessionView:
        """Start a session. With ``restart`` (Triton's START on a live id) a live session is reset."""
        self._check_open()
        handle = self.model(name, version)
        store = handle.store
        existing = store.find(session_id, caller.owner) if session_id is not None else None
        if restart and existing is not None:
            if existing.busy:
                raise FailedPrecondition(
                    f"session {session_id!r} has a chunk in flight; cannot restart it"
                )
            logger.warning("sequence restarted by a new START on model %s", handle.spec.label)
            store.reset_state(existing, initial_state)
            self._changed()
            return self._view(handle, existing)
        limit = self.settings.max_sessions_per_client
        if limit and store.count_of(caller.client) >= limit:
            raise ResourceExhausted(
                f"this client already holds its limit of {limit} sessions on model "
                f"{handle.spec.label}; close some first"
            )
        session = store.create(session_id, initial_state, owner=caller.owner, client=caller.client)
        self.metrics.sessions_started.labels(handle.spec.name, handle.spec.version, api).inc()
        self.metrics.active_sessions.labels(handle.spec.name, handle.spec.version).inc()
        self._changed()
        return self._view(handle, session)

    def session(
        self, name: str, version: str, session_id: str, caller: Caller = ANONYMOUS
    ) -> tuple[ModelHandle, Session]:
        """The caller's session ``session_id``. Ids are scoped to their owner, so another owner's
        session is NOT_FOUND exactly like a missing one: ids of others cannot be probed."""
        if self._closing:  # sessions are being saved and ended: come back to the next server
            raise Unavailable("the server is shutting down; retry shortly")
        handle = self.model(name, version)
        return handle, handle.store.get(session_id, caller.owner)

    def session_view(
        self,
        name: str,
        version: str,
        session_id: str,
        include_state: bool = False,
        caller: Caller = ANONYMOUS,
    ) -> SessionView:
        handle, session = self.session(name, version, session_id, caller)
        return self._view(handle, session, include_state)

    def _view(
        self, handle: ModelHandle, session: Session, include_state: bool = False
    ) -> SessionView:
        return SessionView(
            session_id=session.session_id,
            model=handle.spec.name,
            version=handle.spec.version,
            steps=session.steps,
            idle_s=0.0 if session.busy else max(0.0, handle.store.clock() - session.last_used_s),
            state=handle.store.read_state(session) if include_state else None,
            durable_steps=session.durable_steps,
            last_output=session.last_output,
        )

    def close_session(
        self, name: str, version: str, session_id: str, caller: Caller = ANONYMOUS
    ) -> SessionEnd:
        handle, session = self.session(name, version, session_id, caller)
        handle.store.end(session, EndReason.CLOSED)
        return SessionEnd(session_id, EndReason.CLOSED, session.steps)

    def _changed(self) -> None:
        if self.durability is not None:
            self.durability.changed()

    def check_chunk(self, spec: ModelSpec, x: np.ndarray) -> np.ndarray:
        """A chunk must be float32 [steps, features], 1 <= steps <= max_chunk_steps, all finite."""
        if x.dtype != np.float32:
            raise InvalidArgument(f"input must be float32, got {x.dtype}")
        if x.ndim != 2:
            raise InvalidArgument(
                f"input must be [steps, {spec.input_size}], got shape {list(x.shape)}"
            )
        steps, features = x.shape
        if features != spec.input_size:
            raise InvalidArgument(
                f"model {spec.label} takes {spec.input_size} features per step, got {features}"
            )
        if steps < 1:
            raise InvalidArgument("a chunk needs at least one step")
        if steps > self.settings.max_chunk_steps:
            raise InvalidArgument(
                f"chunk of {steps} steps exceeds the limit of {self.settings.max_chunk_steps}"
            )
        if self.settings.nonfinite_inputs == "reject" and not all_finite(x):
            raise InvalidArgument("input holds NaN or Inf")
        return x

    async def step(
        self,
        name: str,
        version: str,
        session_id: str,
        x: np.ndarray,
        *,
        api: str,
        end: bool = False,
        received_s: float | None = None,
        deadline_s: float | None = None,
        caller: Caller = ANONYMOUS,
    ) -> StepResult:
        """Apply one chunk to a session and return its outputs; with ``end`` close it afterwards.

        ``deadline_s`` (a ``time.perf_counter()`` instant) is the caller's deadline: a chunk still
        queued when it passes is not computed and fails with DEADLINE_EXCEEDED.
        """
        started = received_s if received_s is not None else time.perf_counter()
        self._check_open()
        handle, session = self.session(name, version, session_id, caller)
        return await self.step_session(
            handle, session, x, api=api, end=end, received_s=started, deadline_s=deadline_s
        )

    async def step_session(
        self,
        handle: ModelHandle,
        session: Session,
        x: np.ndarray,
        *,
        api: str,
        received_s: float,
        end: bool = False,
        deadline_s: float | None = None,
    ) -> StepResult:
        """:meth:`step` for a session the caller already holds (a stream bound to it), without
        looking it up again. A session that has ended since is NOT_FOUND, exactly as by id."""
        output = await self.submit_step(handle, session, x, deadline_s)
        return self.finish_step(handle, session, output, api=api, received_s=received_s, end=end)

    def submit_step(
        self, handle: ModelHandle, session: Session, x: np.ndarray, deadline_s: float | None = None
    ) -> asyncio.Future[np.ndarray]:
        """The first half of :meth:`step_session`, without awaiting: check the chunk and queue it.
        Errors are raised here; the future resolves to the output rows or fails with the batch's
        error. Pass its result to :meth:`finish_step`. For adapters that keep several chunks in
        flight on one stream and would otherwise need a task per chunk."""
        self._check_open()
        if session.ended is not None or session.close_when_idle is not None:
            raise session_not_found(session.session_id)
        self.check_chunk(handle.spec, x)
        if session.busy:
            raise FailedPrecondition(
                f"session {session.session_id!r} already has a chunk in flight; send the next "
                "chunk after its reply"
            )
        return handle.scheduler.submit(session, x, deadline_s)

    def finish_step(
        self,
        handle: ModelHandle,
        session: Session,
        output: np.ndarray,
        *,
        api: str,
        received_s: float,
        end: bool = False,
    ) -> StepResult:
        """The second half of :meth:`step_session`, once the chunk's output is there: close the
        session if asked (``end``), record the request's latency, build the result."""
        self._changed()
        if end:
            handle.store.end(session, EndReason.CLOSED)
        latency = handle.request_latency.get(api)
        if latency is None:
            latency = self.metrics.request_latency.labels(
                handle.spec.name, handle.spec.version, api
            )
            handle.request_latency[api] = latency
        latency.observe(time.perf_counter() - received_s)
        return StepResult(session.session_id, output, session.steps, end, session.durable_steps)

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the server is shutting down")
        if not self.ready:
            raise Unavailable("the server is still loading its models")

    # ----- lifetime ------------------------------------------------------------------------
    def expire_idle_sessions(self) -> int:
        """End every session idle for longer than the TTL; returns how many ended."""
        ttl = self.settings.session_ttl_s
        if ttl <= 0:
            return 0
        return sum(len(h.store.expire_idle(ttl)) for h in self.handles())

    async def _sweep_idle_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ttl_check_interval_s)
            expired = self.expire_idle_sessions()
            if expired:
                logger.info("ended %d idle session(s)", expired)
            for handle in self.handles():
                self.metrics.state_bytes.labels(handle.spec.name, handle.spec.version).set(
                    handle.store.state_bytes
                )

    async def shutdown(self) -> dict[str, int]:
        """Drain in-flight chunks (up to drain_timeout_s), end every session, stop the workers."""
        self._closing = True
        self.ready = False
        if self._ttl_task is not None:
            self._ttl_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ttl_task
        report = {"sessions_ended": 0, "models_not_drained": 0}
        for handle in self.handles():
            if handle._scheduler is not None and not await handle._scheduler.drain(
                self.settings.drain_timeout_s
            ):
                report["models_not_drained"] += 1
        report["sessions_saved"] = 0
        if self.durability is not None:
            await self.durability.stop()
            try:
                report["sessions_saved"] = await self.durability.snapshot(force=True)
            except Exception:
                logger.error("the shutdown snapshot failed: sessions will not be restored")
        for handle in self.handles():
            report["sessions_ended"] += handle.store.end_all(EndReason.SHUTDOWN)
            if handle._scheduler is not None:
                await handle._scheduler.close()
        logger.info(
            "shutdown: saved %d and ended %d session(s); %d model(s) did not drain in time",
            report["sessions_saved"],
            report["sessions_ended"],
            report["models_not_drained"],
        )
        return report
