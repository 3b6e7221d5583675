"""``rnnserve`` as users run it: a real server process, the client commands, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.cli import main
from tests.certs import Pki
from tests.test_demos import bundled_settings, server_in_thread

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
    assert "streamed 120 steps in one session, in chunks of 7" in streamed.stdout
    # An untrained model with no recorded metrics: measured, and said to have no test figure.
    assert "stream MSE: " in streamed.stdout and "(test set: not recorded)" in streamed.stdout
    assert plot.stat().st_size > 0
    missing = rnnserve("stream", "--target", target, "--model", "nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert process.stderr is not None
    shutdown_log = process.stderr.read()
    assert "shutdown: 0 session(s) saved for the next start, 0 ended here" in shutdown_log


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
    others = [line for line in lines[:-1] if " INFO " not in line and '"INFO"' not in line]
    assert not others, result.stderr  # nothing else said, not even by gRPC's C core
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


def copy_model(repository: Path, root: Path, name: str = "tiny_gru") -> Path:
    """A repository at ``root`` with one model copied from ``repository``: its version folder."""
    version = root / name / "1"
    shutil.copytree(repository / name / "1", version)
    return version


def edit_json(version: Path, change: Callable[[dict[str, object]], None]) -> None:
    path = version / "model.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def no_model_json(version: Path) -> None:
    (version / "model.json").unlink()


def invalid_json(version: Path) -> None:
    (version / "model.json").write_text("{not json")


def lacks_keys(version: Path) -> None:
    edit_json(version, lambda meta: [meta.pop(k) for k in ("hidden_size", "cell")])


def unreadable_onnx(version: Path) -> None:
    (version / "model.onnx").write_bytes(b"not an onnx graph")
    edit_json(version, lambda meta: meta.pop("sha256"))  # else the hash check says it first


def breaks_the_contract(version: Path) -> None:
    edit_json(version, lambda meta: meta.update(hidden_size=99))


def changed_after_export(version: Path) -> None:
    with (version / "model.onnx").open("ab") as graph:
        graph.write(b"\0")


@pytest.mark.parametrize(
    ("mistake", "phrases"),
    [
        (no_model_json, ["tiny_gru/1", "missing model.json", "python -m training export"]),
        (invalid_json, ["tiny_gru/1", "is not valid JSON"]),
        (lacks_keys, ["tiny_gru/1", "lacks cell, hidden_size", "add them"]),
        (unreadable_onnx, ["tiny_gru/1", "onnxruntime cannot load", "INVALID_PROTOBUF"]),
        (breaks_the_contract, ["tiny_gru/1 breaks the ONNX contract", "expected 99"]),
        (changed_after_export, ["tiny_gru/1", "changed after export"]),
    ],
)
def test_a_bad_model_fails_start_with_one_line_naming_it(
    tiny_repository: Path, tmp_path: Path, mistake: Callable[[Path], None], phrases: list[str]
) -> None:
    mistake(copy_model(tiny_repository, tmp_path / "models"))
    result = serve_until_it_fails(tmp_path / "models", "--snapshot-backend", "none")
    assert_one_clear_line(result, *phrases)


def test_a_missing_or_empty_repository_fails_start_with_one_line(tmp_path: Path) -> None:
    missing = serve_until_it_fails(tmp_path / "missing", "--snapshot-backend", "none")
    assert_one_clear_line(missing, "does not exist", "--model-repository")
    (tmp_path / "empty").mkdir()
    empty = serve_until_it_fails(tmp_path / "empty", "--snapshot-backend", "none")
    assert_one_clear_line(empty, "holds no <name>/<version>/model.onnx", "--model-repository")


STREAM = ["stream", "--target", "127.0.0.1:1", "--model", "adding_lstm"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*STREAM, "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        ([*STREAM, "--chunk", "0"], "argument --chunk: must be at least 1, got 0"),
        ([*STREAM, "--chunk", "ten"], "argument --chunk: expected a whole number, got 'ten'"),
        ([*STREAM, "--show", "-1"], "argument --show: must be at least 0, got -1"),
        ([*STREAM, "--sequences", "0"], "argument --sequences: must be at least 1"),
        ([*STREAM, "--seed", "-1"], "argument --seed: must be at least 0"),
        ([*STREAM, "--tls-ca-file", "/nonexistent/ca.pem"], "/nonexistent/ca.pem: no such file"),
        ([*STREAM, "--tls-cert-file", "pyproject.toml"], "--tls-cert-file and --tls-key-file go together"),
        ([*STREAM, "--tls-cert-file", "pyproject.toml", "--tls-key-file", "pyproject.toml"],
         "mutual TLS needs --tls-ca-file"),
        (["models", "--timeout-s", "0"], "argument --timeout-s: must be a number of seconds above 0"),
        (["models", "--token-file", "/nonexistent/token"], "/nonexistent/token: no such file"),
        (["health", "--timeout-s", "nan"], "argument --timeout-s: must be a number of seconds above 0"),
        (["stream", "--target", "127.0.0.1:1"], "the following arguments are required: --model"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plot_without_matplotlib_exits_2_before_streaming(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError

    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("connected to the server before checking --plot")

    monkeypatch.setattr("service.cli_stream.connect", no_connection)
    assert main([*STREAM, "--plot", str(tmp_path / "demo.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rnnserve: --plot needs matplotlib: pip install 'rnnserve[plot]'"]
    assert not (tmp_path / "demo.png").exists()


def test_stream_and_models_over_mutual_tls_with_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki()
    server_cert, server_key = pki.issue("localhost", server=True).write(tmp_path, "server")
    client_cert, client_key = pki.issue("alice").write(tmp_path, "client")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca_pem)
    token = "alice-token-0123456789abcdef"
    (tmp_path / "token").write_text(token + "\n")
    settings = bundled_settings(
        tls_cert_file=server_cert, tls_key_file=server_key, tls_client_ca_file=ca,
        auth_tokens=f"alice:{token}",
    )  # fmt: skip
    tls = ["--tls-ca-file", str(ca), "--tls-cert-file", str(client_cert),
           "--tls-key-file", str(client_key)]  # fmt: skip
    with server_in_thread(settings) as server:
        target = ["--target", f"localhost:{server.grpc_port}"]
        assert main(["models", *target, *tls, "--token-file", str(tmp_path / "token")]) == 0
        assert "adding_lstm/1" in capsys.readouterr().out
        argv = ["stream", *target, *tls, "--model", "adding_lstm", "--sequences", "2"]
        assert main([*argv, "--token-file", str(tmp_path / "token"), "--chunk", "50"]) == 0
        assert "sequences wrong (|error| >= 0.04): 0 of 2" in capsys.readouterr().out
        assert main(argv) == 1  # no token: refused in one line
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("RNNSERVE_CLIENT_TOKEN", token)  # the token from the environment
        assert main([*argv, "--show", "0"]) == 0


def test_a_snapshot_directory_another_server_holds_is_one_clear_line(
    tiny_repository: Path, tmp_path: Path
) -> None:
    from service.server import hold_snapshot_directory

    held = hold_snapshot_directory(tmp_path / "state")  # as a running server holds it
    try:
        result = serve_until_it_fails(tiny_repository, "--snapshot-dir", str(tmp_path / "state"))
    finally:
        held.close()
    assert_one_clear_line(result, "in use by another rnnserve server", "--snapshot-dir")
    hold_snapshot_directory(tmp_path / "state").close()  # free again once released


def test_a_setting_out_of_range_names_its_flag_and_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--grpc-port", "70000"]) == 2  # a usage error, as argparse's
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "rnnserve: --grpc-port (RNNSERVE_GRPC_PORT): Input should be less than or equal to 65535"
    ]


def test_a_start_failure_in_json_mode_is_a_json_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--log-format", "json",
         "--model-repository", str(tmp_path / "nope"), "--snapshot-backend", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    last = json.loads(lines[-1])
    assert last["level"] == "ERROR" and "cannot start" in last["message"]
    assert all(json.loads(line) for line in lines)


def test_client_commands_default_to_the_port_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import cli

    monkeypatch.setenv("RNNSERVE_GRPC_PORT", "18123")
    args = cli.build_parser().parse_args(["models"])
    cli.default_target(args)
    assert args.target == "127.0.0.1:18123"


def test_a_snapshot_directory_in_the_shared_temp_dir_must_be_private(tmp_path: Path) -> None:
    from service.server import StartupError, hold_snapshot_directory

    shared = tmp_path / "open"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # as anyone could have made it first, readable by all
    with pytest.raises(StartupError, match="not this user's private one"):
        hold_snapshot_directory(shared)
    shared.chmod(0o700)
    hold_snapshot_directory(shared).close()
