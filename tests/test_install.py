"""``rnnserve`` as a user installs it: a wheel (a non-editable ``pip install .``) serves the bundled
models from any directory, and session snapshots go to the XDG state directory, never to the
directory the server was started in."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from service.settings import DEFAULT_STATE_DIR, Settings, default_state_dir

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted(p.parent.parent.name for p in (ROOT / "models").glob("*/*/model.onnx"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with rnnserve installed from its wheel (its dependencies seen in this
    environment's site directories); returns its bin directory."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy, so that the build writes nothing into the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("service", "training", "models"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp / "dist"),
         str(source)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("rnnserve-*.whl")
    environment = tmp / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    # The dependencies: this environment's site directories, after the new one's own (a .pth file
    # adds them; the .pth files in them, an editable install's among them, are not run).
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (Path(site_dir) / "dependencies.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    shutil.rmtree(source)  # nothing of the checkout is left to fall back on
    return environment / "bin"


def test_the_installed_default_repository_holds_the_bundled_models(
    installed: Path, tmp_path: Path
) -> None:
    """The default model repository is package data inside the installed package, and every
    bundled model reads there (model.json checked, model.onnx hashed)."""
    script = (
        "import json, service.settings as s, service.repository as r; "
        "root = s.Settings().model_repository; "
        "print(json.dumps([str(root), [r.read_spec(d).name for d in r.discover(root)]]))"
    )
    result = subprocess.run(
        [str(installed / "python"), "-c", script],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    root, names = json.loads(result.stdout)
    assert Path(root).is_relative_to(installed.parent), root  # the venv's copy, not the checkout
    assert sorted(names) == BUNDLED


def test_the_installed_package_moves_state_on_the_device(installed: Path, tmp_path: Path) -> None:
    """state_residency=device needs the companion graphs (package data) and no torch or onnx."""
    script = (
        "import numpy as np, sys; from service.state_bank import DeviceStateBank, CPU_DEVICE; "
        "b = DeviceStateBank(fills=[np.zeros((1, 2))], capacity=2, device=CPU_DEVICE); "
        "b.write(1, [np.ones((1, 2), np.float32)]); b.grow(4); "
        "assert b.read([1])[0].tolist() == [[[1.0, 1.0]]]; "
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules; print('ok')"
    )
    result = subprocess.run(
        [str(installed / "python"), "-c", script],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_installed_command_serves_the_bundled_models_and_keeps_state_out_of_the_cwd(
    installed: Path, tmp_path: Path
) -> None:
    cwd, home = tmp_path / "anywhere", tmp_path / "home"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RNNSERVE_", "XDG_"))}
    env |= {"HOME": str(home), "PYTHONUNBUFFERED": "1"}
    rnnserve = str(installed / "rnnserve")
    port_file = tmp_path / "ports.json"
    process = subprocess.Popen(
        [rnnserve, "serve", "--grpc-port", "0", "--metrics-port", "0", "--port-file",
         str(port_file), "--log-format", "json", "--intra-op-threads", "1"],
        cwd=cwd, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        for line in process.stderr:  # until the server logs that it serves (or exits)
            if "serving" in json.loads(line)["message"]:
                break
        else:
            pytest.fail(f"rnnserve serve exited with {process.wait()} before serving")
        target = f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"
        listed = subprocess.run(
            [rnnserve, "models", "--target", target],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        for name in BUNDLED:
            assert name in listed.stdout, listed.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0
    assert list(cwd.iterdir()) == []  # nothing written where it was started
    assert (home / ".local" / "state" / "rnnserve").is_dir()


def no_password_entry(uid: int) -> None:
    raise KeyError(uid)


def test_the_state_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "rnnserve"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # not absolute: ignored, as XDG says
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "rnnserve"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "rnnserve"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.delenv("HOME")
    monkeypatch.setattr("pwd.getpwuid", no_password_entry)
    assert default_state_dir().is_absolute()  # no home at all: still never the cwd


def test_the_state_directory_default_is_absolute_and_the_settings_default() -> None:
    assert DEFAULT_STATE_DIR.is_absolute()
    assert Settings.model_fields["snapshot_dir"].default == DEFAULT_STATE_DIR
