"""Background processes for the local services: start, find, wait for, stop.

A service started here outlives the Python process that started it (it runs
in its own session), so it is found again through its pid file. A pid file is
trusted only while ``/proc/<pid>/cmdline`` still contains the service's marker
(a path unique to its run folder): a pid reused by another program, or a
process that is gone, makes the pid file stale.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Install command for the missing tools (Debian package names).
INSTALL_HINT = "apt-get install openjdk-17-jre-headless maven golang"

#: Popen objects of the services this Python process started, by pid, so that
#: a stopped child is reaped instead of lingering as a zombie.
_children: dict[int, subprocess.Popen] = {}


class ServiceError(RuntimeError):
    """A local service could not be fetched, built, started or stopped."""


class MissingToolError(ServiceError):
    """A program the local services need (java, mvn, go) is not installed."""


class PortInUseError(ServiceError):
    """A port the local services need is taken by another program."""


def require_tool(name: str) -> str:
    """Return the full path of program ``name``, or raise :class:`MissingToolError`."""
    path = shutil.which(name)
    if path is None:
        raise MissingToolError(
            f"'{name}' was not found on PATH; the local Kafka and MinIO need java, mvn and go. "
            f"Install them with: {INSTALL_HINT}"
        )
    return path


def log_tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file, or a note when it is missing."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log file at {path})"
    return "\n".join(text.splitlines()[-lines:])


def failure_message(summary: str, log_path: Path) -> str:
    """Return ``summary`` followed by the log path and the log's last lines."""
    return f"{summary}\nLog file: {log_path}\nLast lines of the log:\n{log_tail(log_path)}"


def _rotate_log(log_path: Path) -> None:
    """Keep the previous run's log as ``<name>.1`` so each start has a fresh log."""
    if log_path.exists():
        log_path.replace(log_path.with_name(log_path.name + ".1"))


def start_process(
    argv: Sequence[str],
    *,
    name: str,
    log_path: Path,
    pid_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` in the background with stdout and stderr in ``log_path``.

    Writes the pid to ``pid_path`` and returns it. The process gets its own
    session, so it keeps running after this Python process exits.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    _rotate_log(log_path)

    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    _children[child.pid] = child

    tmp_path = pid_path.with_name(pid_path.name + ".tmp")
    tmp_path.write_text(f"{child.pid}\n")
    tmp_path.replace(pid_path)
    logger.info("Started %s (pid %d), log %s", name, child.pid, log_path)
    return child.pid


def read_pid(pid_path: Path) -> int | None:
    """Return the pid stored in ``pid_path``, or None when there is none."""
    try:
        text = pid_path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        pid = int(text)
    except ValueError:
        logger.warning("Invalid pid file %s (contains %r); treating it as stale", pid_path, text[:40])
        return None
    return pid if pid > 0 else None


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our exited child."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _children[pid]
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _process_state(pid: int) -> str | None:
    """Return the state letter from ``/proc/<pid>/stat`` (``Z`` for a zombie), or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rfind(")") + 1 :].split()  # the command name before ')' may contain spaces
    return fields[0] if fields else None


def process_cmdline(pid: int) -> list[str] | None:
    """Return the command line of a live process, or None when it is gone or a zombie.

    Right after exec, ``/proc/<pid>/cmdline`` can read empty for a moment (seen
    on this project's machines), so an empty one is read again for up to a
    second before this returns an empty list.
    """
    _reap(pid)
    deadline = time.monotonic() + 1.0
    while True:
        state = _process_state(pid)
        if state is None or state == "Z":
            return None
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        if raw:
            return raw.rstrip(b"\0").decode(errors="replace").split("\0")
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.01)


def pid_matches(pid: int, marker: str) -> bool:
    """Tell whether ``pid`` is alive and ``marker`` is one of its command-line arguments."""
    cmdline = process_cmdline(pid)
    return cmdline is not None and marker in cmdline


def running_pid(pid_path: Path, marker: str, *, remove_stale: bool = True) -> int | None:
    """Return the pid from ``pid_path`` if that process is still ours and alive.

    A stale pid file (process gone, or the pid now belongs to a program whose
    command line lacks ``marker``) yields None and is removed when
    ``remove_stale`` is true.
    """
    pid = read_pid(pid_path)
    if pid is not None and pid_matches(pid, marker):
        return pid

    if pid_path.exists() and remove_stale:
        logger.info("Removing stale pid file %s (pid %s is gone or not ours)", pid_path, pid)
        pid_path.unlink(missing_ok=True)
    return None


def _wait_gone(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_matches(pid, marker):
            return True
        time.sleep(0.2)
    return not pid_matches(pid, marker)


def stop_process(pid_path: Path, marker: str, *, name: str, timeout: float = 20.0) -> bool:
    """Stop the process in ``pid_path``: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

    Returns True when a running process was stopped, False when none was
    running. The pid file is removed either way.
    """
    pid = running_pid(pid_path, marker)
    if pid is None:
        logger.info("%s is not running", name)
        return False

    logger.info("Stopping %s (pid %d)", name, pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not _wait_gone(pid, marker, timeout):
        logger.warning("%s (pid %d) did not stop within %.0f s; sending SIGKILL", name, pid, timeout)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not _wait_gone(pid, marker, 10.0):
            raise ServiceError(f"{name} (pid {pid}) is still running after SIGKILL; check it with 'ps -p {pid}'")

    pid_path.unlink(missing_ok=True)
    logger.info("Stopped %s (pid %d)", name, pid)
    return True


def port_is_free(host: str, port: int) -> bool:
    """Tell whether nothing listens on ``host:port`` (by trying to bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def ensure_port_free(host: str, port: int, *, service: str, env_var: str) -> None:
    """Raise :class:`PortInUseError` naming the port and the variable that moves it."""
    if not port_is_free(host, port):
        raise PortInUseError(
            f"Port {port} on {host}, needed by {service}, is already in use by another program. "
            f"Stop that program or choose another port with the environment variable {env_var}."
        )


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Wait until a TCP connection to ``host:port`` succeeds; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def wait_until_ready(
    *,
    name: str,
    pid: int,
    marker: str,
    is_ready: Callable[[], bool],
    log_path: Path,
    timeout: float,
) -> float:
    """Poll ``is_ready`` until it returns True; return the seconds waited.

    ``timeout`` counts from this call.

    Raises :class:`ServiceError` with the log's last lines when the process
    exits first or ``timeout`` passes.
    """
    started = time.monotonic()
    while True:
        if not pid_matches(pid, marker):
            raise ServiceError(failure_message(f"{name} (pid {pid}) exited during start-up.", log_path))
        if is_ready():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            raise ServiceError(
                failure_message(f"Timed out after {timeout:.0f} s waiting for {name} (pid {pid}) to become ready.", log_path)
            )
        time.sleep(0.5)
