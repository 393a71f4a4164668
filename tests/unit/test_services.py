"""Unit tests for qcstream.services: pid files, stopping, ports, config rendering, the secret.

Processes here are real (small Python programs); no Kafka or MinIO is started.
"""

from __future__ import annotations

import base64
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcstream import services
from qcstream.services import kafka, minio, process
from qcstream.settings import Settings

SLEEPER = "import time; time.sleep(120)"
TERM_IGNORER = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('handler installed', flush=True); time.sleep(120)"
)


@pytest.fixture()
def env_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Return a factory of Settings read from a clean environment with home in tmp_path."""
    for name in list(os.environ):
        if name.startswith("QCSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QCSTREAM_HOME", str(tmp_path / "home"))

    def make(**env: str) -> Settings:
        for key, value in env.items():
            monkeypatch.setenv("QCSTREAM_" + key, value)
        return Settings.from_env()

    return make


def _start_python(tmp_path: Path, code: str) -> tuple[int, Path, str]:
    """Start ``python -c code <marker>`` with the helpers under test; return pid, pid file, marker."""
    marker = str(tmp_path / "service-marker")
    pid_file = tmp_path / "svc.pid"
    pid = process.start_process(
        [sys.executable, "-c", code, marker],
        name="test service",
        log_path=tmp_path / "svc.log",
        pid_path=pid_file,
    )
    return pid, pid_file, marker


def _wait_for_text(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never appeared in {path}")
        time.sleep(0.05)


def _dead_pid() -> int:
    """Return the pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- pid files and stopping ------------------------------------------------


def test_pid_file_finds_and_stops_process(tmp_path: Path) -> None:
    pid, pid_file, marker = _start_python(tmp_path, SLEEPER)

    assert pid_file.read_text().strip() == str(pid)
    assert process.running_pid(pid_file, marker) == pid

    assert process.stop_process(pid_file, marker, name="test service", timeout=10) is True
    assert not pid_file.exists()
    assert process.process_cmdline(pid) is None
    assert process.stop_process(pid_file, marker, name="test service") is False


def test_exited_process_pid_file_stale(tmp_path: Path) -> None:
    pid_file = tmp_path / "svc.pid"
    pid_file.write_text(f"{_dead_pid()}\n")

    assert process.running_pid(pid_file, "/any/marker") is None
    assert not pid_file.exists()


def test_reused_pid_is_stale(tmp_path: Path) -> None:
    pid_file = tmp_path / "svc.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # alive, but this test run is not the service

    assert process.running_pid(pid_file, str(tmp_path / "marker"), remove_stale=False) is None
    assert pid_file.exists()
    assert process.running_pid(pid_file, str(tmp_path / "marker")) is None
    assert not pid_file.exists()


def test_marker_matches_whole_argument(tmp_path: Path) -> None:
    pid, pid_file, marker = _start_python(tmp_path, SLEEPER)
    try:
        assert process.pid_matches(pid, marker)
        assert not process.pid_matches(pid, marker[:-1])  # a prefix of another run folder's path
    finally:
        process.stop_process(pid_file, marker, name="test service", timeout=10)


def test_fresh_process_matches_marker(tmp_path: Path) -> None:
    for attempt in range(20):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        pid, pid_file, marker = _start_python(folder, SLEEPER)
        try:
            assert process.pid_matches(pid, marker)  # read right after exec, when cmdline may be empty
        finally:
            process.stop_process(pid_file, marker, name="test service", timeout=10)


def test_process_state_of_live_and_exited(tmp_path: Path) -> None:
    assert process._process_state(os.getpid()) in {"R", "S"}
    assert process._process_state(_dead_pid()) is None


@pytest.mark.parametrize("content", ["", "not-a-pid\n", "-5\n"])
def test_invalid_pid_file_means_no_process(tmp_path: Path, content: str) -> None:
    pid_file = tmp_path / "svc.pid"
    pid_file.write_text(content)

    assert process.read_pid(pid_file) is None
    assert process.running_pid(pid_file, "/any/marker") is None
    assert not pid_file.exists()


def test_sigterm_ignored_then_killed(tmp_path: Path) -> None:
    pid, pid_file, marker = _start_python(tmp_path, TERM_IGNORER)
    _wait_for_text(tmp_path / "svc.log", "handler installed")

    assert process.stop_process(pid_file, marker, name="test service", timeout=1.0) is True
    assert process.process_cmdline(pid) is None
    assert not pid_file.exists()


def test_start_keeps_previous_log(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text("previous run\n")
    pid, pid_file, marker = _start_python(tmp_path, "print('this run')")

    assert (tmp_path / "svc.log.1").read_text() == "previous run\n"
    _wait_for_text(log, "this run")


# --- readiness and failures -------------------------------------------------


def test_exit_during_start_reports_log(tmp_path: Path) -> None:
    code = "import sys; [print('line', i) for i in range(30)]; print('bad config: no such listener'); sys.exit(3)"
    pid, pid_file, marker = _start_python(tmp_path, code)

    with pytest.raises(process.ServiceError) as caught:
        process.wait_until_ready(
            name="test service", pid=pid, marker=marker, is_ready=lambda: False,
            log_path=tmp_path / "svc.log", timeout=30,
        )
    message = str(caught.value)
    assert "exited during start-up" in message
    assert str(tmp_path / "svc.log") in message
    assert "bad config: no such listener" in message
    assert "line 29" in message
    assert "line 5\n" not in message  # only the last 20 lines


def test_never_ready_times_out(tmp_path: Path) -> None:
    pid, pid_file, marker = _start_python(tmp_path, SLEEPER)
    try:
        with pytest.raises(process.ServiceError, match="Timed out after 1 s waiting for test service"):
            process.wait_until_ready(
                name="test service", pid=pid, marker=marker, is_ready=lambda: False,
                log_path=tmp_path / "svc.log", timeout=1,
            )
    finally:
        process.stop_process(pid_file, marker, name="test service", timeout=10)


def test_ready_check_passes_eventually(tmp_path: Path) -> None:
    pid, pid_file, marker = _start_python(tmp_path, SLEEPER)
    results = iter([False, False, True])
    try:
        waited = process.wait_until_ready(
            name="test service", pid=pid, marker=marker, is_ready=lambda: next(results),
            log_path=tmp_path / "svc.log", timeout=30,
        )
        assert waited >= 0
        assert next(results, "used up") == "used up"
    finally:
        process.stop_process(pid_file, marker, name="test service", timeout=10)


# --- ports and tools ----------------------------------------------------------


def test_taken_port_names_variable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        assert not process.port_is_free("127.0.0.1", port)
        assert process.wait_for_port("127.0.0.1", port, timeout=0)
        with pytest.raises(process.PortInUseError) as caught:
            process.ensure_port_free("127.0.0.1", port, service="Kafka", env_var="QCSTREAM_KAFKA_PORT")
        assert f"Port {port}" in str(caught.value)
        assert "QCSTREAM_KAFKA_PORT" in str(caught.value)

    assert process.port_is_free("127.0.0.1", port)
    assert not process.wait_for_port("127.0.0.1", port, timeout=0)
    process.ensure_port_free("127.0.0.1", port, service="Kafka", env_var="QCSTREAM_KAFKA_PORT")


@pytest.mark.parametrize("tool", ["java", "mvn", "go"])
def test_missing_tool_names_install_command(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(process.MissingToolError) as caught:
        process.require_tool(tool)
    assert f"'{tool}'" in str(caught.value)
    assert "apt-get install openjdk-17-jre-headless maven golang" in str(caught.value)


def test_fetch_without_maven_fails_early(
    env_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = env_settings()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))

    with pytest.raises(process.MissingToolError, match="'mvn'"):
        kafka.fetch(settings)
    assert not kafka.cache_dir(settings).exists()


# --- Kafka config -------------------------------------------------------------


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_server_properties_single_kraft_node(env_settings, tmp_path: Path) -> None:
    settings = env_settings(KAFKA_PORT="19092", KAFKA_CONTROLLER_PORT="19999")
    props = _properties(kafka.render_server_properties(settings, tmp_path / "data"))

    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == f"{props['node.id']}@127.0.0.1:19999"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19999"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"] == str(tmp_path / "data")
    assert props["num.partitions"] == "4"
    assert props["auto.create.topics.enable"] == "true"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert "message.max.bytes" not in props


def test_controller_port_default_broker_plus_one(env_settings, tmp_path: Path) -> None:
    settings = env_settings(KAFKA_PORT="29092")
    props = _properties(kafka.render_server_properties(settings, tmp_path))

    assert "CONTROLLER://127.0.0.1:29093" in props["listeners"]


def test_cluster_id_format() -> None:
    ids = {kafka.new_cluster_id() for _ in range(200)}

    assert len(ids) == 200
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_fetch_marker_controls_fetch(env_settings) -> None:
    settings = env_settings()
    assert not kafka.is_fetched(settings)

    kafka.libs_dir(settings).mkdir(parents=True)
    assert not kafka.is_fetched(settings)  # an interrupted fetch leaves no marker
    (kafka.cache_dir(settings) / ".fetch-complete").write_text("done\n")
    assert kafka.is_fetched(settings)


def test_java_command_uses_cached_jars(env_settings, tmp_path: Path) -> None:
    settings = env_settings()
    argv = kafka._java_argv(settings, tmp_path, "kafka.Kafka", "server.properties")

    assert argv[argv.index("-cp") + 1] == f"{kafka.libs_dir(settings)}/*"
    assert argv[-2:] == ["kafka.Kafka", "server.properties"]
    assert "-Xmx768m" in argv


# --- MinIO config and secret --------------------------------------------------


def test_minio_argv_loopback_ports(env_settings, tmp_path: Path) -> None:
    settings = env_settings(MINIO_ENDPOINT="127.0.0.1:19000", MINIO_CONSOLE_PORT="19001")
    argv = minio.server_argv(settings, tmp_path)

    assert argv[:3] == [str(minio.binary_path(settings)), "server", str(tmp_path / "minio" / "data")]
    assert argv[argv.index("--address") + 1] == "127.0.0.1:19000"
    assert argv[argv.index("--console-address") + 1] == "127.0.0.1:19001"


def test_minio_env_credentials_no_updates(env_settings) -> None:
    settings = env_settings(MINIO_ACCESS_KEY="camera-station")
    env = minio.server_env(settings, "s3cret-value-123")

    assert env["MINIO_ROOT_USER"] == "camera-station"
    assert env["MINIO_ROOT_PASSWORD"] == "s3cret-value-123"
    assert env["MINIO_UPDATE"] == "off"


def test_secret_generated_once_mode_0600(env_settings) -> None:
    settings = env_settings()
    assert settings.minio_secret_key == ""

    secret = minio.ensure_secret(settings)
    secret_file = settings.minio_secret_file
    assert len(secret) >= minio.MIN_SECRET_KEY_LENGTH
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

    reread = Settings.from_env()
    assert reread.minio_secret_key == secret
    assert minio.ensure_secret(reread) == secret
    assert minio.ensure_secret(settings) == secret  # stale settings still get the written key


def test_env_secret_writes_no_file(env_settings) -> None:
    settings = env_settings(MINIO_SECRET_KEY="from-the-environment")

    assert minio.ensure_secret(settings) == "from-the-environment"
    assert not settings.minio_secret_file.exists()


def test_short_secret_rejected_not_shown(env_settings) -> None:
    settings = env_settings(MINIO_SECRET_KEY="abc1234")

    with pytest.raises(process.ServiceError) as caught:
        minio.ensure_secret(settings)
    assert "7 characters" in str(caught.value)
    assert "abc1234" not in str(caught.value)


def test_minio_rebuilt_for_other_version(env_settings) -> None:
    settings = env_settings()
    minio.bin_dir(settings).mkdir(parents=True)
    minio.binary_path(settings).write_bytes(b"")
    assert not minio.is_built(settings)

    (minio.bin_dir(settings) / "minio.version").write_text("v0.0.0-older\n")
    assert not minio.is_built(settings)
    (minio.bin_dir(settings) / "minio.version").write_text(minio.MINIO_VERSION + "\n")
    assert minio.is_built(settings)


# --- run folder and status ----------------------------------------------------


def test_run_folder_default_and_override(
    env_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = env_settings()
    assert services.run_root(settings) == settings.home / "run"

    monkeypatch.setenv(services.RUN_DIR_ENV, str(tmp_path / "elsewhere"))
    assert services.run_root(settings) == tmp_path / "elsewhere"


def test_status_reports_stale_pid_file(
    env_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = env_settings()
    root = tmp_path / "run"
    monkeypatch.setenv(services.RUN_DIR_ENV, str(root))
    kafka.pid_path(root).parent.mkdir(parents=True)
    kafka.pid_path(root).write_text(f"{_dead_pid()}\n")

    report = services.status(settings)

    assert set(report) == {"kafka", "minio"}
    assert report["kafka"].running is False
    assert report["kafka"].pid is None
    assert "stale pid file" in report["kafka"].detail
    assert kafka.pid_path(root).exists()
    assert report["minio"].detail.startswith("not running")
    assert report["minio"].address == f"127.0.0.1:{settings.minio_port}"


def test_same_broker_and_controller_port_rejected(env_settings) -> None:
    settings = env_settings(KAFKA_PORT="19092", KAFKA_CONTROLLER_PORT="19092")

    with pytest.raises(process.ServiceError, match="both 19092"):
        kafka.check_ports(settings)


def test_same_minio_api_and_console_port_rejected(env_settings) -> None:
    settings = env_settings(MINIO_ENDPOINT="127.0.0.1:19000", MINIO_CONSOLE_PORT="19000")

    with pytest.raises(process.ServiceError, match="both use port 19000"):
        minio.check_ports(settings)


def _fake_go(tmp_path, version_line: str) -> str:
    script = tmp_path / "go"
    script.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    script.chmod(0o755)
    return str(script)


def test_old_go_rejected_with_version(tmp_path):
    from qcstream.services.minio import _check_go_version
    from qcstream.services.process import ServiceError

    with pytest.raises(ServiceError, match="Go 1.19 .* needs Go 1.24 or newer"):
        _check_go_version(_fake_go(tmp_path, "go version go1.19.8 linux/amd64"))


def test_recent_go_accepted(tmp_path):
    from qcstream.services.minio import _check_go_version

    _check_go_version(_fake_go(tmp_path, "go version go1.26.8 linux/amd64"))
