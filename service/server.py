"""Assembles the running server: engine, gRPC (native + KServe + health + reflection), metrics.

``RnnServer.start()`` loads every model before the health service reports SERVING, so a readiness
probe never routes traffic to a server that cannot answer it. What start-up needs from outside
(its ports, the snapshot directory or Redis) failing raises :class:`StartupError`, whose message
says what failed and what to do.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import gc_pauses
from service._proto.inference import grpc_service_pb2
from service._proto.rnnserve.v1 import streaming_pb2
from service.api import kserve_messages, native
from service.api.auth import BearerTokenInterceptor, load_tokens
from service.api.handlers import add_service
from service.api.kserve import KServeServicer
from service.api.native import NativeServicer
from service.cluster_backend import ClusterBackend
from service.engine import InferenceEngine
from service.health import BoundedHealthServicer
from service.metrics import Metrics
from service.metrics_http import MetricsHttpServer
from service.models import ModelHandle
from service.runtime import ModelRuntime
from service.settings import Settings

logger = logging.getLogger(__name__)

NATIVE_SERVICE = streaming_pb2.DESCRIPTOR.services_by_name["StreamingInference"].full_name
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def model_health_name(handle: ModelHandle) -> str:
    """The health service name of one model version: ``model/<name>/<version>``."""
    return f"model/{handle.spec.label}"


class StartupError(Exception):
    """The server cannot start for a reason outside it (a port in use, a snapshot directory it may
    not write, Redis out of reach); the message says what failed and what to do, in one line."""


def hold_snapshot_directory(directory: Path) -> IO[bytes]:
    """Create the snapshot directory, check that it can be written, and lock it for this server:
    the returned file holds the lock until it is closed (or the process dies, kill -9 included).

    A directory the server may not write fails the start instead of every later snapshot; one
    that another running server holds fails it too, since two servers would restore and then
    overwrite each other's sessions."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # session state: the owner's
        with tempfile.TemporaryFile(dir=directory):
            pass
        lock = open(directory / ".lock", "ab")  # noqa: SIM115 - held for the server's life
    except OSError as error:
        raise StartupError(
            f"snapshot directory {directory} cannot be created or written "
            f"({error.strerror or error}); make it writable, choose another (--snapshot-dir), "
            "or run without snapshots (--snapshot-backend none)"
        ) from error
    if directory.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
        # A shared temporary directory (the fallback of a user without a home): anyone may have
        # made it first, to read or plant sessions. Only the user's own, private one will do.
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            lock.close()
            raise StartupError(
                f"snapshot directory {directory} is in the shared temporary directory but is "
                "not this user's private one; remove it, or choose another (--snapshot-dir)"
            )
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise StartupError(
            f"snapshot directory {directory} is in use by another rnnserve server; give each "
            "server its own (--snapshot-dir), or the two would overwrite each other's sessions"
        ) from None
    return lock


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (None: plaintext). With a client CA bundle the
    server requires and verifies client certificates (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    chain = settings.tls_cert_file.read_bytes()
    key = settings.tls_key_file.read_bytes()
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def write_port_file(path: Path, ports: dict[str, object]) -> None:
    """The bound ports as JSON at ``path``, whole or nothing (for a reader polling it: a test, a
    script, the ``--workers`` supervisor)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(ports))
    partial.replace(path)


class RnnServer:
    """The whole service in one object: build, ``await start()``, ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        runtime_class: type[ModelRuntime] = ModelRuntime,
        cluster_backend: ClusterBackend | None = None,
    ) -> None:
        """``runtime_class`` runs each model: :class:`ModelRuntime`, or a subclass that a
        diagnostic (the benchmark's zero-model server) passes in. ``cluster_backend``: a
        cluster store to join (tests), instead of the one the settings name."""
        self.settings = settings
        self.metrics = Metrics()
        self.engine = InferenceEngine(settings, self.metrics, runtime_class, cluster_backend)
        self._gc_pauses = gc_pauses.GcPauseObserver(self.metrics.gc_pause)
        self.grpc_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._health = BoundedHealthServicer(settings.max_health_watchers, self.metrics)
        self._metrics_http: MetricsHttpServer | None = None
        self._stopped = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._snapshot_lock: IO[bytes] | None = None  # the snapshot directory, held while serving

    async def start(self, freeze_start_up_objects: bool = False) -> None:
        """Bind the ports, load every model, then report SERVING. ``freeze_start_up_objects``
        (process-wide: for the process's own entry point) takes everything alive at that point
        out of the garbage collector's scans, see :mod:`service.gc_pauses`."""
        s = self.settings
        # (a cluster keeps no snapshots: its store is the one source of session state)
        if s.snapshot_backend == "directory" and not self.engine.clustered:
            self._snapshot_lock = hold_snapshot_directory(s.snapshot_dir)
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # Off, so that a port in use is an error; on only for the workers of one
            # ``serve --workers N``, which share their port (the kernel spreads connections).
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
        ]
        interceptors = []
        tokens = load_tokens(s)
        if tokens:
            interceptors.append(BearerTokenInterceptor(tokens))
            logger.info("bearer-token authentication on (%d identities)", len(set(tokens.values())))
        server = grpc.aio.server(options=options, interceptors=interceptors)
        add_service(  # requests that do not parse: INVALID_ARGUMENT (service.api.handlers)
            server,
            NativeServicer(self.engine, self.metrics),
            streaming_pb2.DESCRIPTOR.services_by_name["StreamingInference"],
            native.API,
            self.metrics,
        )
        add_service(
            server,
            KServeServicer(self.engine, self.metrics),
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            kserve_messages.API,
            self.metrics,
            in_band=kserve_messages.unparsed_reply,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = (
            NATIVE_SERVICE,
            KSERVE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        )
        reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server)
        for name in ("", NATIVE_SERVICE, KSERVE_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{s.host}:{s.grpc_port}"
        credentials = server_credentials(s)
        try:
            if credentials is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's "Failed to bind to address" (older versions return 0)
            self.grpc_port = 0
        if self.grpc_port == 0:
            raise StartupError(
                f"cannot bind gRPC to {address} (in use?); choose another port (--grpc-port)"
            )
        await server.start()
        self._server = server
        try:
            self._metrics_http = self._start_metrics_http()
            self.metrics_port = self._metrics_http.port
            # Health answers NOT_SERVING while the models load (in a thread: the loop keeps
            # serving probes).
            await asyncio.to_thread(self._load_models)
        except BaseException:
            await self._close_ports()
            self._release_snapshot_directory()
            raise
        handles = self.engine.handles()
        try:
            await self.engine.start()
        except (ConnectionError, ModuleNotFoundError) as error:  # the cluster store
            await self._close_ports()
            raise StartupError(
                f"cannot join the cluster: {error}; start the cluster store or check "
                "--cluster-redis-url"
            ) from error
        self.engine.model_failed = self._model_failed
        self.engine.control.model_changed = self._model_changed
        if freeze_start_up_objects:
            gc_pauses.freeze_start_up_objects()
        self._gc_pauses.install()
        for name in ("", NATIVE_SERVICE, KSERVE_SERVICE, *map(model_health_name, handles)):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for label in self.engine.registry.refused:  # failed the checks at load
            await self._health.set(f"model/{label}", health_pb2.HealthCheckResponse.NOT_SERVING)
        if s.port_file is not None:
            write_port_file(
                s.port_file, {"grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
            )
        logger.info(
            "serving %d model(s) on %s:%d (gRPC), metrics on %s:%d",
            len(self.engine.handles()),
            s.host,
            self.grpc_port,
            s.host,
            self.metrics_port,
        )

    def _start_metrics_http(self) -> MetricsHttpServer:
        s = self.settings
        try:
            return MetricsHttpServer(
                self.metrics.registry,
                s.host,
                s.metrics_port,
                request_timeout_s=s.metrics_request_timeout_s,
            )
        except OSError as error:
            raise StartupError(
                f"cannot bind metrics to {s.host}:{s.metrics_port} ({error.strerror or error}); "
                "choose another port (--metrics-port)"
            ) from error

    def _load_models(self) -> None:
        """The engine's load and restore (in a worker thread), with Redis out of reach or a file
        the server may not read raised as a :class:`StartupError`."""
        try:
            self.engine.load_models()
        except ConnectionError as error:  # RedisSnapshots: Redis cannot be reached
            advice = (
                "start Redis there, or choose another snapshot backend "
                "(--snapshot-backend directory or none)"
                if self.settings.snapshot_backend == "redis"
                else "check that it is reachable"
            )
            raise StartupError(f"{error}; {advice}") from error
        except PermissionError as error:
            raise StartupError(
                f"cannot read {error.filename} ({error.strerror}); fix its permissions"
            ) from error
        except ModuleNotFoundError as error:  # an extra the settings need is not installed
            raise StartupError(str(error)) from error

    async def _close_ports(self) -> None:
        """Stop serving gRPC and metrics (what :meth:`start` opened before loading models)."""
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self._metrics_http is not None:
            self._metrics_http.stop()

    def _model_failed(self, handle: ModelHandle) -> None:
        """A model cannot go on (its batch loop stopped): its health name says NOT_SERVING."""
        task = asyncio.get_running_loop().create_task(
            self._health.set(model_health_name(handle), health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _model_changed(self, label: str, serving: bool | None) -> None:
        """Model control changed what ``label`` (``<name>/<version>``) is: serving, not
        serving (refused, or taking no new sessions), or gone from the server."""
        status = {
            True: health_pb2.HealthCheckResponse.SERVING,
            False: health_pb2.HealthCheckResponse.NOT_SERVING,
            None: health_pb2.HealthCheckResponse.SERVICE_UNKNOWN,
        }[serving]
        task = asyncio.get_running_loop().create_task(self._health.set(f"model/{label}", status))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _release_snapshot_directory(self) -> None:
        if self._snapshot_lock is not None:
            self._snapshot_lock.close()  # unlocks it
            self._snapshot_lock = None

    async def stop(self) -> dict[str, int]:
        """Graceful stop: NOT_SERVING, drain in-flight chunks, end sessions, close the ports."""
        await self._health.enter_graceful_shutdown()
        report = await self.engine.shutdown()
        await self._close_ports()
        self._release_snapshot_directory()
        self._gc_pauses.uninstall()
        self._stopped.set()
        return report

    async def serve_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully: the process's own server, so it
        freezes the start-up objects (:mod:`service.gc_pauses`)."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        await self.start(freeze_start_up_objects=True)
        await stop_requested.wait()
        logger.info("stop requested; draining (up to %.1f s)", self.settings.drain_timeout_s)
        await self.stop()
