"""Consumer lag of the worker's Kafka consumer group, per topic.

The worker's group is ``Settings.app_id``. The lag of a partition is its end offset
minus the group's committed offset. A partition where the group has committed
nothing counts from its beginning offset, because the worker starts reading a new
partition at its earliest message.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from qcstream.settings import Settings

logger = logging.getLogger(__name__)

#: Milliseconds that one Kafka request of the lag reader may take.
REQUEST_TIMEOUT_MS = 5000


def partition_lag(
    end_offsets: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, int | None],
    beginning_offsets: Mapping[TopicPartition, int],
) -> dict[str, int]:
    """Sum ``end - committed`` over the partitions of each topic into ``{topic: lag}``.

    A partition without a committed offset (missing, None or negative) counts from
    its beginning offset. A committed offset past the end counts as no lag.
    """
    lags: dict[str, int] = {}
    for partition, end in end_offsets.items():
        offset = committed.get(partition)
        if offset is None or offset < 0:
            offset = beginning_offsets.get(partition, 0)
        lags[partition.topic] = lags.get(partition.topic, 0) + max(0, end - offset)
    return lags


class LagReader:
    """Reads the lag of the worker's group on the frames and labels topics.

    Holds one admin client and one consumer without a group, made on first use and
    made again after a Kafka error. Safe to call from several threads.
    """

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.kafka_bootstrap
        self.group_id = settings.app_id
        self.topics = (settings.topic_frames, settings.topic_labels)
        self._lock = threading.Lock()
        self._admin: KafkaAdminClient | None = None
        self._consumer: KafkaConsumer | None = None
        self._failures = 0

    def read(self) -> dict[str, Any]:
        """Return ``{"group": ..., "topics": {topic: lag}, "error": None}``, or an ``error`` message when Kafka failed.

        A topic that does not exist yet is left out of ``topics``.
        """
        with self._lock:
            try:
                lags = self._read_locked()
            except (KafkaError, OSError) as error:
                self._failures += 1
                # The page requests the lag every few seconds, so only the first failure in a row and every 100th are logged.
                if self._failures % 100 == 1:
                    logger.warning(
                        "reading the lag of group %s at %s failed (%d time(s) in a row): %s",
                        self.group_id, self.bootstrap, self._failures, error,
                    )
                self._close_locked()
                return {
                    "group": self.group_id,
                    "topics": {},
                    "error": f"Kafka at {self.bootstrap} did not return the lag of group {self.group_id}: {error}",
                }
            if self._failures:
                logger.info("reading the lag of group %s works again after %d failure(s)", self.group_id, self._failures)
                self._failures = 0
        return {"group": self.group_id, "topics": lags, "error": None}

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _read_locked(self) -> dict[str, int]:
        if self._admin is None or self._consumer is None:
            servers = self.bootstrap.split(",")
            admin_options = _supported(KafkaAdminClient, bootstrap_timeout_ms=REQUEST_TIMEOUT_MS)
            self._admin = KafkaAdminClient(
                bootstrap_servers=servers,
                client_id="qcstream-dashboard-lag",
                request_timeout_ms=REQUEST_TIMEOUT_MS,
                **admin_options,
            )
            # A metadata request must not create a topic that the worker has not created yet.
            options = _supported(KafkaConsumer, bootstrap_timeout_ms=REQUEST_TIMEOUT_MS, allow_auto_create_topics=False)
            self._consumer = KafkaConsumer(
                bootstrap_servers=servers,
                client_id="qcstream-dashboard-lag",
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=REQUEST_TIMEOUT_MS + 1000,
                **options,
            )

        partitions = []
        for topic in self.topics:
            numbers = self._consumer.partitions_for_topic(topic)
            partitions.extend(TopicPartition(topic, number) for number in sorted(numbers or ()))
        if not partitions:
            return {}

        committed = {partition: metadata.offset for partition, metadata in self._committed(partitions).items()}
        end_offsets = self._consumer.end_offsets(partitions)
        beginning_offsets = self._consumer.beginning_offsets(partitions)
        return partition_lag(end_offsets, committed, beginning_offsets)

    def _committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, Any]:
        # kafka-python 3 renamed list_consumer_group_offsets (2.x) to list_group_offsets.
        if hasattr(self._admin, "list_group_offsets"):
            return self._admin.list_group_offsets({self.group_id: partitions}).get(self.group_id, {})
        return self._admin.list_consumer_group_offsets(self.group_id, partitions=partitions)

    def _close_locked(self) -> None:
        for client in (self._admin, self._consumer):
            if client is None:
                continue
            try:
                client.close()
            except (KafkaError, OSError) as error:
                logger.debug("closing a Kafka client of the lag reader failed: %s", error)
        self._admin = None
        self._consumer = None


def _supported(client_class: type, **options: Any) -> dict[str, Any]:
    """Keep the ``options`` that this kafka-python version supports, because 2.0 lacks some and rejects unknown ones."""
    return {name: value for name, value in options.items() if name in client_class.DEFAULT_CONFIG}
