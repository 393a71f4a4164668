"""Fixtures of the streaming tests: per-test settings, the real worker process, and reading its output."""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from qcstream.settings import ENV_PREFIX, Settings

#: Upper bound for the whole pipeline to deliver (model loading, group join, scoring on CPU).
DEADLINE_S = 180.0


def worker_command() -> list[str]:
    if importlib.util.find_spec("qcstream.cli") is not None:
        return [sys.executable, "-m", "qcstream.cli", "worker"]
    code = (
        "from qcstream.settings import Settings\n"
        "from qcstream.streams.worker import run_worker\n"
        "run_worker(Settings.from_env())\n"
    )
    return [sys.executable, "-c", code]


def worker_env(settings: Settings) -> dict[str, str]:
    """Return the environment that makes ``Settings.from_env()`` in the worker equal ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env.update(settings.to_env())
    return env


def log_tail(log_path: Path, lines: int = 60) -> str:
    text = Path(log_path).read_text(errors="replace").splitlines()
    return "worker log (last lines):\n" + "\n".join(text[-lines:])


@pytest.fixture
def start_worker(tmp_path: Path):
    """Return a function that starts the worker process for some settings; every worker is stopped after the test.

    The output goes to ``worker-N.log`` in the test's folder, and ``process.log_tail()`` returns its end. The stop
    uses SIGTERM, so the worker leaves the consumer group. A killed worker would
    delay the next worker's group join until Kafka's session timeout.
    """
    started: list[subprocess.Popen] = []

    def start(settings: Settings) -> subprocess.Popen:
        log_path = tmp_path / f"worker-{len(started)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                worker_command(), env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
            )
        process.log_tail = functools.partial(log_tail, log_path)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture
def collect_messages():
    """Return a function that reads results, defects and dead letters until the expected counts arrive, then 3 s more."""

    def collect(settings: Settings, worker, expected_results: int, expected_letters: int) -> dict[str, list]:
        topics = (settings.topic_results, settings.topic_defects, settings.topic_dead_letter)
        consumer = KafkaConsumer(
            *topics, bootstrap_servers=settings.kafka_bootstrap.split(","), group_id=None, auto_offset_reset="earliest"
        )
        messages: dict[str, list] = {topic: [] for topic in topics}
        deadline = time.monotonic() + DEADLINE_S
        quiet_until = None
        try:
            while time.monotonic() < deadline and (quiet_until is None or time.monotonic() < quiet_until):
                assert worker.poll() is None, f"worker exited with {worker.returncode}\n{worker.log_tail()}"
                for records in consumer.poll(timeout_ms=1000).values():
                    for record in records:
                        messages[record.topic].append(record)
                done = (
                    len(messages[settings.topic_results]) >= expected_results
                    and len(messages[settings.topic_dead_letter]) >= expected_letters
                )
                if done and quiet_until is None:
                    quiet_until = time.monotonic() + 3.0  # a duplicate would show up here
        finally:
            consumer.close()
        return messages

    return collect
