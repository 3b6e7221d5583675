"""``rnnserve`` as users run it: a real server process, the client commands, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def timer_like_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model with the timer task's shapes, so ``rnnserve stream`` has a demo."""
    import torch

    from training.export import export_model
    from training.models import ModelConfig, RecurrentNet

    root = tmp_path_factory.mktemp("timer_models")
    torch.manual_seed(0)
    model = RecurrentNet(ModelConfig(cell="gru", input_size=2, output_size=1, hidden_size=4))
    export_model(
        model,
        root / "toy_timer" / "1",
        name="toy_timer",
        task="timer",
        output_kind="regression",
        task_config={},
        metrics={},
        training={},
    )
    return root


@pytest.fixture
def serve(
    timer_like_repository: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    port_file = tmp_path / "ports.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--grpc-port", "0", "--metrics-port", "0",
         "--model-repository", str(timer_like_repository), "--port-file", str(port_file),
         "--log-format", "json", "--session-ttl-s", "0", "--snapshot-dir", str(tmp_path / "state")],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stderr is not None
    for line in process.stderr:  # blocks until the server logs that it serves (or exits)
        if "serving" in json.loads(line)["message"]:
            break
    else:
        process.stderr.close()
        pytest.fail(f"server exited with {process.wait()} before serving")
    try:
        yield process, json.loads(port_file.read_text())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def rnnserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_documents_every_setting_with_env_names() -> None:
    result = rnnserve("serve", "--help")
    assert result.returncode == 0
    for flag in (
        "--host",
        "--grpc-port",
        "--metrics-port",
        "--model-repository",
        "--max-queue-delay-s",
        "--session-ttl-s",
    ):
        assert flag in result.stdout
    assert "RNNSERVE_MAX_BATCH_SIZE" in result.stdout


def test_models_stream_and_graceful_sigterm(
    serve: tuple[subprocess.Popen[str], dict[str, int]], tmp_path: Path
) -> None:
    process, ports = serve
    target = f"127.0.0.1:{ports['grpc_port']}"
    health = rnnserve("health", "--target", target)
    assert health.returncode == 0 and "SERVING" in health.stdout
    listed = rnnserve("models", "--target", target)
    assert listed.returncode == 0 and "toy_timer/1" in listed.stdout
    plot = tmp_path / "stream.png"
    streamed = rnnserve(
        "stream",
        "--target",
        target,
        "--model",
        "toy_timer",
        "--steps",
        "120",
        "--chunk",
        "7",
        "--plot",
        str(plot),
    )
    assert streamed.returncode == 0, streamed.stderr
    assert "session streamed 120 steps in chunks of 7" in streamed.stdout
    assert "mean squared error" in streamed.stdout and plot.stat().st_size > 0
    missing = rnnserve("stream", "--target", target, "--model", "nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert process.stderr is not None
    shutdown_log = process.stderr.read()
    assert "shutdown: saved 0 and ended 0 session(s)" in shutdown_log


def test_bad_repository_fails_start_with_a_clear_message(tmp_path: Path) -> None:
    result = rnnserve(
        "serve",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--model-repository",
        str(tmp_path / "missing"),
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr


def serve_until_it_fails(repository: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return rnnserve(
        "serve", "--grpc-port", "0", "--metrics-port", "0",
        "--model-repository", str(repository), *flags,
    )  # fmt: skip


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """Exit 1, no traceback, and the last line of stderr (after any log lines) the only one that
    says why the server cannot start; it holds every one of ``phrases``."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if "cannot start" in line] == lines[-1:], result.stderr
    for phrase in phrases:
        assert phrase in lines[-1], (phrase, lines[-1])
    return lines[-1]


def test_redis_out_of_reach_at_start_is_one_clear_line(tiny_repository: Path) -> None:
    with socket.socket() as nothing_listens:  # bound, so no one else takes the port meanwhile
        nothing_listens.bind(("127.0.0.1", 0))
        port = nothing_listens.getsockname()[1]
        result = serve_until_it_fails(
            tiny_repository,
            "--snapshot-backend", "redis",
            "--snapshot-redis-url", f"redis://:secret-password@127.0.0.1:{port}/0",
        )  # fmt: skip
    line = assert_one_clear_line(
        result, "Redis", f"redis://127.0.0.1:{port}/0", "start Redis", "--snapshot-backend"
    )
    assert "secret-password" not in result.stderr, line


def test_a_snapshot_directory_that_cannot_be_created_is_one_clear_line(
    tiny_repository: Path, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    state = a_file / "state"
    result = serve_until_it_fails(tiny_repository, "--snapshot-dir", str(state))
    assert_one_clear_line(result, f"snapshot directory {state}", "--snapshot-dir")


@pytest.mark.parametrize("flag", ["--grpc-port", "--metrics-port"])
def test_a_port_in_use_is_one_clear_line(tiny_repository: Path, flag: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        result = serve_until_it_fails(tiny_repository, "--snapshot-backend", "none", flag, port)
    assert_one_clear_line(result, port, flag)
