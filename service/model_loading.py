"""Loading model versions: each one opened, checked (:mod:`service.model_check`), measured and
given its (empty) session store, as a :class:`~service.models.ModelHandle` not served yet.

:func:`load_versions` loads the versions model control (:mod:`service.model_control`) asks for,
refusing those that fail with a one-line reason while the others load; :func:`state_residency`
resolves where a version's states live.

Concurrency: nothing here touches what is served, so a load runs in a worker thread while the
loop serves; :meth:`service.models.ModelRegistry.add` serves a handle, on the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from service.errors import ModelContractError
from service.model_check import open_model
from service.models import EndHook, ModelHandle
from service.repository import ModelSpec
from service.repository_scan import VersionToLoad
from service.runtime import ModelRuntime, ProviderUnavailable
from service.session_store import SessionStore
from service.settings import Settings
from service.state_bank import StateResidency

logger = logging.getLogger("service.models")  # the name its lines always had (logs show it)


@dataclass
class Loaded:
    """What :func:`load_versions` made of the versions it was given: the handles loaded,
    the versions refused (label -> one-line reason), and which of those refusals are
    ``transient`` (tried again by every poll, whatever changes)."""

    handles: list[ModelHandle] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    transient: set[str] = field(default_factory=set)


def load_versions(
    versions: Sequence[VersionToLoad],
    runtime_class: type[ModelRuntime],
    end_hook: Callable[[ModelSpec], EndHook],
    *,
    at_start_up: bool,
    abandoned: Callable[[], bool] = lambda: False,
) -> Loaded:
    """Load and check model versions (:func:`service.model_check.open_model`), each with its
    model's own settings; returns the handles (not served yet:
    :meth:`service.models.ModelRegistry.add` serves one) and the versions refused, each with its
    one-line reason. Touches nothing that is served, so
    it runs in a worker thread while the loop serves. At start-up, a file that cannot be read,
    an execution provider that is missing or any unexpected error stops the start (the
    server's own settings are wrong); later they refuse only the version, and the first two
    are ``transient`` (a poll tries the version again: fixing permissions or installing a
    provider changes none of its files). ``abandoned``: asked between versions; once true (the
    server stops), the versions left are not loaded."""
    loaded = Loaded()
    for version in versions:
        if abandoned():
            break
        label = version.label
        try:
            handle = load_version(version, runtime_class, end_hook)
        except ModelContractError as error:
            loaded.refused[label] = str(error)
        except ProviderUnavailable as error:
            if at_start_up and "execution_provider" not in version.own_settings:
                raise
            loaded.refused[label] = f"model {label}: {error}"
            loaded.transient.add(label)
        except OSError as error:
            if at_start_up:
                raise
            loaded.refused[label] = (
                f"model {label}: cannot read {error.filename or version.directory} "
                f"({error.strerror or error}); check the folder and its permissions"
            )
            loaded.transient.add(label)
        except Exception as error:  # e.g. out of memory: this version only, while serving
            if at_start_up:
                raise
            logger.debug("model %s: the load failed", label, exc_info=error)
            loaded.refused[label] = (
                f"model {label}: failed to load ({type(error).__name__}: "
                f"{' '.join(str(error).split())})"
            )
        else:
            loaded.handles.append(handle)
    return loaded


def load_version(
    version: VersionToLoad,
    runtime_class: type[ModelRuntime],
    end_hook: Callable[[ModelSpec], EndHook],
) -> ModelHandle:
    """One version opened, checked, measured, with its (empty) session store."""
    s = version.settings  # the server's, with the model's serving.json over them
    spec, runtime = open_model(version.directory, s, runtime_class)
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
    handle = ModelHandle(spec, runtime, store, call_cost, s, version.fingerprint)
    own = ", ".join(f"{k}={v}" for k, v in version.own_settings.items())
    logger.info(
        "loaded model %s (%s, %d layer(s), hidden %d) on %s, state in %s memory%s",
        spec.label, spec.cell, spec.num_layers, spec.hidden_size,
        ",".join(runtime.providers),
        "host" if store.bank.residency == "host" else runtime.device.kind,
        f"; its own settings: {own}" if own else "",
    )  # fmt: skip
    if call_cost is not None:
        logger.info(
            "model %s: a one-step call takes %.0f µs + %.2f µs per session",
            spec.label, call_cost.fixed_s * 1e6, call_cost.per_row_s * 1e6,
        )  # fmt: skip
    return handle


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
