"""Local MinIO on 127.0.0.1, built from source with ``go install``.

The binary is cached in ``settings.home / "minio" / "bin"``; the object data
lives in a run folder. The root password is the MinIO secret key: taken from
``QCSTREAM_MINIO_SECRET_KEY``, else from the local secret file, else generated
once into that file (mode 0600). It is never logged.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from qcstream.services.process import (
    ServiceError,
    ensure_port_free,
    failure_message,
    require_tool,
    running_pid,
    start_process,
    stop_process,
    wait_until_ready,
)
from qcstream.settings import Settings, local_secret_file

logger = logging.getLogger(__name__)

NAME = "minio"
MINIO_MODULE = "github.com/minio/minio"
#: Pinned MinIO source; the Go module proxy serves it only by this pseudo-version.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
HOST = "127.0.0.1"
READY_TIMEOUT = 60.0
#: MinIO rejects root users shorter than 3 and passwords shorter than 8 characters
#: (internal/auth/credentials.go in the pinned source).
MIN_ACCESS_KEY_LENGTH = 3
MIN_SECRET_KEY_LENGTH = 8


# --- cache: the binary ----------------------------------------------------


def bin_dir(settings: Settings) -> Path:
    return settings.home / "minio" / "bin"


def binary_path(settings: Settings) -> Path:
    return bin_dir(settings) / "minio"


def _version_file(settings: Settings) -> Path:
    return bin_dir(settings) / "minio.version"


def is_built(settings: Settings) -> bool:
    """Tell whether the cached binary exists and was built from the pinned version."""
    version_file = _version_file(settings)
    return (
        binary_path(settings).exists()
        and version_file.exists()
        and version_file.read_text().strip() == MINIO_VERSION
    )


def build(settings: Settings) -> None:
    """Build MinIO with ``go install`` into the cache unless it is already there."""
    if is_built(settings):
        logger.debug("MinIO %s already built at %s", MINIO_VERSION, binary_path(settings))
        return

    go = require_tool("go")
    _check_go_version(go)
    target = bin_dir(settings)
    target.mkdir(parents=True, exist_ok=True)
    build_log = target.parent / "build.log"
    env = dict(os.environ, GOBIN=str(target))

    logger.info(
        "Building MinIO %s@%s into %s (first run only, takes a few minutes); log %s",
        MINIO_MODULE, MINIO_VERSION, target, build_log,
    )
    started = time.monotonic()
    with open(build_log, "wb") as log_file:
        result = subprocess.run(
            [go, "install", f"{MINIO_MODULE}@{MINIO_VERSION}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=target,
        )
    if result.returncode != 0 or not binary_path(settings).exists():
        raise ServiceError(
            failure_message(
                f"'go install {MINIO_MODULE}@{MINIO_VERSION}' failed. MinIO needs a recent Go "
                "(see the go line of its go.mod in the log).",
                build_log,
            )
        )
    _version_file(settings).write_text(MINIO_VERSION + "\n")
    logger.info("Built MinIO in %.1f s", time.monotonic() - started)


# --- the secret key -------------------------------------------------------


def ensure_secret(settings: Settings) -> str:
    """Return the MinIO secret key, creating the local secret file on first use.

    ``settings.minio_secret_key`` already contains the environment variable or
    the file's content; only when both are missing is a new key generated.
    """
    secret = settings.minio_secret_key
    if not secret:
        secret_file = local_secret_file(settings.home)
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32)
        try:
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # written since the settings were read: use that one
            return secret_file.read_text().strip()
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        logger.info("Generated a MinIO secret key in %s (mode 0600)", secret_file)

    if len(secret) < MIN_SECRET_KEY_LENGTH:
        raise ServiceError(
            f"The MinIO secret key has {len(secret)} characters; MinIO needs at least "
            f"{MIN_SECRET_KEY_LENGTH}. Set a longer QCSTREAM_MINIO_SECRET_KEY, or unset it to use a generated one."
        )
    if len(settings.minio_access_key) < MIN_ACCESS_KEY_LENGTH:
        raise ServiceError(
            f"The MinIO access key {settings.minio_access_key!r} is shorter than {MIN_ACCESS_KEY_LENGTH} "
            "characters; set a longer QCSTREAM_MINIO_ACCESS_KEY."
        )
    return secret


# --- run folder: process --------------------------------------------------


def run_dir(run_root: Path) -> Path:
    return run_root / NAME


def data_dir(run_root: Path) -> Path:
    return run_dir(run_root) / "data"


def log_path(run_root: Path) -> Path:
    return run_dir(run_root) / "minio.log"


def pid_path(run_root: Path) -> Path:
    return run_dir(run_root) / "minio.pid"


def marker(run_root: Path) -> str:
    """Return the command-line argument that identifies the server's process."""
    return str(data_dir(run_root))


def address(settings: Settings) -> str:
    return f"{HOST}:{settings.minio_port}"


def server_argv(settings: Settings, run_root: Path) -> list[str]:
    return [
        str(binary_path(settings)),
        "server",
        str(data_dir(run_root)),
        "--address",
        address(settings),
        "--console-address",
        f"{HOST}:{settings.minio_console_port}",
    ]


def server_env(settings: Settings, secret: str) -> dict[str, str]:
    """Return the server's environment: root credentials, no update checks, no call-home."""
    return dict(
        os.environ,
        MINIO_ROOT_USER=settings.minio_access_key,
        MINIO_ROOT_PASSWORD=secret,
        MINIO_UPDATE="off",
        MINIO_CALLHOME_ENABLE="off",
    )


def check_ports(settings: Settings) -> None:
    """Raise a clear error when the API's or the console's port is unusable."""
    if settings.minio_port == settings.minio_console_port:
        raise ServiceError(
            f"The MinIO API (QCSTREAM_MINIO_ENDPOINT) and console (QCSTREAM_MINIO_CONSOLE_PORT) both use port "
            f"{settings.minio_port}; give the console another port."
        )
    ensure_port_free(HOST, settings.minio_port, service="MinIO", env_var="QCSTREAM_MINIO_ENDPOINT")
    ensure_port_free(
        HOST, settings.minio_console_port, service="the MinIO console", env_var="QCSTREAM_MINIO_CONSOLE_PORT"
    )


def start(settings: Settings, run_root: Path) -> int:
    """Start the server with the secret from :func:`ensure_secret`; return its pid."""
    secret = ensure_secret(settings)
    data_dir(run_root).mkdir(parents=True, exist_ok=True)
    return start_process(
        server_argv(settings, run_root),
        name="MinIO",
        log_path=log_path(run_root),
        pid_path=pid_path(run_root),
        env=server_env(settings, secret),
        cwd=run_dir(run_root),
    )


def is_ready(settings: Settings) -> bool:
    """Tell whether ``/minio/health/ready`` returns HTTP 200."""
    url = f"http://{address(settings)}/minio/health/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # Loopback traffic must not go through a proxy.
    try:
        with opener.open(url, timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        logger.debug("MinIO at %s not ready yet: %s", address(settings), exc)
        return False


def wait_ready(settings: Settings, run_root: Path, pid: int, timeout: float = READY_TIMEOUT) -> float:
    """Wait until the server reports ready; return the seconds waited."""
    return wait_until_ready(
        name=f"MinIO on {address(settings)}",
        pid=pid,
        marker=marker(run_root),
        is_ready=lambda: is_ready(settings),
        log_path=log_path(run_root),
        timeout=timeout,
    )


def current_pid(run_root: Path, *, remove_stale: bool = True) -> int | None:
    return running_pid(pid_path(run_root), marker(run_root), remove_stale=remove_stale)


def stop(run_root: Path) -> bool:
    return stop_process(pid_path(run_root), marker(run_root), name="MinIO")


#: Oldest Go that builds the pinned MinIO (the ``go`` line of its go.mod is 1.24.0).
MIN_GO_VERSION = (1, 24)


def _check_go_version(go: str) -> None:
    """Raise :class:`ServiceError` when ``go`` is older than :data:`MIN_GO_VERSION`."""
    output = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"go(\d+)\.(\d+)", output)
    if match is None:
        logger.warning("could not read the Go version from %r; trying the build anyway", output.strip())
        return
    found = (int(match.group(1)), int(match.group(2)))
    if found < MIN_GO_VERSION:
        raise ServiceError(
            f"Go {found[0]}.{found[1]} at {go} is too old to build MinIO: it needs Go "
            f"{MIN_GO_VERSION[0]}.{MIN_GO_VERSION[1]} or newer (Debian 12's golang package is 1.19). "
            "Install Go 1.24 or newer and put its bin folder first on PATH"
        )
