"""The data plane: the one protocol-neutral API both adapters call.

``service.api.native`` and ``service.api.kserve`` convert their messages and call only this
module. It speaks numpy and domain errors (``service.errors``), never protobuf or grpc. Every chunk,
from either API, enters through :meth:`InferenceEngine.submit`, which returns a future of its
:class:`StepResult`; per-session order is kept by the model's batcher.

Which versions serve changes while the server runs (:mod:`service.model_control`): a session
stays on the version it started on, and a version that takes no new sessions (unloaded, removed)
serves its live ones until they end.

The chores off the per-chunk path (idle sessions swept, sessions counted as they end, the
shutdown drain) are in :mod:`service.engine_lifecycle`.

Concurrency: every method runs on the event loop thread (the adapters are asyncio servicers), so
sessions and stores are mutated from one thread only; model calls happen in each batcher's worker
thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from service.batcher import Batcher
from service.chunks import (
    REPLY_OVERHEAD_BYTES,
    PendingChunk,
    StepResult,
    check_chunk,
    check_reply_fits,
)
from service.cluster import ClusterMember, Reservation, make_backend
from service.cluster_backend import ClusterBackend
from service.durability import Durability, DurableModel, RestoreReport, make_durability
from service.engine_lifecycle import IdleSweeper, drain_and_stop, session_end_hook
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    shown,
)
from service.metrics import Metrics
from service.model_control import ModelControl, durable_model
from service.models import EndHook, ModelHandle, ModelRegistry
from service.repository import ModelSpec
from service.runtime import ModelRuntime
from service.session import (
    ANONYMOUS,
    Caller,
    EndReason,
    Session,
    SessionEnd,
    SessionView,
    break_sequence,
    incarnation_text,
    new_incarnation,
    new_session_id,
    other_incarnation,
    parse_incarnation,
    session_not_found,
)
from service.settings import Settings

logger = logging.getLogger(__name__)


def check_incarnation(session: Session, incarnation: str) -> None:
    """NOT_FOUND unless ``session`` is the incarnation the client knows ("": any)."""
    if incarnation and incarnation != incarnation_text(session.incarnation):
        raise other_incarnation(session.session_id)


class InferenceEngine:
    """Loads the repository, owns every session, and runs chunks through the batchers."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        runtime_class: type[ModelRuntime] = ModelRuntime,
        cluster_backend: ClusterBackend | None = None,
    ) -> None:
        """``cluster_backend``: the cluster store to join (tests); by default the one the
        settings name, if any (``settings.clustered``)."""
        self.settings = settings
        self.metrics = metrics
        self.runtime_class = runtime_class
        self.registry = ModelRegistry()
        self.durability: Durability | None = None
        self.cluster: ClusterMember | None = None  # a member of a cluster, once started
        self._cluster_backend = cluster_backend
        self.clustered = settings.clustered or cluster_backend is not None
        self.restore_report: RestoreReport | None = None
        self.ready = False
        self.model_failed: Callable[[ModelHandle], None] = lambda handle: None  # server's hook
        self.control = ModelControl(
            self.registry, settings, metrics, runtime_class, self._end_hook, self._changed,
            self._batcher_failed,
        )  # fmt: skip
        self._sweeper = IdleSweeper(self.registry, settings, metrics)
        self._loop: asyncio.AbstractEventLoop  # the serving loop, set by start()
        self._closing = False

    # ----- loading and models ----------------------------------------------------------------
    def load_models(self) -> None:
        """Load and check the repository's models (the versions their policies select), then
        restore saved sessions (runs in a thread, before serving). A version refused is logged
        in one line and the others serve; ModelContractError when none can."""
        handles = self.control.load_at_start_up()
        if self.clustered:  # the cluster store is the one source of session state
            logger.info("sessions live in the cluster store: no local snapshots")
            return
        self.durability = make_durability(self.settings, self.metrics, self._durable_models)
        self.control.durability = self.durability
        if self.durability is not None:
            self.restore_report = self.durability.restore()
            for handle in handles:
                self.control.count_sessions(handle)

    def _durable_models(self) -> list[DurableModel]:
        return [durable_model(h) for h in self.registry.every_handle()]

    def _end_hook(self, spec: ModelSpec) -> EndHook:
        counted = session_end_hook(self.metrics, spec, self._session_ended)

        def on_end(session: Session, reason: EndReason) -> None:
            counted(session, reason)
            if self.cluster is not None:
                self.cluster.session_ended(spec.name, session, reason)

        return on_end

    def _session_ended(self, spec: ModelSpec) -> None:
        """A session of ``spec`` ended while serving: a change to snapshot, and a retired
        version's last one lets it be released."""
        self._changed()
        self.control.session_ended(spec)

    async def start(self) -> None:
        """Create the batchers on the running loop, start the idle-session sweeper and (with
        model_control poll) the repository poll."""
        self._loop = asyncio.get_running_loop()
        if self.clustered:
            backend = self._cluster_backend or make_backend(self.settings)
            cluster = ClusterMember(backend, self.settings, self.metrics, self.registry)
            await cluster.start()  # ConnectionError: the store cannot be reached
            self.cluster = cluster
        self.registry.start(self.metrics, self._changed, self._batcher_failed)
        self.control.start()
        self._sweeper.start()
        if self.durability is not None:
            self.durability.start()
        self.ready = True

    def _batcher_failed(self, batcher: Batcher) -> None:
        """``batcher``'s loop stopped: its version cannot go on. Only if it is still the batcher
        of the version served under that name: a batcher of a version released (or released and
        loaded again) must never mark the version that serves now not ready."""
        handle = self.registry.find(batcher.spec.name, batcher.spec.version)
        if handle is None or not handle.started or handle.batcher is not batcher:
            return
        self.metrics.model_ready.labels(batcher.spec.name, batcher.spec.version).set(0)
        self.model_failed(handle)

    def handles(self) -> list[ModelHandle]:
        """The model versions that take new sessions."""
        return self.registry.handles()

    def versions(self, name: str) -> list[str]:
        return self.registry.versions(name)

    def model(self, name: str, version: str = "") -> ModelHandle:
        """The loaded model version (NOT_FOUND), retired or not; without ``version``, the
        newest that takes new sessions. UNAVAILABLE while the models still load."""
        if not self.ready and not self._closing:
            raise Unavailable("the server is still loading its models; retry shortly")
        return self.registry.get(name, version)

    def route(self, name: str, version: str, session_id: str, caller: Caller) -> ModelHandle:
        """The model version a request for session ``session_id`` goes to, where
        :meth:`model` finds none taking new sessions: the version the session lives on."""
        return self._find(name, version, session_id, caller.owner)[0]

    def _check_takes_new(self, handle: ModelHandle) -> None:
        """FAILED_PRECONDITION, saying why and where to go instead, if ``handle`` takes no new
        sessions."""
        if handle.retired:
            serving = self.registry.versions(handle.spec.name)
            instead = (
                f"; open new ones on version {serving[-1]}, or name no version" if serving else ""
            )
            raise FailedPrecondition(
                f"model {handle.spec.label} takes no new sessions: {handle.retired}; its live "
                f"sessions go on until they end{instead}"
            )

    # ----- sessions --------------------------------------------------------------------------
    async def open_session(
        self,
        name: str,
        version: str = "",
        session_id: str | None = None,
        initial_state: Sequence[np.ndarray] | None = None,
        *,
        api: str,
        caller: Caller = ANONYMOUS,
    ) -> SessionView:
        """Start a session with zero (or the given) state. Ids are scoped to the model: an id
        that lives on another version of it is ALREADY_EXISTS too (requests naming no version
        would otherwise reach either). In a cluster the store decides whether the id is free."""
        self._check_open()
        handle = self.model(name, version)
        self._check_takes_new(handle)
        if session_id is not None:
            self._check_free(handle, session_id, caller)
        reserved = None
        if self.cluster is not None:
            session_id = session_id or new_session_id()
            if initial_state is not None:
                handle.store.check_state(initial_state)
            reserved = await self.cluster.reserve(
                handle, session_id, caller.owner, caller.client, new_incarnation(), initial_state
            )
            try:
                self._check_free(handle, session_id, caller)  # (opened here while we waited)
            except ServiceError:
                self.cluster.forget(handle.spec.name, session_id, caller.owner, reserved.epoch)
                raise
        session = self._create(handle, session_id, initial_state, api, caller, reserved)
        return self._view(handle, session)

    def _check_free(self, handle: ModelHandle, session_id: str, caller: Caller) -> None:
        found = self.registry.holding(handle.spec.name, session_id, caller.owner)
        if found is not None and found[0] is not handle:
            raise AlreadyExists(
                f"session {shown(session_id)} already exists, on version "
                f"{found[0].spec.version} of model {shown(handle.spec.name)}; close it first, "
                "or choose another id"
            )

    def _create(
        self,
        handle: ModelHandle,
        session_id: str | None,
        initial_state: Sequence[np.ndarray] | None,
        api: str,
        caller: Caller,
        reserved: Reservation | None = None,
    ) -> Session:
        """A new session on ``handle`` (``reserved``: its id taken in the cluster store; a
        session that cannot be made then leaves the store too)."""
        limit = self.settings.max_sessions_per_client
        try:
            if limit and handle.store.count_of(caller.client) >= limit:
                raise ResourceExhausted(
                    f"this client already holds its limit of {limit} sessions on model "
                    f"{handle.spec.label}; close some first"
                )
            session = handle.store.create(
                session_id,
                initial_state,
                owner=caller.owner,
                client=caller.client,
                incarnation=None if reserved is None else reserved.incarnation,
            )
        except ServiceError:
            if reserved is not None and reserved.new and self.cluster is not None and session_id:
                self.cluster.forget(handle.spec.name, session_id, caller.owner, reserved.epoch)
            raise
        if reserved is not None:
            session.epoch = reserved.epoch
            # (a record passed on from another version holds the old copy: write it soon)
            session.written_incarnation = session.incarnation if reserved.new else 0
        labels = (handle.spec.name, handle.spec.version)
        self.metrics.sessions_started.labels(*labels, api).inc()
        self.metrics.active_sessions.labels(*labels).inc()
        self._changed()
        return session

    async def bring(
        self,
        name: str,
        version: str,
        session_id: str,
        caller: Caller = ANONYMOUS,
        *,
        start: bool = False,
    ) -> Reservation | None:
        """In a cluster, make this replica the owner of session ``session_id`` before a request
        uses it: taken from the replica that owns it (a hand-over) or from the store
        (:meth:`service.cluster.ClusterMember.claim`). With ``start`` (Triton's START), an id
        the cluster does not know is reserved here for the new sequence: pass the reservation
        to :meth:`submit`. Outside a cluster, or for a session held here, nothing to do (no
        await on the store). The adapters call this before any request that names a session.
        A START that begins the id again on another version than the one it lives on gets the
        old copy's record for the new one (:meth:`_end_elsewhere` ends the old without deleting
        it)."""
        cluster = self.cluster
        if cluster is None:
            return None
        self._check_open()
        target = self.model(name, version) if start else None  # (NOT_FOUND: no such model)
        local = self.registry.holding(name, session_id, caller.owner)
        if local is None or local[1].moving:
            await cluster.claim(name, session_id, caller.owner)
            local = self.registry.holding(name, session_id, caller.owner)
        if target is None:
            return None
        self._check_takes_new(target)
        if local is None:
            return await cluster.reserve(
                target, session_id, caller.owner, caller.client, new_incarnation()
            )
        if local[0] is not target:
            return Reservation(local[1].epoch, new_incarnation(), new=False)
        return None

    def session(
        self, name: str, version: str, session_id: str, caller: Caller = ANONYMOUS
    ) -> tuple[ModelHandle, Session]:
        """The caller's session ``session_id``. Ids are scoped to their owner, so another owner's
        session is NOT_FOUND exactly like a missing one: ids of others cannot be probed."""
        if self._closing:  # sessions are being saved and ended: come back to the next server
            raise Unavailable("the server is shutting down; retry shortly")
        handle, session = self._find(name, version, session_id, caller.owner)
        if session is None:
            raise session_not_found(session_id)
        return handle, session

    def _find(
        self, name: str, version: str, session_id: str, owner: str, *, elsewhere: bool = True
    ) -> tuple[ModelHandle, Session | None]:
        """The model version a request goes to and the owner's session there, if any: the named
        version, or the newest, unless (``elsewhere``) the session lives on an older one: a
        session stays on the version it started on (retired or not). UNAVAILABLE while the
        models load."""
        try:
            handle = self.model(name, version)
        except FailedPrecondition:  # no version takes new sessions: the session may live on one
            found = (
                None
                if version or not elsewhere
                else self.registry.holding(name, session_id, owner, closing=True)
            )
            if found is None:
                raise
            return found
        session = handle.store.find(session_id, owner)
        closing = session is not None and session.close_when_idle is not None
        if (session is None or closing) and not version and elsewhere:  # no cost otherwise
            found = self.registry.holding(name, session_id, owner)
            if found is not None:
                return found
        return handle, session

    def session_view(
        self,
        name: str,
        version: str,
        session_id: str,
        include_state: bool = False,
        caller: Caller = ANONYMOUS,
        incarnation: str = "",
    ) -> SessionView:
        """The session as a client sees it. ``incarnation``: the one the client knows (as the
        session's views gave it); a session opened again under the same id is NOT_FOUND."""
        handle, session = self.session(name, version, session_id, caller)
        if self.cluster is not None:  # (a stale copy, on a lapsed lease, must not answer)
            self._check_cluster(session)
        check_incarnation(session, incarnation)
        if include_state:
            state_bytes = handle.store.session_state_bytes
            last_bytes = 0 if session.last_output is None else session.last_output.nbytes
            if state_bytes + last_bytes + REPLY_OVERHEAD_BYTES > self.settings.max_message_bytes:
                raise InvalidArgument(
                    f"the session's state and last reply take {state_bytes + last_bytes} bytes, "
                    f"too many for max_message_bytes ({self.settings.max_message_bytes}); ask "
                    "without include_state"
                )
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
            incarnation=incarnation_text(session.incarnation),
        )

    async def close_session(
        self, name: str, version: str, session_id: str, caller: Caller = ANONYMOUS
    ) -> SessionEnd:
        """Close a session. One with a chunk in flight closes once that chunk is applied (chunks
        waiting behind it fail NOT_FOUND), and the count returned includes it: the final count."""
        handle, session = self.session(name, version, session_id, caller)
        if self.cluster is not None:  # (a stale copy, on a lapsed lease, must not answer)
            self._check_cluster(session)
        if session.close_when_idle is not None:  # a close (or an END) is already waiting
            raise session_not_found(session_id)
        if session.busy:
            ended: asyncio.Future[None] = self._loop.create_future()

            def on_end(session: Session, reason: EndReason) -> None:
                if not ended.done():
                    ended.set_result(None)

            session.add_end_listener(on_end)
            handle.store.end(session, EndReason.CLOSED)
            await asyncio.shield(ended)  # a caller that goes away does not undo the close
        else:
            handle.store.end(session, EndReason.CLOSED)
        if self.cluster is not None:  # gone from the cluster too before the reply
            await self.cluster.settled(handle.spec.name, session_id, caller.owner)
        return SessionEnd(session.session_id, EndReason.CLOSED, session.steps)

    def _changed(self) -> None:
        if self.durability is not None:
            self.durability.changed()

    # ----- chunks ----------------------------------------------------------------------------
    def submit(
        self,
        name: str,
        version: str,
        session_id: str,
        x: np.ndarray | Mapping[str, np.ndarray],
        *,
        api: str,
        received_s: float,
        caller: Caller = ANONYMOUS,
        deadline_s: float | None = None,
        start: bool = False,
        end: bool = False,
        wait_if_busy: bool = False,
        expected_steps: int | None = None,
        incarnation: str = "",
        reply_extra_bytes: int = 0,
        reserved: Reservation | None = None,
    ) -> asyncio.Future[StepResult]:
        """The one way in for a chunk ``x`` of session ``session_id``: the model's input
        [steps, features] (``[steps]`` for ids), or each of its inputs by name.

        ``start`` opens the session first (Triton's START: a live one restarts from zero state
        with this chunk), ``end`` closes it once the chunk is applied. A session with a chunk in
        flight answers FAILED_PRECONDITION, unless ``wait_if_busy`` (Triton's sequences): then the
        chunk waits its turn, and a failed chunk breaks the sequence until its next START.
        ``deadline_s`` (a ``time.perf_counter()`` instant): a chunk that cannot start computing
        while ``deadline_margin_s`` of it is left fails with DEADLINE_EXCEEDED, not applied.
        ``expected_steps``: the session's step count the client expects before this chunk;
        another count is ABORTED, not applied. ``incarnation``: the session the client knows;
        another (the id reopened, or the sequence restarted) is NOT_FOUND. A session restored
        unconfirmed takes only a chunk that states both. ``reply_extra_bytes``: what the adapter's reply
        adds to the output (echoed ids), for the reply-size check. ``reserved``: a START's id
        reserved in the cluster store (:meth:`bring`).
        Errors in the request raise here; the future resolves to the chunk's result or fails
        with its error. No error ever follows an applied chunk.
        """
        self._check_open()
        handle, session = self._find(name, version, session_id, caller.owner, elsewhere=not start)
        if self.cluster is not None:
            self._check_cluster(session)
        if start:
            self._check_takes_new(handle)
        try:
            s = self.settings
            steps_limit = handle.settings.max_chunk_steps  # the model's own, or the server's
            x = check_chunk(handle.spec, x, steps_limit, s.nonfinite_inputs == "reject")
            check_reply_fits(handle.spec, x.shape[0], s.max_message_bytes, reply_extra_bytes)
        except ServiceError as error:  # refused, not applied: say where the session stands
            raise (error if session is None else error.with_session_steps(session.steps)) from None
        created = False
        if start:
            if session is None:
                session = self._create(handle, session_id, None, api, caller, reserved)
                created = True
            else:
                logger.warning("sequence restarted by a new START on model %s", handle.spec.label)
        elif session is None or session.close_when_idle is not None:
            raise session_not_found(session_id)
        elif session.broken is not None and expected_steps is None:
            raise break_sequence(session, session.broken).with_session_steps(session.steps)
        stated = parse_incarnation(incarnation) if incarnation else None
        if incarnation and stated is None:
            raise other_incarnation(session_id)
        future: asyncio.Future[StepResult] = self._loop.create_future()
        latency = handle.latency(self.metrics, api)
        chunk = PendingChunk(session, x, future, received_s, latency, deadline_s, start, end,
                             ordered=wait_if_busy, expected_steps=expected_steps,
                             incarnation=stated, opens=created)  # fmt: skip
        try:
            handle.batcher.submit(chunk)
        except ServiceError as error:
            if created:  # a START refused: leave no empty session behind
                if reserved is not None and not reserved.new:
                    session.epoch = 0  # (the record is still the older copy's, which lives on)
                handle.store.end(session, EndReason.CLOSED)
            raise error.with_session_steps(session.steps) from None
        if chunk.anchored:
            # Accepted: it fixes the history itself, so the requests sent after it may follow
            # it. Cleared here, not when it applies: a request failing in between breaks the
            # sequence again, for those sent after that one.
            session.broken = None
        if start:
            self._end_elsewhere(handle, session_id, caller.owner)
        return future

    def _end_elsewhere(self, handle: ModelHandle, session_id: str, owner: str) -> None:
        """A START began (or restarted) session ``session_id`` on ``handle``, the version it
        named or the newest: a START restarts the id on the model, so the same id living on
        any other version is this sequence's older history and ends there (closed). Left live,
        a later request naming no version could reach that stale copy; and a version that is
        going away is not kept by it."""
        for other in self.registry.loaded(handle.spec.name).values():
            session = None if other is handle else other.store.find(session_id, owner)
            if session is not None and session.close_when_idle is None:
                if self.cluster is not None:
                    session.epoch = 0  # its record in the cluster passes to the new copy
                other.store.end(session, EndReason.CLOSED)
                logger.info("sequence restarted on model %s: ended on %s", handle.spec.label,
                            other.spec.label)  # fmt: skip

    def sequence_failed(
        self, name: str, version: str, session_id: str, caller: Caller, error: ServiceError
    ) -> int | None:
        """A request of a pipelined sequence (KServe) failed before it was queued: the sequence
        cannot go on until a START, since requests sent behind the failed one would apply to a
        history that lacks it (see :func:`service.session.break_sequence`). Returns the
        sequence's step count (None: no such sequence). ``version`` as the request named it ("":
        the version the sequence is on)."""
        _, session = self._find(name, version, session_id, caller.owner)
        if session is None:
            return None
        break_sequence(session, error.message)
        return session.steps

    def _check_cluster(self, session: Session | None) -> None:
        """In a cluster: no chunk applies without a valid lease, nor to a session leaving."""
        assert self.cluster is not None
        if not self.cluster.lease_valid():
            raise Unavailable(
                "this replica cannot confirm its cluster lease (the cluster store is unreachable,"
                " or this process was paused); retry, another replica may serve the session"
            )
        if session is not None and session.moving:
            raise Unavailable(
                f"session {shown(session.session_id)} is moving to another replica; retry"
            )

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the server is shutting down")
        if not self.ready:
            raise Unavailable("the server is still loading its models")

    # ----- lifetime --------------------------------------------------------------------------
    def expire_idle_sessions(self) -> int:
        """End every session idle for longer than the TTL; returns how many ended."""
        return self._sweeper.expire()

    async def shutdown(self) -> dict[str, int]:
        """Drain in-flight chunks (up to drain_timeout_s), snapshot, end every session, stop the
        batchers (:func:`service.engine_lifecycle.drain_and_stop`). Never waits longer than the
        drain timeout on a model, failed or not. New work is refused from the first moment."""
        self._closing = True
        self.ready = False
        await self._sweeper.stop()
        return await drain_and_stop(
            self.registry,
            self.control,
            self.durability,
            self.settings.drain_timeout_s,
            self.cluster,
        )
