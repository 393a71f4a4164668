"""Read the records other systems consume: defects, all results, dead letters, labels or alerts.

A subscriber is a plain Kafka consumer. Each message value is a JSON record
with a ``schema_version``; :func:`decode` checks it with the record class of the
topic, so a consumer built on this module rejects a major version it does not
know instead of misreading it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Iterator

from kafka import KafkaConsumer

from qcstream.settings import Settings
from qcstream.streams.records import Alert, DeadLetter, InspectionResult, Label, Record, RecordError

logger = logging.getLogger(__name__)

#: Topic names a user subscribes to, and the record class each carries.
STREAMS = {
    "defects": InspectionResult,
    "results": InspectionResult,
    "dead-letter": DeadLetter,
    "labels": Label,
    "alerts": Alert,
}


def topic_name(settings: Settings, stream: str) -> str:
    """Return the Kafka topic of ``stream`` under ``settings``; environment variables can rename topics."""
    topics = {
        "defects": settings.topic_defects,
        "results": settings.topic_results,
        "dead-letter": settings.topic_dead_letter,
        "labels": settings.topic_labels,
        "alerts": settings.topic_alerts,
    }
    if stream not in topics:
        raise ValueError(f"unknown stream {stream!r}; choose one of {', '.join(STREAMS)}")
    return topics[stream]


def decode(stream: str, raw: bytes) -> Record:
    """Decode one message of ``stream`` into its record, checking the schema version."""
    return STREAMS[stream].loads(raw)


def subscribe(
    settings: Settings,
    stream: str,
    group_id: str | None = None,
    from_beginning: bool = False,
    timeout_s: float | None = None,
) -> Iterator[tuple[Record | None, bytes, str | None]]:
    """Yield ``(record, raw value, error)`` for each message of ``stream`` as it arrives.

    ``record`` is None and ``error`` gives the reason when a message cannot be decoded,
    so a caller can log it and go on. With ``group_id`` the committed offsets of
    that consumer group are used; without one every call starts at the end (or at
    the beginning with ``from_beginning``). Stops after ``timeout_s`` seconds with
    no message, or never when it is None.
    """
    consumer = KafkaConsumer(
        topic_name(settings, stream),
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        group_id=group_id,
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=group_id is not None,
    )
    logger.info("Subscribed to %s (topic %s, group %s)", stream, topic_name(settings, stream), group_id or "none")
    last_message = time.monotonic()
    try:
        while timeout_s is None or time.monotonic() - last_message < timeout_s:
            for messages in consumer.poll(timeout_ms=1000).values():
                for message in messages:
                    last_message = time.monotonic()
                    try:
                        yield decode(stream, message.value), message.value, None
                    except RecordError as error:
                        yield None, message.value, str(error)
    finally:
        consumer.close()


def as_json_line(record: Record) -> str:
    """Encode ``record`` as one JSON line with its fields, ``schema_version`` and ``kind``, as on the topic."""
    return json.dumps(record.to_dict(), sort_keys=True)
