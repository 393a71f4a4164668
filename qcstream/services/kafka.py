"""Local Apache Kafka: one KRaft node (broker and controller) on 127.0.0.1.

The jars come from Maven Central through ``kafka-pom.xml`` and are cached in
``settings.home / "kafka-4.1.1"``; the broker's files live in a run folder.
"""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import time
import uuid
from importlib import resources
from pathlib import Path

from kafka import KafkaAdminClient

from qcstream.services.process import (
    ServiceError,
    ensure_port_free,
    failure_message,
    require_tool,
    running_pid,
    start_process,
    stop_process,
    wait_for_port,
    wait_until_ready,
)
from qcstream.settings import Settings

logger = logging.getLogger(__name__)

NAME = "kafka"
KAFKA_VERSION = "4.1.1"
HOST = "127.0.0.1"
#: Broker heap. An estimate: the pipeline's Kafka messages are small frame references.
HEAP = "768m"
READY_TIMEOUT = 90.0
_COMPLETE_MARKER = ".fetch-complete"


# --- cache: the jars ------------------------------------------------------


def cache_dir(settings: Settings) -> Path:
    return settings.home / f"kafka-{KAFKA_VERSION}"


def libs_dir(settings: Settings) -> Path:
    return cache_dir(settings) / "libs"


def is_fetched(settings: Settings) -> bool:
    """Tell whether a complete fetch of the jars is in the cache."""
    return (cache_dir(settings) / _COMPLETE_MARKER).exists() and libs_dir(settings).is_dir()


def fetch(settings: Settings) -> None:
    """Fetch the Kafka jars with Maven unless the cache already has them."""
    if is_fetched(settings):
        logger.debug("Kafka %s jars already in %s", KAFKA_VERSION, libs_dir(settings))
        return

    mvn = require_tool("mvn")
    root = cache_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    pom = root / "pom.xml"
    pom.write_bytes(resources.files("qcstream.services").joinpath("kafka-pom.xml").read_bytes())
    staging = root / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    fetch_log = root / "fetch.log"

    logger.info("Fetching Kafka %s jars from Maven Central into %s", KAFKA_VERSION, libs_dir(settings))
    started = time.monotonic()
    with open(fetch_log, "wb") as log_file:
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    if result.returncode != 0:
        summary = f"Maven failed to fetch the Kafka {KAFKA_VERSION} jars; check access to Maven Central and run again."
        raise ServiceError(failure_message(summary, fetch_log))

    shutil.rmtree(libs_dir(settings), ignore_errors=True)
    staging.replace(libs_dir(settings))
    (root / _COMPLETE_MARKER).write_text(f"kafka_2.13 {KAFKA_VERSION}\n")
    jar_count = len(list(libs_dir(settings).glob("*.jar")))
    logger.info("Fetched %d Kafka jars in %.1f s", jar_count, time.monotonic() - started)


# --- run folder: config, storage, process ---------------------------------


def run_dir(run_root: Path) -> Path:
    return run_root / NAME


def config_path(run_root: Path) -> Path:
    return run_dir(run_root) / "server.properties"


def log_path(run_root: Path) -> Path:
    return run_dir(run_root) / "kafka.log"


def pid_path(run_root: Path) -> Path:
    return run_dir(run_root) / "kafka.pid"


def data_dir(run_root: Path) -> Path:
    return run_dir(run_root) / "data"


def marker(run_root: Path) -> str:
    """Return the command-line argument that identifies the broker's process."""
    return str(config_path(run_root))


def address(settings: Settings) -> str:
    return f"{HOST}:{settings.kafka_port}"


def render_server_properties(settings: Settings, log_dirs: Path) -> str:
    """Return ``server.properties`` for one combined broker and controller.

    The controller quorum is static (``controller.quorum.voters``), so changing
    the controller port later needs no re-format.
    """
    broker = f"{HOST}:{settings.kafka_port}"
    controller = f"{HOST}:{settings.kafka_controller_port}"
    lines = [
        "# Written by qcstream.services on each start; edits are overwritten.",
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{controller}",
        f"listeners=PLAINTEXT://{broker},CONTROLLER://{controller}",
        f"advertised.listeners=PLAINTEXT://{broker}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={log_dirs}",
        "num.partitions=4",
        "auto.create.topics.enable=true",
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
    ]
    return "\n".join(lines) + "\n"


def render_log4j2_config() -> str:
    """Return a log4j2 config that writes INFO and above to stdout (the service log)."""
    lines = [
        "status = warn",
        "appender.stdout.type = Console",
        "appender.stdout.name = STDOUT",
        "appender.stdout.layout.type = PatternLayout",
        "appender.stdout.layout.pattern = [%d] %p %m (%c)%n",
        "rootLogger.level = INFO",
        "rootLogger.appenderRef.stdout.ref = STDOUT",
        "logger.request.name = kafka.request.logger",
        "logger.request.level = WARN",
    ]
    return "\n".join(lines) + "\n"


def new_cluster_id() -> str:
    """Return a random cluster id in Kafka's form: a UUID in URL-safe base64, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # A leading '-' would make the id look like a command-line flag.
            return text


def _java_argv(settings: Settings, run_root: Path, main_class: str, *args: str) -> list[str]:
    java = require_tool("java")
    log4j_config = run_dir(run_root) / "log4j2.properties"
    return [
        java,
        f"-Xmx{HEAP}",
        "-Xms256m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j_config}",
        "-cp",
        f"{libs_dir(settings)}/*",
        main_class,
        *args,
    ]


def write_config(settings: Settings, run_root: Path) -> None:
    """Write ``server.properties`` and the log4j2 config into the run folder."""
    run_dir(run_root).mkdir(parents=True, exist_ok=True)
    config_path(run_root).write_text(render_server_properties(settings, data_dir(run_root)))
    (run_dir(run_root) / "log4j2.properties").write_text(render_log4j2_config())


def format_storage(settings: Settings, run_root: Path) -> None:
    """Format the data folder with a new cluster id, once (skipped when formatted)."""
    if (data_dir(run_root) / "meta.properties").exists():
        return

    cluster_id = new_cluster_id()
    format_log = run_dir(run_root) / "format.log"
    logger.info("Formatting Kafka storage %s (cluster id %s)", data_dir(run_root), cluster_id)
    argv = _java_argv(
        settings, run_root, "kafka.tools.StorageTool",
        "format", "--config", str(config_path(run_root)), "--cluster-id", cluster_id,
    )
    with open(format_log, "wb") as log_file:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        summary = f"Kafka's StorageTool failed to format {data_dir(run_root)}; the log names the cause."
        raise ServiceError(failure_message(summary, format_log))


def check_ports(settings: Settings) -> None:
    """Raise a clear error when the broker's or the controller's port is unusable."""
    if settings.kafka_port == settings.kafka_controller_port:
        raise ServiceError(
            f"QCSTREAM_KAFKA_PORT and QCSTREAM_KAFKA_CONTROLLER_PORT are both {settings.kafka_port}; "
            "give the controller another port."
        )
    ensure_port_free(HOST, settings.kafka_port, service="Kafka", env_var="QCSTREAM_KAFKA_PORT")
    ensure_port_free(
        HOST, settings.kafka_controller_port, service="the Kafka controller", env_var="QCSTREAM_KAFKA_CONTROLLER_PORT"
    )


def start(settings: Settings, run_root: Path) -> int:
    """Write the config, format the storage if new, and start the broker; return its pid."""
    write_config(settings, run_root)
    format_storage(settings, run_root)
    argv = _java_argv(settings, run_root, "kafka.Kafka", str(config_path(run_root)))
    return start_process(
        argv, name="Kafka", log_path=log_path(run_root), pid_path=pid_path(run_root), cwd=run_dir(run_root)
    )


def is_ready(settings: Settings) -> bool:
    """Tell whether the broker responds to a metadata request (list topics)."""
    if not wait_for_port(HOST, settings.kafka_port, timeout=0.0):
        return False
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=address(settings),
            client_id="qcstream-services-check",
            request_timeout_ms=5000,
        )
    except Exception as exc:  # kafka-python raises several exception types while the broker starts.
        logger.debug("Kafka at %s not ready yet: %s", address(settings), exc)
        return False
    try:
        admin.list_topics()
        return True
    except Exception as exc:
        logger.debug("Kafka at %s not ready yet: %s", address(settings), exc)
        return False
    finally:
        admin.close()


def wait_ready(settings: Settings, run_root: Path, pid: int, timeout: float = READY_TIMEOUT) -> float:
    """Wait until the broker responds; return the seconds waited."""
    return wait_until_ready(
        name=f"Kafka on {address(settings)}",
        pid=pid,
        marker=marker(run_root),
        is_ready=lambda: is_ready(settings),
        log_path=log_path(run_root),
        timeout=timeout,
    )


def current_pid(run_root: Path, *, remove_stale: bool = True) -> int | None:
    return running_pid(pid_path(run_root), marker(run_root), remove_stale=remove_stale)


def stop(run_root: Path) -> bool:
    return stop_process(pid_path(run_root), marker(run_root), name="Kafka")
