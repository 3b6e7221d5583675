"""Model control: the versions served follow the model repository while the server runs.

``model_control`` none: the versions loaded at start-up serve until the server stops. poll: the
repository is read again every ``model_poll_interval_s``. explicit: a client asks (KServe
RepositoryModelLoad / RepositoryModelUnload, tritonclient's ``load_model`` / ``unload_model``).

Following the repository, for each model: the versions its serving.json's policy selects load (in
a worker thread: onnxruntime, the checks of :mod:`service.model_check`, the sessions of its
snapshot) and then serve; a version refused is reported (one log line, ListModels,
RepositoryIndex, ModelReady false, health NOT_SERVING, ``rnnserve_model_ready`` 0) and never
stops the others, nor the versions it would replace. A version removed from the repository, out
of the policy, or unloaded takes no new sessions but serves its live ones until they end; then it
is released (its batcher, worker thread and runtime), and its snapshot is cleared so that none of
its ended sessions come back. A version loaded again before that serves new sessions again. A
version that comes back after the server lost it (removed while the server was down) gets its
sessions back from its snapshot.

Concurrency: everything here runs on the event loop but the repository reads and the loads,
which run in worker threads on objects nothing served can reach yet. One change at a time: a
lock on the loop is held by a poll, a load, an unload and a release. A change runs to its end
even if the RPC that asked for it is cancelled (its client's deadline, a disconnect): it runs as
a task of its own that the RPC waits for, shielded, so that no version is left half released.
At shutdown a load under way is abandoned (its thread, a daemon, finishes the version it is on;
nothing it loaded is served), and every other change finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from service.batcher import Batcher
from service.durability import Durability, DurableModel
from service.errors import (
    ErrorKind,
    FailedPrecondition,
    ModelContractError,
    NotFound,
    ServiceError,
    Unavailable,
    shown,
)
from service.metrics import Metrics
from service.model_loading import Loaded, load_versions
from service.models import EndHook, IndexEntry, ModelHandle, ModelRegistry, Plan
from service.repository import ModelSpec, no_models, version_key
from service.repository_scan import ModelScan, VersionToLoad, scan_repository
from service.runtime import ModelRuntime
from service.session import EndReason
from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ControlNotAllowed(Unavailable):
    """RepositoryModelLoad / RepositoryModelUnload while model_control is not explicit: answered
    UNAVAILABLE, as Triton answers it, but a client's mistake, not a fault of the server: it is
    counted in ``rnnserve_failures_total`` as ``counted_as`` (FAILED_PRECONDITION), so that it
    never fires the alert on the server's own failures."""

    counted_as = ErrorKind.FAILED_PRECONDITION


def durable_model(handle: ModelHandle) -> DurableModel:
    """What durability needs of a loaded version."""
    return DurableModel(handle.spec.name, handle.spec.version, handle.spec.sha256, handle.store)


class ModelControl:
    """Loads, retires and releases model versions of ``registry`` as the repository says."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
        runtime_class: type[ModelRuntime],
        end_hook: Callable[[ModelSpec], EndHook],
        on_applied: Callable[[], None],
        on_failed: Callable[[Batcher], None],
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.runtime_class = runtime_class
        self.end_hook = end_hook
        self.on_applied = on_applied
        self.on_failed = on_failed
        self.durability: Durability | None = None  # the engine's, once made
        # The server's hook when a version starts serving (True), stops taking new sessions or
        # is refused (False), or is gone (None): its health name follows.
        self.model_changed: Callable[[str, bool | None], None] = lambda label, serving: None
        self._lock: asyncio.Lock  # one change at a time, made on the loop by start()
        self._loop: asyncio.AbstractEventLoop
        # The poll's timer (a test drives it with a sleep of its own).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._stopping: asyncio.Future[None]  # done once stop() begins (made by start())
        self._poll_task: asyncio.Task[None] | None = None
        self._operations: set[asyncio.Task[Any]] = set()  # polls, loads, unloads under way
        self._releases: set[asyncio.Task[None]] = set()
        self._refused_at: dict[str, object] = {}  # label -> the attempt refused (files, settings)
        self._unloaded: set[str] = set()  # models unloaded by request (RepositoryModelUnload)
        self._changed_on_disk: dict[str, str] = {}  # label -> its files already warned about
        self._closing = False

    # ----- lifetime --------------------------------------------------------------------------
    def load_at_start_up(self) -> list[ModelHandle]:
        """Load and check the versions each model's policy selects (in a thread, before
        serving) and register them. A version refused is logged in one line and the others
        serve; ModelContractError when none can."""
        root = self.settings.model_repository
        scans = scan_repository(root)
        if not scans:
            raise no_models(root)
        plan = self.registry.plan(scans, self.settings, None, refused_before={})
        loaded = load_versions(plan.to_load, self.runtime_class, self.end_hook, at_start_up=True)
        for name, reason in plan.config_errors.items():
            self._refuse(name, reason, None, log=False)
        for version in plan.to_load:
            label = version.label
            if label in loaded.refused:
                attempt = None if label in loaded.transient else version.attempt
                self._refuse(label, loaded.refused[label], attempt, log=False)
        for handle in loaded.handles:
            self.registry.add(handle)
            self.count_sessions(handle)
        if not loaded.handles:  # nothing to serve: the start fails with the reasons
            raise ModelContractError(
                " | ".join(self.registry.refused.values()) or no_models(root).args[0]
            )
        for reason in self.registry.refused.values():  # the others serve: one line per refused
            logger.error("not serving: %s", reason)
        return loaded.handles

    def start(self) -> None:
        """On the serving loop: the refusals' gauges, and (model_control poll) the poll."""
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._stopping = self._loop.create_future()
        for label in self.registry.refused:
            self._refused_metric(label)
        if self.settings.model_control == "poll":
            self._poll_task = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def stop(self) -> None:
        """No more changes: the poll stops, a load under way is abandoned (shutdown never waits
        for a model to load: a TensorRT engine build takes minutes), a release under way
        finishes, releases waiting for their turn are dropped (shutdown ends every session
        anyway)."""
        self._closing = True
        if not hasattr(self, "_lock"):  # never started
            return
        if not self._stopping.done():
            self._stopping.set_result(None)
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        while self._operations:  # each ends soon: none loads any more, none starts a release
            await asyncio.wait(set(self._operations))
        async with self._lock:
            for release in self._releases:
                release.cancel()

    async def settled(self) -> None:
        """Wait until no change is under way: every poll, load and unload done, and every
        retired version whose last session ended released (what a test, or an embedder that
        must know, waits for instead of polling the registry)."""
        while self._operations or self._releases:
            await asyncio.wait({*self._operations, *self._releases})

    async def _operation(self, change: Coroutine[Any, Any, T]) -> T:
        """Run ``change`` (a poll, a load, an unload) as a task of its own and wait for it,
        shielded: if the caller goes away (an RPC's deadline, a disconnect), the change still
        runs to its end, and no version is left half released (forgotten by the registry while
        its snapshot still holds ended sessions and its batcher runs on)."""
        task = self._loop.create_task(change, name="model-control")
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.add_done_callback(self._unwatched_done)  # nobody waits for it any more
            raise

    @staticmethod
    def _unwatched_done(task: asyncio.Task[Any]) -> None:
        """A change whose caller went away ended: its failure, if any, is logged here."""
        error = None if task.cancelled() else task.exception()
        if isinstance(error, ServiceError):
            logger.info("a model change whose caller went away failed: %s", error.message)
        elif error is not None:
            logger.error("a model change whose caller went away failed", exc_info=error)

    def session_ended(self, spec: ModelSpec) -> None:
        """A session of ``spec``'s version ended: a retired version whose last one it was is
        released."""
        handle = self.registry.find(spec.name, spec.version)
        if handle is not None and handle.retired and not handle.store and not self._closing:
            task = self._loop.create_task(self._release(handle), name=f"release-{spec.label}")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    def count_sessions(self, handle: ModelHandle) -> None:
        labels = (handle.spec.name, handle.spec.version)
        self.metrics.state_bytes.labels(*labels).set(handle.store.state_bytes)
        self.metrics.active_sessions.labels(*labels).set(len(handle.store))
        self.metrics.session_capacity.labels(*labels).set(handle.settings.max_sessions)

    async def poll_repository(self) -> None:
        """Read the repository again and follow it (what the poll does every
        ``model_poll_interval_s``): new versions and models load, removed ones retire. A version
        refused is tried again once its files or its model's settings change (one refused
        because it could not be read, or its provider was missing: at every poll)."""
        await self._operation(self._poll())

    async def _poll(self) -> None:
        async with self._lock:
            if not self._closing:
                await self._sync(None, retry=False)

    async def _poll_forever(self) -> None:
        failing = False
        while True:
            await self.sleep(self.settings.model_poll_interval_s)
            try:
                await self.poll_repository()
            except Exception as error:  # the poll goes on: what serves is unchanged
                if not failing:
                    logger.error(
                        "reading the model repository %s failed (%s: %s); the models loaded "
                        "serve on, and the poll tries again every %.0f s",
                        self.settings.model_repository, type(error).__name__, error,
                        self.settings.model_poll_interval_s, exc_info=error,
                    )  # fmt: skip
                failing = True
            else:
                failing = False

    async def load_model(self, name: str) -> None:
        """Load model ``name`` from the repository, or follow it again if it is loaded
        (KServe RepositoryModelLoad, model_control explicit): the versions its policy selects
        load (refused ones are tried again), those it no longer selects retire. NOT_FOUND if the
        repository has no such model; FAILED_PRECONDITION with the reasons if a version, or its
        serving.json, is refused (the versions loaded before serve on)."""
        self._check_control()
        await self._operation(self._load_model(name))

    async def _load_model(self, name: str) -> None:
        async with self._lock:
            if self._closing:
                raise Unavailable("the server is shutting down")
            scans, refused = await self._sync({name}, retry=True)
            if self._closing:  # abandoned: the server stops
                raise Unavailable("the server is shutting down")
            if name not in scans:
                raise NotFound(
                    f"model {shown(name)} is not in the model repository "
                    f"{self.settings.model_repository} (no <name>/<version>/model.onnx there)"
                )
            self._unloaded.discard(name)
            problems = list(refused.values())  # its serving.json's, or its versions'
            if problems:
                raise FailedPrecondition(f"failed to load {shown(name)}: {' | '.join(problems)}")

    async def unload_model(self, name: str) -> None:
        """Unload model ``name`` (KServe RepositoryModelUnload, model_control explicit): no
        version of it takes new sessions; each serves its live sessions until they end and is
        then released. NOT_FOUND if neither loaded nor in the repository."""
        self._check_control()
        await self._operation(self._unload_model(name))

    async def _unload_model(self, name: str) -> None:
        async with self._lock:
            if self._closing:
                raise Unavailable("the server is shutting down")
            loaded = self.registry.loaded(name)
            if not loaded and not await self._in_repository(name):
                raise NotFound(f"model {shown(name)} is not loaded, nor in the model repository")
            self._unloaded.add(name)
            for label in [k for k in self.registry.refused if k.split("/")[0] == name]:
                self._forget_refusal(label)
            for handle in loaded.values():
                if not handle.retired:
                    self._retire(handle, "it was unloaded (RepositoryModelUnload)")
            await self._release_idle()

    async def _in_repository(self, name: str) -> bool:
        """Whether the repository holds a version of model ``name`` (a client's name is never
        made into a path)."""
        try:
            return name in await asyncio.to_thread(
                scan_repository, self.settings.model_repository, {name}
            )
        except ModelContractError:  # the repository is gone
            return False

    def _check_control(self) -> None:
        """UNAVAILABLE, as Triton answers, unless model_control is explicit."""
        mode = self.settings.model_control
        if mode == "poll":
            raise ControlNotAllowed(
                "explicit model load / unload is not allowed if polling is enabled "
                "(model_control is poll: the server follows the repository by itself)"
            )
        if mode != "explicit":
            raise ControlNotAllowed(
                f"explicit model load / unload is not allowed: model_control is {mode} (the "
                "models loaded at start-up serve until the server stops); start the server with "
                "--model-control explicit to load and unload models by request"
            )

    async def _sync(
        self, names: set[str] | None, *, retry: bool
    ) -> tuple[dict[str, ModelScan], dict[str, str]]:
        """Follow the repository for the models ``names`` (None: all of it), holding the
        control lock: read it (in a thread), load what is new (in a thread: the loop serves on),
        then, on the loop, serve the new versions, serve retired ones the policy selects again,
        and retire those removed or out of the policy. ``retry``: try again versions refused
        before with the same files and settings. Returns the scans and what was refused (models
        for their serving.json, versions); nothing changes if the server stops meanwhile."""
        root = self.settings.model_repository
        scans = await asyncio.to_thread(scan_repository, root, names)
        refused_before = {} if retry else self._refused_at
        plan = self.registry.plan(scans, self.settings, names, refused_before=refused_before)
        loaded: Loaded | None = Loaded()
        if plan.to_load:
            loaded = await self._load_in_thread(plan.to_load)  # None: abandoned
        if loaded is None or self._closing:  # the server stops: nothing changes any more
            return scans, {}
        self._apply(plan, loaded)
        await self._release_idle()
        return scans, {**plan.config_errors, **loaded.refused}

    async def _load_in_thread(self, versions: list[VersionToLoad]) -> Loaded | None:
        """:meth:`_load` in a thread of its own, or None if the server stops first: shutdown
        does not wait for it. The thread is a daemon, which the process does not wait for
        either; it loads no version after the one it is on."""
        done: asyncio.Future[Loaded] = self._loop.create_future()

        def settle(result: Loaded | None, error: BaseException | None) -> None:
            if done.cancelled():
                return
            if error is not None:
                done.set_exception(error)
            else:
                assert result is not None
                done.set_result(result)

        def work() -> None:
            result, error = None, None
            try:
                result = self._load(versions)
            except BaseException as failure:  # handed to the loop, raised there
                error = failure
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name="model-load", daemon=True).start()
        waits: set[asyncio.Future[Any]] = {done, self._stopping}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            done.cancel()  # what it loads is dropped; a failure of it is no one's concern now
            return None
        return done.result()

    def _load(self, versions: list[VersionToLoad]) -> Loaded:
        """Load and check ``versions`` and restore their sessions from their snapshots (a
        version that comes back after the server lost it: removed while it was down), in a
        worker thread: nothing served can reach these handles yet. A snapshot that cannot be
        read (the backend out of reach) refuses its version for now (``transient``: tried again
        at the next poll), so that its sessions are not lost by serving it without them."""
        loaded = load_versions(
            versions,
            self.runtime_class,
            self.end_hook,
            at_start_up=False,
            abandoned=lambda: self._closing,
        )
        if self.durability is None:
            return loaded
        restored = []
        for handle in loaded.handles:
            try:
                self.durability.restore([durable_model(handle)])
            except Exception as error:
                label = handle.spec.label
                loaded.refused[label] = (
                    f"model {label}: its sessions' snapshot cannot be read "
                    f"({type(error).__name__}: {error}); it loads once it can"
                )
                loaded.transient.add(label)
                continue
            restored.append(handle)
        loaded.handles = restored
        return loaded

    def _apply(self, plan: Plan, loaded: Loaded) -> None:
        """The loop's part of a sync: what serves, what is refused, what retires."""
        for label in plan.forget:
            self._forget_refusal(label)
        for name, reason in plan.config_errors.items():
            self._refuse(name, reason, None)
        attempts = {v.label: v.attempt for v in plan.to_load}
        for label, reason in loaded.refused.items():
            transient = label in loaded.transient
            self._refuse(label, reason, None if transient else attempts[label])
        for handle in plan.unretire:
            self._unretire(handle)
        for handle in loaded.handles:
            self._serve(handle)
        for handle, now in plan.changed:
            label = handle.spec.label
            if self._changed_on_disk.get(label) != now:  # one line per change
                self._changed_on_disk[label] = now
                logger.warning(
                    "model %s: its files changed on disk since it was loaded; it serves what was "
                    "loaded (a version's files must not change: publish a new version instead)",
                    label,
                )
        for handle, reason in plan.retire:
            self._retire(handle, reason)
        for handle, reason in plan.retire_once_served:
            name = handle.spec.name
            serving = set(self.registry.versions(name))
            if all(v in serving for v in plan.selected.get(name, ())):
                self._retire(handle, reason)

    def _serve(self, handle: ModelHandle) -> None:
        """A version loaded while serving starts taking sessions."""
        spec = handle.spec
        self._drop_restored_elsewhere(handle)
        self.registry.add(handle)
        handle.start(self.metrics, self.on_applied, self.on_failed)
        self.count_sessions(handle)
        self.metrics.model_ready.labels(spec.name, spec.version).set(1)
        self._refused_at.pop(spec.label, None)
        self._changed_on_disk.pop(spec.label, None)
        self.model_changed(spec.label, True)
        logger.info("serving model %s (%d session(s) restored)", spec.label, len(handle.store))

    def _drop_restored_elsewhere(self, handle: ModelHandle) -> None:
        """Sessions that ``handle`` restored from its snapshot but whose ids live on another
        version of the model now (restarted there while this version was away): the restored
        copy is an older history of the id, so it is ended, never served beside the live one (a
        request naming no version could reach either)."""
        spec = handle.spec
        dropped = []
        for session in list(handle.store.sessions.values()):
            found = self.registry.holding(spec.name, session.session_id, session.owner)
            if found is not None:
                dropped.append(found[0].spec.version)
                handle.store.end(session, EndReason.CLOSED)
        if dropped:
            logger.warning(
                "model %s: %d session(s) of its snapshot not restored: their ids live on "
                "version(s) %s now", spec.label, len(dropped), ", ".join(sorted(set(dropped))),
            )  # fmt: skip

    def _retire(self, handle: ModelHandle, reason: str) -> None:
        """``handle`` takes no new sessions; its live sessions go on until they end, then it is
        released (at once, by the caller, if it has none). An unloaded version is no failure:
        its ready gauge goes, it does not say 0."""
        spec = handle.spec
        self.registry.retire(handle, reason)
        with contextlib.suppress(KeyError):
            self.metrics.model_ready.remove(spec.name, spec.version)
        self.model_changed(spec.label, False)
        logger.info(
            "model %s takes no new sessions: %s; %d live session(s) go on until they end",
            spec.label, reason, len(handle.store),
        )  # fmt: skip

    def _unretire(self, handle: ModelHandle) -> None:
        self.registry.unretire(handle)
        self.metrics.model_ready.labels(handle.spec.name, handle.spec.version).set(1)
        self.model_changed(handle.spec.label, True)
        logger.info("model %s takes new sessions again", handle.spec.label)

    async def _release(self, handle: ModelHandle) -> None:
        """Release ``handle`` once its last live session ended (the lock's turn)."""
        async with self._lock:
            await self._release_if_idle(handle)

    async def _release_idle(self) -> None:
        """Release every retired version that has no live session (holding the lock)."""
        for handle in self.registry.every_handle():
            await self._release_if_idle(handle)

    async def _release_if_idle(self, handle: ModelHandle) -> None:
        """Release a retired version whose sessions have all ended (holding the lock): forget
        it, clear its snapshot, stop its batcher and worker thread, drop its series."""
        spec = handle.spec
        if (
            self._closing
            or not handle.retired
            or handle.store
            or self.registry.find(spec.name, spec.version) is not handle
        ):
            return  # served again, a session came back, or the server stops
        self.registry.remove(handle)
        if self.durability is not None:
            await self.durability.forget(durable_model(handle))
        if handle.started:
            await handle.batcher.close()
        m = self.metrics
        for gauge in (m.active_sessions, m.session_capacity, m.state_bytes, m.queue_depth):
            with contextlib.suppress(KeyError):
                gauge.remove(spec.name, spec.version)
        handle.release()
        self.model_changed(spec.label, None)
        logger.info("model %s released: %s, and its sessions have all ended", spec.label,
                    handle.retired)  # fmt: skip

    def _refuse(self, label: str, reason: str, attempt: object | None, log: bool = True) -> None:
        """``label`` (a version, or a model whose serving.json is invalid) is not served: one log
        line when the reason is new, ListModels, RepositoryIndex, ModelReady false, health
        NOT_SERVING, ``rnnserve_model_ready`` 0. ``attempt``: what was tried (None: try again
        at the next poll whatever changes)."""
        if attempt is None:
            self._refused_at.pop(label, None)
        else:
            self._refused_at[label] = attempt
        if self.registry.refused.get(label) == reason:
            return
        self.registry.refused[label] = reason
        if log:
            logger.error("not serving: %s", reason)
            self._refused_metric(label)
            self.model_changed(label, False)

    def _refused_metric(self, label: str) -> None:
        name, _, version = label.partition("/")
        if self.registry.find(name, version) is None:  # a loaded version's gauge is its own
            self.metrics.model_ready.labels(name, version).set(0)

    def _forget_refusal(self, label: str) -> None:
        """A refusal that no longer applies (its folder is gone, or out of the policy, or its
        model unloaded): it leaves the listings and its gauge goes."""
        if self.registry.refused.pop(label, None) is None:
            return
        self._refused_at.pop(label, None)
        name, _, version = label.partition("/")
        if self.registry.find(name, version) is None:
            with contextlib.suppress(KeyError):
                self.metrics.model_ready.remove(name, version)
            self.model_changed(label, None)

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model of the repository and every one loaded, a line per version, in Triton's
        states: READY (serving), UNLOADING (takes no new sessions, serves its live ones),
        UNAVAILABLE (refused, or not loaded: the reason says why); a model the repository holds
        no version of, or whose serving.json is invalid, has a line without a version."""
        try:
            scans = await asyncio.to_thread(scan_repository, self.settings.model_repository)
        except ModelContractError:  # the repository is gone: what is loaded is all there is
            scans = {}
        refused = self.registry.refused
        names = set(scans) | set(self.registry.names()) | {k.split("/")[0] for k in refused}
        entries = []
        for name in sorted(names):
            scan, loaded = scans.get(name), self.registry.loaded(name)
            if name in refused:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", refused[name]))
            versions = set(loaded) | set(scan.versions if scan else ())
            versions |= {k.split("/", 1)[1] for k in refused if k.startswith(f"{name}/")}
            for version in sorted(versions, key=version_key):
                entries.append(self._index_entry(name, version, scan, loaded.get(version)))
        if ready_only:
            return [e for e in entries if e.state == "READY"]
        return entries

    def _index_entry(
        self, name: str, version: str, scan: ModelScan | None, handle: ModelHandle | None
    ) -> IndexEntry:
        label = f"{name}/{version}"
        if handle is not None:
            if handle.retired:
                live = len(handle.store)
                return IndexEntry(name, version, "UNLOADING", f"{handle.retired}; serving its "
                                  f"{live} live session(s) until they end")  # fmt: skip
            if handle.started and handle.batcher.failure is not None:
                return IndexEntry(name, version, "UNAVAILABLE", handle.batcher.failure)
            changed = scan is not None and scan.versions.get(version, handle.fingerprint) != (
                handle.fingerprint
            )
            note = "its files changed on disk since it was loaded; it serves what was loaded"
            return IndexEntry(name, version, "READY", note if changed else "")
        if label in self.registry.refused:
            return IndexEntry(name, version, "UNAVAILABLE", self.registry.refused[label])
        policy = None if scan is None or scan.config is None else scan.config.version_policy
        if name in self._unloaded:
            why = "unloaded (RepositoryModelUnload)"
        elif (
            policy is not None and scan is not None and version not in policy.select(scan.versions)
        ):
            why = f"not loaded: outside the version policy ({policy}) of its serving.json"
        elif self.settings.model_control == "explicit":
            why = "not loaded; RepositoryModelLoad loads it"
        elif self.settings.model_control == "poll":
            why = "not loaded yet; the next poll of the repository loads it"
        else:
            why = "added after start-up; model_control is none: a restart loads it"
        return IndexEntry(name, version, "UNAVAILABLE", why)
