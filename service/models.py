"""The registry of loaded models: each version's spec, runtime, session store and batcher.

Lookups by name (and optional version: the highest serving one when none is given) are what
every request starts with.

Model control (:mod:`service.model_control`) drives it: :meth:`ModelRegistry.plan` compares what
the repository holds (:mod:`service.repository_scan`) with what is served, the versions to load
are opened and checked in a worker thread (:mod:`service.model_loading`), and on the event loop
:meth:`ModelRegistry.add` serves one, :meth:`ModelRegistry.retire` stops one from taking new
sessions (its live sessions go on) and :meth:`ModelRegistry.remove` forgets one whose sessions
have all ended.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from service.batcher import Batcher
from service.errors import FailedPrecondition, NotFound, Unavailable, shown
from service.metrics import LoopHistogramChild, Metrics
from service.repository import SERVING_JSON, ModelSpec, version_key
from service.repository_scan import ModelScan, VersionToLoad
from service.runtime import CallCost, ModelRuntime
from service.session import EndReason, Session
from service.session_store import SessionStore
from service.settings import Settings

EndHook = Callable[[Session, EndReason], None]


class ModelHandle:
    """One loaded model version: spec, runtime, sessions and (once started) its batcher.

    ``settings``: the server's with the model's serving.json over them (what its batcher, its
    runtime and its chunk checks use). ``fingerprint``: its files when it was loaded.
    ``retired``: why it takes no new sessions (None: it does); its live sessions go on.
    """

    def __init__(
        self,
        spec: ModelSpec,
        runtime: ModelRuntime,
        store: SessionStore,
        call_cost: CallCost | None,
        settings: Settings,
        fingerprint: str = "",
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.store = store
        self.call_cost = call_cost  # measured at load; None when nothing runs inline
        self.settings = settings
        self.fingerprint = fingerprint
        self.retired: str | None = None
        self._batcher: Batcher | None = None
        self._latency: dict[str, LoopHistogramChild] = {}  # per API, labelled once

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise Unavailable("the server is not started yet")
        return self._batcher

    @property
    def started(self) -> bool:
        return self._batcher is not None

    @property
    def ready(self) -> bool:
        """Started, takes new sessions, and its batcher can go on."""
        return self._batcher is not None and self._batcher.failure is None and not self.retired

    def start(
        self,
        metrics: Metrics,
        on_applied: Callable[[], None],
        on_failed: Callable[[Batcher], None],
    ) -> None:
        """Create the batcher, on the running loop, with this model's settings."""
        s = self.settings
        self._batcher = Batcher(
            spec=self.spec,
            runtime=self.runtime,
            store=self.store,
            metrics=metrics,
            max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_s,
            max_queue_chunks=s.max_queue_chunks,
            max_waiting_per_session=s.max_waiting_chunks_per_session,
            deadline_margin_s=s.deadline_margin_s,
            inline_compute_below_s=s.inline_compute_below_s,
            call_cost=self.call_cost,
            batch_buckets=s.resolved_batch_buckets(self.runtime.device.kind == "cuda"),
            on_applied=on_applied,
            on_failed=on_failed,
        )

    def release(self) -> None:
        """Let go of everything this version holds, once it is released (its batcher closed,
        its sessions all ended, its series gone), so that its onnxruntime sessions, state bank
        and worker thread are freed now. A closed batcher stays in a reference cycle (its
        cancelled loop task's traceback holds it), and a version loaded at start-up was frozen
        out of the collector's scans (:mod:`service.gc_pauses`): that cycle is never collected,
        so it must not reach the model."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            vars(batcher).clear()  # its runner (runtime, thread), store (bank), queue, series
        self._latency.clear()

    def latency(self, metrics: Metrics, api: str) -> LoopHistogramChild:
        """The request-latency histogram of this model for ``api``."""
        child = self._latency.get(api)
        if child is None:
            child = self._latency[api] = metrics.request_latency.labels(
                self.spec.name, self.spec.version, api
            )
        return child


@dataclass
class Plan:
    """What to change so that the served versions follow the repository (:meth:`ModelRegistry.plan`)."""

    to_load: list[VersionToLoad] = field(default_factory=list)
    unretire: list[ModelHandle] = field(default_factory=list)
    retire: list[tuple[ModelHandle, str]] = field(default_factory=list)  # (version, why)
    # Out of the version policy: retired only once every version the policy selects serves, so
    # that a newer version refused never leaves the model without the one it would replace.
    retire_once_served: list[tuple[ModelHandle, str]] = field(default_factory=list)
    selected: dict[str, list[str]] = field(default_factory=dict)  # model -> its policy's versions
    # Versions whose files changed since they were loaded, with their files now.
    changed: list[tuple[ModelHandle, str]] = field(default_factory=list)
    config_errors: dict[str, str] = field(default_factory=dict)  # model -> serving.json's problem
    forget: set[str] = field(default_factory=set)  # refusals that no longer apply


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index (KServe RepositoryIndex): a model version and its state
    in Triton's words (READY, UNLOADING, UNAVAILABLE), with why."""

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""


class ModelRegistry:
    """Every loaded model version, by name and version: those serving, and those retired that
    still serve their live sessions."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, ModelHandle]] = {}
        self._latest: dict[str, ModelHandle] = {}  # name -> highest version taking sessions
        # "<name>/<version>" (or "<name>" for its serving.json) -> why it is not served
        self.refused: dict[str, str] = {}

    def start(
        self,
        metrics: Metrics,
        on_applied: Callable[[], None],
        on_failed: Callable[[Batcher], None],
    ) -> None:
        """Create every model's batcher on the running loop."""
        for handle in self.every_handle():
            if not handle.started:
                handle.start(metrics, on_applied, on_failed)
                metrics.model_ready.labels(handle.spec.name, handle.spec.version).set(1)

    # ----- what is served (every method on the event loop once serving) ------------------------
    def plan(
        self,
        scans: Mapping[str, ModelScan],
        settings: Settings,
        names: Collection[str] | None,
        *,
        refused_before: Mapping[str, object],
    ) -> Plan:
        """What to load, retire and serve again so that the models ``names`` (None: every model
        of ``scans`` and every model loaded) follow the repository as ``scans`` read it. A
        version refused before with the same ``attempt`` (``refused_before``) is not tried
        again; an invalid serving.json changes nothing of its model (the versions loaded serve
        on)."""
        plan = Plan()
        everything = set(scans) | set(self._models) | {k.split("/")[0] for k in self.refused}
        for name in sorted(everything if names is None else set(names)):
            scan = scans.get(name)
            loaded = self._models.get(name, {})
            if scan is None:  # its folder is gone, or holds no version
                gone = "its folder was removed from the repository"
                plan.retire.extend((h, gone) for h in loaded.values() if not h.retired)
                plan.forget.update(k for k in self.refused if k.split("/")[0] == name)
                continue
            if scan.config is None:
                plan.config_errors[name] = scan.error
                continue
            policy = scan.config.version_policy
            selected = policy.select(scan.versions)
            if not selected:  # Triton refuses such a model too; never dropped without a word
                plan.config_errors[name] = (
                    f"model {name}: the version policy ({policy}) of "
                    f"{scan.directory / SERVING_JSON} selects none of its versions "
                    f"({', '.join(sorted(scan.versions, key=version_key))}); fix version_policy "
                    "or add a version it selects"
                )
                continue
            plan.forget.add(name)  # its serving.json reads again
            plan.selected[name] = selected
            own = dict(scan.config.settings)
            model_settings = settings.for_model(own)
            for version in selected:
                handle = loaded.get(version)
                if handle is not None:
                    if handle.retired:
                        plan.unretire.append(handle)
                    if handle.fingerprint != scan.versions[version]:
                        plan.changed.append((handle, scan.versions[version]))
                    continue
                candidate = VersionToLoad(
                    scan.directory / version, model_settings, scan.versions[version], own
                )
                if refused_before.get(candidate.label) != candidate.attempt:
                    plan.to_load.append(candidate)
            for version, handle in loaded.items():
                if handle.retired or version in selected:
                    continue
                if version not in scan.versions:
                    plan.retire.append((handle, "its folder was removed from the repository"))
                else:
                    why = f"it is outside the version policy ({policy}) of its serving.json"
                    plan.retire_once_served.append((handle, why))
            plan.forget.update(
                k
                for k in self.refused
                if k.startswith(f"{name}/") and k.split("/", 1)[1] not in selected
            )
        return plan

    def add(self, handle: ModelHandle) -> None:
        """Serve ``handle``: it takes sessions (the newest of its model, unless a newer one
        serves)."""
        spec = handle.spec
        self._models.setdefault(spec.name, {})[spec.version] = handle
        self.refused.pop(spec.label, None)
        self._update_latest(spec.name)

    def retire(self, handle: ModelHandle, reason: str) -> None:
        """``handle`` takes no new sessions (``reason`` says why, to the clients that ask); its
        live sessions go on."""
        handle.retired = reason
        self._update_latest(handle.spec.name)

    def unretire(self, handle: ModelHandle) -> None:
        """``handle`` takes new sessions again."""
        handle.retired = None
        self._update_latest(handle.spec.name)

    def remove(self, handle: ModelHandle) -> None:
        """Forget ``handle`` (retired, its sessions all ended)."""
        versions = self._models.get(handle.spec.name, {})
        if versions.get(handle.spec.version) is handle:
            del versions[handle.spec.version]
            if not versions:
                del self._models[handle.spec.name]
            self._update_latest(handle.spec.name)

    def _update_latest(self, name: str) -> None:
        serving = self.versions(name)
        if serving:
            self._latest[name] = self._models[name][serving[-1]]
        else:
            self._latest.pop(name, None)

    # ----- lookups ---------------------------------------------------------------------------
    def holding(
        self, name: str, session_id: str, owner: str, *, closing: bool = False
    ) -> tuple[ModelHandle, Session] | None:
        """The version of model ``name`` that holds ``owner``'s live session ``session_id``
        (newest first, retired versions included), or None. A session closing (its close waits
        for its chunk in flight; a START elsewhere may have ended it) counts only if
        ``closing``."""
        versions = self._models.get(name, {})
        for version in sorted(versions, key=version_key, reverse=True):
            handle = versions[version]
            session = handle.store.find(session_id, owner)
            if session is not None and (closing or session.close_when_idle is None):
                return handle, session
        return None

    def handles(self) -> list[ModelHandle]:
        """The versions that serve (take new sessions)."""
        return [h for h in self.every_handle() if not h.retired]

    def every_handle(self) -> list[ModelHandle]:
        """Every loaded version, retired ones (still serving their live sessions) included."""
        return [h for versions in self._models.values() for h in versions.values()]

    def find(self, name: str, version: str) -> ModelHandle | None:
        """Model ``name`` at ``version`` (retired or not), or None."""
        return self._models.get(name, {}).get(version)

    def names(self) -> list[str]:
        """Every model with a loaded version (retired ones included)."""
        return sorted(self._models)

    def loaded(self, name: str) -> dict[str, ModelHandle]:
        """Model ``name``'s loaded versions, retired ones included."""
        return dict(self._models.get(name, {}))

    def versions(self, name: str) -> list[str]:
        """Model ``name``'s versions that take new sessions, oldest first."""
        versions = self._models.get(name, {})
        return sorted((v for v, h in versions.items() if not h.retired), key=version_key)

    def get(self, name: str, version: str = "") -> ModelHandle:
        """Model ``name`` at ``version`` (retired or not), or the highest serving version when
        ``version`` is empty; NOT_FOUND names what exists, FAILED_PRECONDITION says why none
        takes new sessions."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(n for n in sorted(self._models) if self.versions(n)) or "none"
            raise NotFound(f"model {shown(name)} not found; loaded models: {known}")
        if not version:
            latest = self._latest.get(name)
            if latest is None:  # every version retired: their live sessions only
                newest = versions[max(versions, key=version_key)]
                raise FailedPrecondition(
                    f"model {shown(name)} takes no new sessions: {newest.retired}; its live "
                    "sessions go on until they end"
                )
            return latest
        try:
            return versions[version]
        except KeyError:
            raise NotFound(
                f"model {name!r} has no version {shown(version)}; versions: "
                f"{', '.join(self.versions(name)) or 'none taking new sessions'}"
            ) from None
