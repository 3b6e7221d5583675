"""The one settings object. Built once in the CLI from flags and ``RNNSERVE_*`` environment
variables (flags win) and passed down; nothing else reads the environment."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# The models that ship with rnnserve: package data of ``service`` (a wheel holds them in
# service/bundled_models); in a checkout, service/bundled_models is a symlink to models/.
BUNDLED_MODELS = (Path(__file__).resolve().parent / "bundled_models").resolve()


def default_state_dir() -> Path:
    """Where session snapshots go by default: ``$XDG_STATE_HOME/rnnserve``, or
    ``~/.local/state/rnnserve`` when XDG_STATE_HOME is unset or not absolute (the XDG rule); for
    a user without a home directory, ``rnnserve-<uid>`` in the temporary directory."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(base):
        return Path(base) / "rnnserve"
    try:
        return Path.home() / ".local" / "state" / "rnnserve"
    except RuntimeError:  # no HOME and no password entry: never a path relative to the cwd
        return Path(tempfile.gettempdir()) / f"rnnserve-{os.getuid()}"


# A plain default rather than a default factory, so that `rnnserve serve --help` shows it.
DEFAULT_STATE_DIR = default_state_dir()

ExecutionProvider = Literal["cpu", "cuda", "tensorrt"]

# Bounds of the numeric settings. Every float is finite (``allow_inf_nan=False``: JSON's
# Infinity, or "inf" in the environment, would make a timer that never fires); a duration has a
# ceiling far above any sane value, so that a typo in units cannot hang a batch or a shutdown.
HOUR_S = 3600.0
DAY_S = 86_400.0
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1  # gRPC's limits are C ints
MAX_THREADS = 1024


class Settings(BaseSettings):
    """Every knob of the server. Environment: ``RNNSERVE_<NAME>`` (e.g. ``RNNSERVE_GRPC_PORT``)."""

    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the gRPC and metrics servers bind to")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    metrics_port: int = Field(
        8002, ge=0, le=65535, description="Prometheus /metrics HTTP port (0: pick a free one)"
    )
    metrics_request_timeout_s: float = Field(
        5.0,
        gt=0.0,
        le=HOUR_S,
        allow_inf_nan=False,
        description="seconds a metrics HTTP connection may take to send its request and read "
        "the reply; one still open then (a half-open client) is closed",
    )
    model_repository: Path = Field(
        BUNDLED_MODELS, description="directory of <model>/<version>/model.onnx + model.json"
    )
    model_control: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="how the repository is followed once serving: none (the versions loaded at "
        "start-up serve until the server stops), poll (read again every model_poll_interval_s: "
        "new versions and models load, removed ones unload), explicit (KServe "
        "RepositoryModelLoad / RepositoryModelUnload, tritonclient's load_model / unload_model, "
        "load and unload a model); a version unloaded keeps serving its live sessions until they "
        "end",
    )
    model_poll_interval_s: float = Field(
        10.0,
        gt=0.0,
        le=DAY_S,
        allow_inf_nan=False,
        description="with model_control poll, how often the repository is read, in seconds",
    )
    execution_provider: ExecutionProvider = Field(
        "cpu", description="onnxruntime execution provider: cpu, cuda or tensorrt"
    )
    provider_fallback: bool = Field(
        False,
        description="if the requested GPU provider is unavailable, log and fall back to CPU "
        "instead of refusing to start",
    )
    gpu_device_id: int = Field(
        0, ge=0, description="the GPU (CUDA device id) that the cuda and tensorrt providers use"
    )
    state_residency: Literal["auto", "host", "device"] = Field(
        "auto",
        description="where sessions' recurrent state lives: host (numpy arrays; each model call "
        "copies its batch's states to the device and back) or device (onnxruntime arrays on the "
        "model's device: only inputs and outputs cross the bus); auto: device on cuda and "
        "tensorrt, host on cpu",
    )
    batch_buckets: str = Field(
        "auto",
        description="batch sizes a model call is padded up to, so a GPU provider sees few "
        "shapes (CUDA kernels and TensorRT tactics per shape): a comma-separated list such as "
        "1,8,32,128 (at most max_batch_size; batches above the largest are not padded), none, "
        "or auto (powers of two up to max_batch_size on cuda and tensorrt, none on cpu); "
        "padding rows never reach a session",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description="onnxruntime threads inside one operator (0: onnxruntime decides)",
    )
    inter_op_threads: int = Field(
        1, ge=0, le=MAX_THREADS, description="onnxruntime threads across operators"
    )
    ort_spin_wait: bool = Field(
        False,
        description="let onnxruntime's intra-op threads spin between calls (lower latency for one "
        "busy model, but the spinning steals CPU from the gRPC threads; off by default)",
    )
    inline_compute_below_s: float = Field(
        0.0002,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="run a batch on the event loop (with a one-thread onnxruntime session) "
        "instead of the worker thread when the model's cost, measured at load, puts it under "
        "this, in seconds (0: always use the worker thread)",
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="event loop implementation (auto: uvloop when installed)"
    )
    gil_switch_interval_s: float = Field(
        0.0005,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="longest a thread waits for the GIL behind the busy event loop, in seconds "
        "(Python's default is 0.005; shorter cuts tail latency, see docs/PERFORMANCE.md)",
    )
    max_batch_size: int = Field(
        128, ge=1, description="most session chunks in one model call (1 disables batching)"
    )
    max_queue_delay_s: float = Field(
        0.0005,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="longest a chunk waits for others to join its batch, in seconds, at most 1 "
        "(uvloop counts whole milliseconds: up to 0.0005 means until the event loop's next "
        "round)",
    )
    max_queue_chunks: int = Field(
        4096, ge=1, description="chunks waiting per model before new ones are refused"
    )
    max_waiting_chunks_per_session: int = Field(
        64,
        ge=0,
        description="chunks of one session that may wait behind its chunk in flight (KServe "
        "sequences; the native API answers FAILED_PRECONDITION instead); more are refused with "
        "RESOURCE_EXHAUSTED",
    )
    max_stream_requests_in_flight: int = Field(
        64,
        ge=1,
        description="unanswered requests of one KServe ModelStreamInfer stream before the server "
        "stops reading it (backpressure: a client that does not read replies is not read "
        "either); a native stream handles one request at a time",
    )
    max_health_watchers: int = Field(
        64,
        ge=0,
        description="grpc.health.v1 Watch streams open at once (health needs no token); more are "
        "refused with RESOURCE_EXHAUSTED. Check is not limited. Raise it to the number of client "
        "channels if clients use gRPC client-side health checking (it watches)",
    )
    max_sessions: int = Field(10_000, ge=1, description="live sessions per model version")
    evict_when_full: bool = Field(
        False,
        description="when a model holds max_sessions, end its longest-idle session (reason "
        "evicted) to admit a new one, instead of refusing with RESOURCE_EXHAUSTED",
    )
    session_ttl_s: float = Field(
        600.0,
        ge=0.0,
        allow_inf_nan=False,
        description="idle seconds before a session ends (0 disables expiry)",
    )
    ttl_check_interval_s: float = Field(
        1.0,
        gt=0.0,
        le=HOUR_S,
        allow_inf_nan=False,
        description="how often idle sessions are looked for, in seconds",
    )
    max_chunk_steps: int = Field(4096, ge=1, description="most steps in one chunk")
    max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        le=MAX_GRPC_MESSAGE_BYTES,
        description="largest gRPC message accepted or sent, in bytes",
    )
    deadline_margin_s: float = Field(
        0.005,
        ge=0.0,
        le=60.0,
        allow_inf_nan=False,
        description="a chunk starts computing only while at least this much of its caller's "
        "deadline is left, in seconds; otherwise it is answered DEADLINE_EXCEEDED (not applied) "
        "while the caller still listens",
    )
    drain_timeout_s: float = Field(
        10.0,
        ge=0.0,
        le=HOUR_S,
        allow_inf_nan=False,
        description="on SIGTERM, how long in-flight chunks may finish, in seconds",
    )
    nonfinite_inputs: Literal["reject", "allow"] = Field(
        "reject",
        description="what to do with NaN or Inf in a chunk: reject (INVALID_ARGUMENT) or allow",
    )
    max_sessions_per_client: int = Field(
        0, ge=0, description="live sessions one client identity may hold per model (0: no limit)"
    )
    snapshot_backend: Literal["none", "directory", "redis"] = Field(
        "directory",
        description="where session snapshots go (none: sessions do not survive a restart)",
    )
    snapshot_dir: Path = Field(
        DEFAULT_STATE_DIR,
        description="directory of the snapshots (backend directory); created if missing",
    )
    snapshot_redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL of the snapshots (backend redis)"
    )
    snapshot_redis_prefix: str = Field(
        "rnnserve:snapshot:",
        description="Redis key prefix of the snapshots; give each replica its own",
    )
    snapshot_interval_s: float = Field(
        10.0,
        ge=0.0,
        le=DAY_S,
        allow_inf_nan=False,
        description="snapshot every this many seconds if anything changed (0: off)",
    )
    snapshot_when_idle_s: float = Field(
        1.0,
        ge=0.0,
        le=DAY_S,
        allow_inf_nan=False,
        description="snapshot once no chunk arrived for this many seconds after changes (0: off)",
    )
    cluster_redis_url: str = Field(
        "",
        description="Redis URL of the cluster store (redis://HOST:PORT/DB): this replica joins "
        "the cluster whose replicas share it, and serves any of its sessions (docs/SCALING.md); "
        "the store then replaces local snapshots",
    )
    cluster_redis_prefix: str = Field(
        "rnnserve:cluster:", description="Redis key prefix of the cluster store (one per cluster)"
    )
    cluster_lease_s: float = Field(
        5.0,
        gt=0.0,
        le=HOUR_S,
        allow_inf_nan=False,
        description="a replica silent this long in seconds is dead: others take its sessions",
    )
    cluster_write_interval_s: float = Field(
        1.0,
        gt=0.0,
        le=HOUR_S,
        allow_inf_nan=False,
        description="write changed sessions to the cluster store this often, in seconds (what "
        "a replica's crash can lose; clients replay it)",
    )
    cluster_handover_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=HOUR_S,
        allow_inf_nan=False,
        description="how long a request waits for another replica to hand its session over, "
        "in seconds (then UNAVAILABLE)",
    )
    cluster_replica_id: str = Field(
        "", description="this replica's name in the cluster (default: host, pid and 6 random hex)"
    )
    cluster_embedded_socket: Path | None = Field(
        None,
        description="Unix socket of the embedded cluster store that 'serve --workers N' holds "
        "for its workers (set by it; not for hand use)",
    )
    reuse_port: bool = Field(
        False,
        description="bind the gRPC port with SO_REUSEPORT (set by 'serve --workers N' for its "
        "workers, which share one port; not for hand use)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="worker processes serving one address as one cluster (docs/SCALING.md)",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate chain: serve gRPC over TLS (with tls_key_file)"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle: require client certificates signed by it (mutual TLS); "
        "a client's identity is then its certificate's common name",
    )
    auth_tokens_file: Path | None = Field(
        None,
        description="file of bearer tokens, one 'identity:token' per line; when set (or "
        "auth_tokens), every RPC but health needs 'authorization: Bearer <token>'",
    )
    auth_tokens: SecretStr = Field(
        SecretStr(""), description="bearer tokens as 'identity:token,identity:token' (env use)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["json", "text"] = Field("text", description="log line format")
    port_file: Path | None = Field(
        None,
        description="write the bound ports as JSON here once serving (for port 0): grpc_port "
        "and metrics_port; with --workers, grpc_port, metrics_ports (one per worker) and "
        "worker_pids",
    )

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_are_sizes(cls, value: str) -> str:
        text = value.strip().lower()
        if text in ("auto", "none", ""):
            return text or "auto"
        try:
            sizes = sorted({int(part) for part in text.split(",") if part.strip()})
        except ValueError:
            raise ValueError(f"{value!r} is not auto, none or a list like 1,8,32,128") from None
        if not sizes or sizes[0] < 1:
            raise ValueError(f"{value!r}: bucket sizes must be positive integers")
        return ",".join(map(str, sizes))

    @property
    def clustered(self) -> bool:
        """Whether this server is a member of a cluster (a Redis cluster store, or the embedded
        store of ``--workers``): sessions then live in the cluster store, not in snapshots."""
        return bool(self.cluster_redis_url) or self.cluster_embedded_socket is not None

    def resolved_state_residency(self, on_gpu: bool) -> Literal["host", "device"]:
        """``state_residency`` with auto resolved for a model on a GPU (``on_gpu``) or not."""
        if self.state_residency == "auto":
            return "device" if on_gpu else "host"
        return self.state_residency

    def resolved_batch_buckets(self, on_gpu: bool) -> tuple[int, ...]:
        """The batch sizes calls are padded up to; () pads nothing. auto: powers of two up to
        ``max_batch_size`` (and it) on a GPU, nothing on the CPU."""
        if self.batch_buckets == "none" or (self.batch_buckets == "auto" and not on_gpu):
            return ()
        if self.batch_buckets == "auto":
            powers = [1 << k for k in range(self.max_batch_size.bit_length())]
            return tuple(sorted({*powers, self.max_batch_size}))
        return tuple(int(size) for size in self.batch_buckets.split(","))

    def for_model(self, overrides: Mapping[str, Any]) -> Settings:
        """These settings with a model's own (its serving.json) over them; each value already
        checked by :func:`model_setting`. Batch buckets listed beyond the model's own
        max_batch_size give way to it (a batch of the model never pads past it)."""
        if not overrides:
            return self
        settings = self.model_copy(update=dict(overrides))
        if settings.batch_buckets not in ("auto", "none"):
            sizes = [int(size) for size in settings.batch_buckets.split(",")]
            most = settings.max_batch_size
            if sizes[-1] > most:
                kept = sorted({*(size for size in sizes if size < most), most})
                settings = settings.model_copy(update={"batch_buckets": ",".join(map(str, kept))})
        return settings

    @model_validator(mode="after")
    def _buckets_fit_the_batch(self) -> Settings:
        if self.batch_buckets not in ("auto", "none"):
            largest = int(self.batch_buckets.split(",")[-1])
            if largest > self.max_batch_size:
                raise ValueError(
                    f"batch_buckets {self.batch_buckets} pads batches beyond max_batch_size "
                    f"({self.max_batch_size}); the largest bucket should be max_batch_size"
                )
        return self

    @model_validator(mode="after")
    def _tls_files_come_in_pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self


# The settings a model's serving.json may set for that model alone (see service.repository).
MODEL_SETTINGS = (
    "max_batch_size",
    "max_queue_delay_s",
    "max_sessions",
    "max_chunk_steps",
    "intra_op_threads",
    "inter_op_threads",
    "execution_provider",
)


def model_setting(name: str, value: object) -> Any:
    """``value`` checked as the setting ``name`` (one of :data:`MODEL_SETTINGS`) is checked on
    the command line: its type (strictly: no text for numbers, no true for 1) and its range.
    Raises ValueError with pydantic's reason."""
    field = Settings.model_fields[name]
    kind: Any = (
        Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    )
    try:
        return TypeAdapter(kind).validate_python(value, strict=True)
    except ValidationError as error:
        raise ValueError(error.errors()[0]["msg"].lower()) from None
