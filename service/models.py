"""The registry of loaded models: each version's spec, runtime, session store and batcher.

Loading checks every model (:mod:`service.model_check`) before any is served, refusing those that
fail while the others serve; lookups by name (and optional version: the highest when none is
given) are what every request starts with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.batcher import Batcher
from service.errors import ModelContractError, NotFound, Unavailable, shown
from service.metrics import LoopHistogramChild, Metrics
from service.model_check import open_model
from service.repository import ModelSpec, discover, no_models, version_key
from service.runtime import CallCost, ModelRuntime
from service.session import EndReason, Session
from service.session_store import SessionStore
from service.settings import Settings
from service.state_bank import StateResidency

logger = logging.getLogger(__name__)

EndHook = Callable[[Session, EndReason], None]


class ModelHandle:
    """One loaded model version: spec, runtime, sessions and (once started) its batcher."""

    def __init__(
        self,
        spec: ModelSpec,
        runtime: ModelRuntime,
        store: SessionStore,
        call_cost: CallCost | None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.store = store
        self.call_cost = call_cost  # measured at load; None when nothing runs inline
        self._batcher: Batcher | None = None
        self._latency: dict[str, LoopHistogramChild] = {}  # per API, labelled once

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise Unavailable("the server is not started yet")
        return self._batcher

    @property
    def ready(self) -> bool:
        """Started, and its batcher can go on."""
        return self._batcher is not None and self._batcher.failure is None

    def latency(self, metrics: Metrics, api: str) -> LoopHistogramChild:
        """The request-latency histogram of this model for ``api``."""
        child = self._latency.get(api)
        if child is None:
            child = self._latency[api] = metrics.request_latency.labels(
                self.spec.name, self.spec.version, api
            )
        return child


class ModelRegistry:
    """Every loaded model version, by name and version."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, ModelHandle]] = {}
        self._latest: dict[str, ModelHandle] = {}  # name -> highest version
        self.refused: dict[str, str] = {}  # "<name>/<version>" -> why it is not served

    def load(
        self,
        settings: Settings,
        metrics: Metrics,
        runtime_class: type[ModelRuntime],
        end_hook: Callable[[ModelSpec], EndHook],
    ) -> None:
        """Load and check every model of the repository (:func:`service.model_check.open_model`).
        A model that fails is refused: logged in one line, kept in :attr:`refused` with the
        reason, and the others serve. Raises ModelContractError when none can be served."""
        s = settings
        directories = discover(s.model_repository)
        if not directories:
            raise no_models(s.model_repository)
        for directory in directories:
            try:
                spec, runtime = open_model(directory, s, runtime_class)
            except ModelContractError as error:
                label = f"{directory.parent.name}/{directory.name}"
                self.refused[label] = str(error)
                continue
            call_cost = None
            on_gpu = runtime.device.kind == "cuda"
            # On a GPU every batch goes to the worker thread: a first call of a shape (kernel
            # choice, a TensorRT engine) may take seconds, which the event loop must not wait.
            if s.inline_compute_below_s > 0 and not on_gpu:
                call_cost = runtime.measure_cost(spec.tensors, max_rows=s.max_batch_size)
            store = SessionStore(
                states=spec.tensors.states,
                max_sessions=s.max_sessions,
                evict_when_full=s.evict_when_full,
                on_end=end_hook(spec),
                residency=state_residency(s, runtime, spec),
                device=runtime.device,
            )
            self._models.setdefault(spec.name, {})[spec.version] = ModelHandle(
                spec, runtime, store, call_cost
            )
            self._latest[spec.name] = self._models[spec.name][self.versions(spec.name)[-1]]
            labels = (spec.name, spec.version)
            metrics.state_bytes.labels(*labels).set(store.state_bytes)
            metrics.active_sessions.labels(*labels).set(0)
            metrics.session_capacity.labels(*labels).set(s.max_sessions)
            logger.info(
                "loaded model %s (%s, %d layer(s), hidden %d) on %s, state in %s memory",
                spec.label, spec.cell, spec.num_layers, spec.hidden_size,
                ",".join(runtime.providers),
                "host" if store.bank.residency == "host" else runtime.device.kind,
            )  # fmt: skip
            if call_cost is not None:
                logger.info(
                    "model %s: a one-step call takes %.0f µs + %.2f µs per session",
                    spec.label, call_cost.fixed_s * 1e6, call_cost.per_row_s * 1e6,
                )  # fmt: skip
        if not self._models:  # nothing to serve: the start fails with the reasons
            raise ModelContractError(" | ".join(self.refused.values()))
        for reason in self.refused.values():  # the others serve: one line per refused model
            logger.error("not serving %s", reason)

    def start(
        self,
        settings: Settings,
        metrics: Metrics,
        on_applied: Callable[[], None],
        on_failed: Callable[[Batcher], None],
    ) -> None:
        """Create every model's batcher on the running loop."""
        s = settings
        for handle in self.handles():
            handle._batcher = Batcher(
                spec=handle.spec,
                runtime=handle.runtime,
                store=handle.store,
                metrics=metrics,
                max_batch_size=s.max_batch_size,
                max_queue_delay_s=s.max_queue_delay_s,
                max_queue_chunks=s.max_queue_chunks,
                max_waiting_per_session=s.max_waiting_chunks_per_session,
                deadline_margin_s=s.deadline_margin_s,
                inline_compute_below_s=s.inline_compute_below_s,
                call_cost=handle.call_cost,
                batch_buckets=s.resolved_batch_buckets(handle.runtime.device.kind == "cuda"),
                on_applied=on_applied,
                on_failed=on_failed,
            )
            metrics.model_ready.labels(handle.spec.name, handle.spec.version).set(1)

    def holding(self, name: str, session_id: str, owner: str) -> tuple[ModelHandle, Session] | None:
        """The version of model ``name`` that holds ``owner``'s session ``session_id`` (newest
        first), or None."""
        for version in reversed(self.versions(name)):
            handle = self._models[name][version]
            session = handle.store.find(session_id, owner)
            if session is not None:
                return handle, session
        return None

    def handles(self) -> list[ModelHandle]:
        return [h for versions in self._models.values() for h in versions.values()]

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def get(self, name: str, version: str = "") -> ModelHandle:
        """Model ``name`` at ``version`` (the highest when empty); NOT_FOUND names what exists."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {shown(name)} not found; loaded models: {known}")
        if not version:
            return self._latest[name]
        try:
            return versions[version]
        except KeyError:
            raise NotFound(
                f"model {name!r} has no version {shown(version)}; versions: {', '.join(self.versions(name))}"
            ) from None


def state_residency(settings: Settings, runtime: ModelRuntime, spec: ModelSpec) -> StateResidency:
    """Where ``spec``'s states live: the setting, resolved for the runtime's device; host, with
    a warning, for a runtime class that overrides only ``run`` (its device path would not run
    the override)."""
    wanted = settings.resolved_state_residency(runtime.device.kind == "cuda")
    if wanted == "device" and not runtime.runs_device_state:
        logger.warning(
            "model %s: %s overrides run() but not run_bound(); its state stays in host memory",
            spec.label, type(runtime).__name__,
        )  # fmt: skip
        return "host"
    return wanted
