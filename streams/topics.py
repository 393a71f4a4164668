"""The Kafka topics qcstream uses, and creating them on a broker.

Frames, results and labels are keyed by line id, so a line's events keep their order
within one partition. The partition count bounds how many worker processes share
the work.
"""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

from qcstream.settings import Settings

logger = logging.getLogger(__name__)

CLIENT_ID = "qcstream-admin"


def topic_names(settings: Settings) -> list[str]:
    """Return the names of the frames, results, defects, labels, dead-letter and alerts topics."""
    return [
        settings.topic_frames,
        settings.topic_results,
        settings.topic_defects,
        settings.topic_labels,
        settings.topic_dead_letter,
        settings.topic_alerts,
    ]


def ensure_topics(settings: Settings, partitions: int = 4, replication_factor: int = 1) -> list[str]:
    """Create the topics that do not exist yet and return the names created.

    Existing topics are left as they are, whatever their partition count.
    """
    if partitions < 1 or replication_factor < 1:
        raise ValueError(
            f"invalid partitions={partitions} or replication_factor={replication_factor}: both must be >= 1"
        )

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","), client_id=CLIENT_ID)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in topic_names(settings) if name not in existing]
        created = []
        for name in missing:
            spec = {name: {"num_partitions": partitions, "replication_factor": replication_factor}}
            try:
                admin.create_topics(spec, wait_for_metadata=True)
            except TopicAlreadyExistsError:
                logger.info("topic %s was created by another client meanwhile", name)
                continue
            created.append(name)
            logger.info("created topic %s with %d partitions", name, partitions)
        return created
    finally:
        admin.close()
