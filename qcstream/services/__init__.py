"""Local Kafka and MinIO for development and tests: ``up``, ``down``, ``status``.

Downloaded and built programs are cached in ``settings.home`` (Kafka jars in
``kafka-4.1.1/``, the MinIO binary in ``minio/bin/``). What the running
services write (pid files, logs, Kafka's log segments, MinIO's objects) goes to
the run folder: ``$QCSTREAM_RUN_DIR`` when set, else ``settings.home / "run"``.
Several run folders can share one cache, as long as their ports differ.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from types import ModuleType

from qcstream.services import kafka, minio
from qcstream.services.process import (
    MissingToolError,
    PortInUseError,
    ServiceError,
    port_is_free,
)
from qcstream.settings import ENV_PREFIX, Settings

logger = logging.getLogger(__name__)

__all__ = [
    "MissingToolError",
    "PortInUseError",
    "RUN_DIR_ENV",
    "ServiceError",
    "ServiceStatus",
    "down",
    "run_root",
    "status",
    "up",
]

#: Environment variable that moves the run folder away from ``settings.home / "run"``.
RUN_DIR_ENV = ENV_PREFIX + "RUN_DIR"

_SERVICES: tuple[ModuleType, ...] = (kafka, minio)
_DISPLAY_NAMES = {kafka.NAME: "Kafka", minio.NAME: "MinIO"}


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """State of one local service.

    ``running`` is true only when the process is alive and passes its
    readiness check; ``pid`` is set whenever our process is alive.
    """

    name: str
    running: bool
    pid: int | None
    address: str
    detail: str


def run_root(settings: Settings) -> Path:
    """Return the folder for pid files, logs and service data."""
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value).expanduser() if value else settings.home / "run"


def _install(settings: Settings) -> None:
    kafka.fetch(settings)
    minio.build(settings)


def up(settings: Settings | None = None) -> Settings:
    """Start the local Kafka and MinIO, fetching or building them on first use.

    Does nothing to a service that is already running and responding. When a
    service fails to start, stops the services this call started and raises
    :class:`ServiceError` with the failing service's log. Returns the settings
    with the MinIO secret key filled in (it may have just been generated).
    """
    settings = settings or Settings.from_env()
    root = run_root(settings)
    logger.info("Local services: cache %s, run folder %s", settings.home, root)
    _install(settings)
    secret = minio.ensure_secret(settings)

    started: dict[str, tuple[int, float]] = {}
    try:
        for service in _SERVICES:
            _start_or_reuse(service, settings, root, started)
        _wait_for_started(settings, root, started)
    except ServiceError:
        for service in _SERVICES:
            if service.NAME in started:
                service.stop(root)
        raise

    return dataclasses.replace(settings, minio_secret_key=secret)


def _start_or_reuse(
    service: ModuleType, settings: Settings, root: Path, started: dict[str, tuple[int, float]]
) -> None:
    """Start ``service`` unless its process is running; record a start in ``started``."""
    label = _DISPLAY_NAMES[service.NAME]
    pid = service.current_pid(root)
    if pid is None:
        service.check_ports(settings)
        started[service.NAME] = (service.start(settings, root), time.monotonic())
    elif service.is_ready(settings):
        logger.info("%s already running (pid %d) on %s", label, pid, service.address(settings))
    else:
        logger.info("%s is running (pid %d) but not responding yet; waiting", label, pid)
        service.wait_ready(settings, root, pid)


def _wait_for_started(settings: Settings, root: Path, started: dict[str, tuple[int, float]]) -> None:
    """Wait until each service started by this ``up`` responds; ``started`` maps names to pid and start time."""
    for service in _SERVICES:
        if service.NAME not in started:
            continue
        pid, start_time = started[service.NAME]
        service.wait_ready(settings, root, pid)
        logger.info(
            "%s ready on %s after %.1f s",
            _DISPLAY_NAMES[service.NAME], service.address(settings), time.monotonic() - start_time,
        )


def down(settings: Settings | None = None) -> None:
    """Stop the local Kafka and MinIO started by :func:`up` and remove their pid files."""
    settings = settings or Settings.from_env()
    root = run_root(settings)
    for service in reversed(_SERVICES):
        service.stop(root)


def _status_of(service: ModuleType, settings: Settings, root: Path) -> ServiceStatus:
    address = service.address(settings)
    pid = service.current_pid(root, remove_stale=False)

    if pid is None:
        pid_file = service.pid_path(root)
        if pid_file.exists():
            detail = f"not running; stale pid file {pid_file} (the process is gone or the pid is reused)"
        else:
            detail = "not running"
        host, port = address.rsplit(":", 1)
        if not port_is_free(host, int(port)):
            detail += f"; port {port} is in use by another program"
        return ServiceStatus(service.NAME, False, None, address, detail)

    if service.is_ready(settings):
        return ServiceStatus(service.NAME, True, pid, address, f"ready; log {service.log_path(root)}")
    return ServiceStatus(
        service.NAME, False, pid, address, f"process alive but not responding; log {service.log_path(root)}"
    )


def status(settings: Settings | None = None) -> dict[str, ServiceStatus]:
    """Report each local service by name (``"kafka"``, ``"minio"``); changes nothing."""
    settings = settings or Settings.from_env()
    root = run_root(settings)
    return {service.NAME: _status_of(service, settings, root) for service in _SERVICES}
