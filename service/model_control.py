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
lock on the loop is held by a poll, a load, an unload and a release.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from service.batcher import Batcher
from service.durability import Durability, DurableModel
from service.errors import FailedPrecondition, ModelContractError, NotFound, Unavailable, shown
from service.metrics import Metrics
from service.models import (
    EndHook,
    IndexEntry,
    ModelHandle,
    ModelRegistry,
    ModelScan,
    Plan,
    VersionToLoad,
    scan_repository,
)
from service.repository import ModelSpec, no_models, version_key
from service.runtime import ModelRuntime
from service.settings import Settings

logger = logging.getLogger(__name__)


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
        self._poll_task: asyncio.Task[None] | None = None
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
        handles, refused = self.registry.load(
            plan.to_load, self.runtime_class, self.end_hook, at_start_up=True
        )
        for name, reason in plan.config_errors.items():
            self._refuse(name, reason, None, log=False)
        for version in plan.to_load:
            if version.label in refused:
                self._refuse(version.label, refused[version.label], version.attempt, log=False)
        for handle in handles:
            self.registry.add(handle)
            self.count_sessions(handle)
        if not handles:  # nothing to serve: the start fails with the reasons
            raise ModelContractError(" | ".join(self.registry.refused.values()))
        for reason in self.registry.refused.values():  # the others serve: one line per refused
            logger.error("not serving %s", reason)
        return handles

    def start(self) -> None:
        """On the serving loop: the refusals' gauges, and (model_control poll) the poll."""
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        for label in self.registry.refused:
            self._refused_metric(label)
        if self.settings.model_control == "poll":
            self._poll_task = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def stop(self) -> None:
        """No more changes: the poll stops, a load or release under way finishes, releases
        waiting for their turn are dropped (shutdown ends every session anyway)."""
        self._closing = True
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        if hasattr(self, "_lock"):  # started
            async with self._lock:
                for release in self._releases:
                    release.cancel()

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
        refused is tried again once its files or its model's settings change."""
        async with self._lock:
            if not self._closing:
                await self._sync(None, retry=False)

    async def _poll_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.settings.model_poll_interval_s)
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
        async with self._lock:
            if self._closing:
                raise Unavailable("the server is shutting down")
            scans, refused = await self._sync({name}, retry=True)
            if name not in scans:
                raise NotFound(
                    f"model {shown(name)} is not in the model repository "
                    f"{self.settings.model_repository} (no <name>/<version>/model.onnx there)"
                )
            self._unloaded.discard(name)
            problems = [scans[name].error] if scans[name].error else list(refused.values())
            if problems:
                raise FailedPrecondition(f"failed to load {shown(name)}: {' | '.join(problems)}")

    async def unload_model(self, name: str) -> None:
        """Unload model ``name`` (KServe RepositoryModelUnload, model_control explicit): no
        version of it takes new sessions; each serves its live sessions until they end and is
        then released. NOT_FOUND if neither loaded nor in the repository."""
        self._check_control()
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
            raise Unavailable(
                "explicit model load / unload is not allowed if polling is enabled "
                "(model_control is poll: the server follows the repository by itself)"
            )
        if mode != "explicit":
            raise Unavailable(
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
        before with the same files and settings. Returns the scans and the refused versions."""
        root = self.settings.model_repository
        scans = await asyncio.to_thread(scan_repository, root, names)
        refused_before = {} if retry else self._refused_at
        plan = self.registry.plan(scans, self.settings, names, refused_before=refused_before)
        handles: list[ModelHandle] = []
        refused: dict[str, str] = {}
        transient: set[str] = set()
        if plan.to_load:
            handles, refused, transient = await asyncio.to_thread(self._load, plan.to_load)
        self._apply(plan, handles, refused, transient)
        await self._release_idle()
        return scans, refused

    def _load(
        self, versions: list[VersionToLoad]
    ) -> tuple[list[ModelHandle], dict[str, str], set[str]]:
        """Load and check ``versions`` and restore their sessions from their snapshots (a
        version that comes back after the server lost it: removed while it was down), in a
        worker thread: nothing served can reach these handles yet. A snapshot that cannot be
        read (the backend out of reach) refuses its version for now (``transient``: tried again
        at the next poll), so that its sessions are not lost by serving it without them."""
        handles, refused = self.registry.load(
            versions, self.runtime_class, self.end_hook, at_start_up=False
        )
        if self.durability is None:
            return handles, refused, set()
        restored, transient = [], set()
        for handle in handles:
            try:
                self.durability.restore([durable_model(handle)])
            except Exception as error:
                label = handle.spec.label
                refused[label] = (
                    f"model {label}: its sessions' snapshot cannot be read "
                    f"({type(error).__name__}: {error}); it loads once it can"
                )
                transient.add(label)
                continue
            restored.append(handle)
        return restored, refused, transient

    def _apply(
        self,
        plan: Plan,
        handles: list[ModelHandle],
        refused: dict[str, str],
        transient: set[str],
    ) -> None:
        """The loop's part of a sync: what serves, what is refused, what retires."""
        for label in plan.forget:
            self._forget_refusal(label)
        for name, reason in plan.config_errors.items():
            self._refuse(name, reason, None)
        attempts = {v.label: v.attempt for v in plan.to_load}
        for label, reason in refused.items():
            self._refuse(label, reason, None if label in transient else attempts[label])
        for handle in plan.unretire:
            self._unretire(handle)
        for handle in handles:
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
        self.registry.add(handle)
        handle.start(self.metrics, self.on_applied, self.on_failed)
        self.count_sessions(handle)
        self.metrics.model_ready.labels(spec.name, spec.version).set(1)
        self._refused_at.pop(spec.label, None)
        self._changed_on_disk.pop(spec.label, None)
        self.model_changed(spec.label, True)
        logger.info("serving model %s (%d session(s) restored)", spec.label, len(handle.store))

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
            logger.error("not serving %s", reason)
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
