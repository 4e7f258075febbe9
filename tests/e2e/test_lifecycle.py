"""The process edge: `cti-bridge run` starts, answers api/health, stops cleanly on SIGTERM and
SIGINT (exit 0), refuses a second instance on the same SQLite database, and the Dockerfile's steps
install and start the package in a fresh virtual environment."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cti_bridge.errors import ExitCode
from tests.e2e.process_helpers import cli

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTI_BRIDGE_")}
    env.update(
        CTI_BRIDGE_DATABASE_URL=f"sqlite:///{tmp_path / 'cti-bridge.db'}",
        CTI_BRIDGE_ADMIN_HOST="127.0.0.1",
        CTI_BRIDGE_ADMIN_PORT=str(port),
        CTI_BRIDGE_SECRET_KEY="lifecycle-test-secret-key-0123456789abcdef",
    )
    return env


def wait_healthy(port: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"exited early with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("api/health never answered")


RUN = [sys.executable, "-m", "cti_bridge", "run"]


def start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def healthy_then_stopped(
    cmd: list[str],
    env: dict[str, str],
    cwd: Path,
    port: int,
    sig: signal.Signals = signal.SIGTERM,
    timeout: float = 30.0,
) -> tuple[int, str]:
    """Start ``cmd``, wait for api/health, send ``sig``: its exit code and standard error."""
    proc = start(cmd, env, cwd)
    try:
        wait_healthy(port, proc, timeout=timeout)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_health_and_clean_stop(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    code, err = healthy_then_stopped(RUN, base_env(tmp_path, port), tmp_path, port, sig)
    assert code == 0, err
    assert "Traceback" not in err
    # Neither an operator token nor an allowed host: nobody can create an integration, said once.
    assert err.count("no integration can be created") == 1, err


def test_no_warning_when_an_integration_can_be_created(tmp_path: Path) -> None:
    port = free_port()
    env = dict(base_env(tmp_path, port), CTI_BRIDGE_ALLOWED_XELION_HOSTS="pbx.example.com")
    code, err = healthy_then_stopped(RUN, env, tmp_path, port)
    assert code == 0, err
    assert "no integration can be created" not in err


def test_second_instance_on_same_sqlite_fails_fast(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, port)
    first = start(RUN, env, tmp_path)
    try:
        wait_healthy(port, first)
        env2 = dict(env, CTI_BRIDGE_ADMIN_PORT=str(free_port()))
        t0 = time.monotonic()
        second = cli(["run"], env2, tmp_path, timeout=30)
        assert second.returncode == ExitCode.DATABASE
        assert "already running" in second.stderr
        assert time.monotonic() - t0 < 20  # fails fast rather than waiting on locks
        assert first.poll() is None  # the first one is unharmed
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0


def test_an_admin_port_in_use_is_exit_3_naming_it_before_anything_starts(tmp_path: Path) -> None:
    """The admin API's port taken by another program ended the start inside uvicorn (its
    ``sys.exit``), after the sources had started, with a traceback. It is now bound first: one
    line names the address, the system's reason and the settings; nothing else ran."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(5)
        port = taken.getsockname()[1]
        proc = cli(["run"], base_env(tmp_path, port), tmp_path, timeout=60)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in proc.stderr
    assert "CTI_BRIDGE_ADMIN_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr and "running" not in proc.stderr


def test_a_postgresql_that_accepts_and_never_answers_is_exit_4_with_the_reason(tmp_path: Path) -> None:
    """A server (or a PgBouncer in front of a dead one) that accepts the connection and never
    answers held the start for ever, with no line and no exit code. The pool's connect timeout
    (10 s) ends it: exit 4, and the driver's reason on the line."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(50)
        port = silent.getsockname()[1]
        env = dict(
            base_env(tmp_path, free_port()),
            CTI_BRIDGE_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing",
        )
        proc = cli(["run"], env, tmp_path, timeout=120)
    assert proc.returncode == ExitCode.DATABASE, proc.stderr
    assert "database unavailable: OperationalError: " in proc.stderr
    assert "timeout" in proc.stderr.lower()


def test_migrate_command(tmp_path: Path) -> None:
    env = base_env(tmp_path, free_port())
    proc = cli(["migrate"], env, tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cti-bridge.db").exists()


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^CMD \["cti-bridge", "run"\]$', text, re.M), "exec-form CMD"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "CTI_BRIDGE_ADMIN_HOST=0.0.0.0" in text
    assert re.search(r"^VOLUME \[\"/data\"\]$", text, re.M)
    assert "sqlite:////data/" in text


def test_the_images_healthcheck_follows_the_admin_port(tmp_path: Path) -> None:
    """The HEALTHCHECK asked port 8080 whatever CTI_BRIDGE_ADMIN_PORT said: a daemon on another port
    was reported unhealthy. The check, as the Dockerfile writes it, against a daemon on a free port."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    line = next(text for text in lines if text.startswith("HEALTHCHECK"))
    check = re.search(r'CMD python -c "(.*)" \|\| exit 1$', line)
    assert check is not None, line
    port = free_port()
    env = base_env(tmp_path, port)
    proc = start(RUN, env, tmp_path)
    try:
        wait_healthy(port, proc)
        ok = subprocess.run([sys.executable, "-c", check.group(1)], env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        elsewhere = dict(env, CTI_BRIDGE_ADMIN_PORT=str(free_port()))
        down = subprocess.run(
            [sys.executable, "-c", check.group(1)], env=elsewhere, capture_output=True, timeout=30
        )
        assert down.returncode != 0  # the check can fail: nothing listens there
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_dockerfile_steps_install_and_start_in_fresh_venv(tmp_path: Path) -> None:
    """Run the Dockerfile's own COPY and RUN steps (pip install of the package with the lock file) in a
    fresh virtual environment, outside the source tree, then start the installed `cti-bridge run`."""
    text = (ROOT / "Dockerfile").read_text()
    app = tmp_path / "app"
    app.mkdir()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, app / src, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(path, app / src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = re.search(r"/opt/venv/bin/pip install (.+?) \\$", text, re.M)
    assert install, "the Dockerfile installs with /opt/venv/bin/pip"
    args = install.group(1).split()
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *args], cwd=app, check=True, timeout=600)
    port = free_port()
    env = base_env(tmp_path, port)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    # From a directory without the sources: the installed package must carry its migrations.
    workdir = tmp_path / "data"
    workdir.mkdir()
    code, err = healthy_then_stopped(
        [str(venv / "bin" / "cti-bridge"), "run"], env, workdir, port, timeout=60
    )
    assert code == 0, err
