"""The sink agent: results and labels from Kafka to Parquet, in batches.

A batch closes after ``settings.sink_batch_size`` records or ``sink_batch_seconds``
seconds. Offsets are committed only after the batch is written, so a crash replays
it; readers deduplicate by frame id. Records that do not parse, and records whose
batch cannot be written after a few tries, go to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Sequence

import faust

from qcstream.settings import Settings
from qcstream.storage.parquet_mirror import ParquetMirror
from qcstream.storage.parquet_sink import LABELS, RESULTS, ParquetSink
from qcstream.streams.dead_letters import dead_letter
from qcstream.streams.records import DeadLetter, InspectionResult, Label, Record, RecordError

logger = logging.getLogger(__name__)

#: Seconds to wait before each new try of a failed Parquet write.
WRITE_RETRY_DELAYS = (1.0, 2.0, 4.0)


@dataclasses.dataclass
class Batch:
    """One batch of sink messages, sorted into records and dead letters."""

    results: list[InspectionResult] = dataclasses.field(default_factory=list)
    labels: list[Label] = dataclasses.field(default_factory=list)
    dead_letters: list[DeadLetter] = dataclasses.field(default_factory=list)
    #: The original (topic, key, value) of each record, to dead-letter it if writing fails.
    originals: list[tuple[str, bytes | None, bytes | None]] = dataclasses.field(default_factory=list)


class RecordSink:
    """Parses ``results`` and ``labels`` messages and writes them with :class:`ParquetSink`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        mirror = ParquetMirror.from_settings(settings)
        if mirror is not None:
            logger.info("the sink copies each Parquet file to %s", mirror.location)
        self.writers = {
            settings.topic_results: (InspectionResult, ParquetSink(settings.data_dir, RESULTS, mirror)),
            settings.topic_labels: (Label, ParquetSink(settings.data_dir, LABELS, mirror)),
        }

    def parse(self, messages: Sequence[tuple[str, bytes | None, bytes | None]]) -> Batch:
        """Sort ``(topic, key, value)`` messages into records and dead letters."""
        batch = Batch()
        for topic, key, value in messages:
            if topic not in self.writers:
                logger.error("sink got a message from unexpected topic %s; dead-lettering it", topic)
                batch.dead_letters.append(dead_letter(topic, f"unexpected topic {topic!r} for the sink", key, value))
                continue

            record_type = self.writers[topic][0]
            try:
                record: Record = record_type.loads(value if value is not None else b"")
            except RecordError as error:
                logger.warning("dead-lettering an invalid %s record from %s (key %r): %s",
                               record_type.kind, topic, key, error)
                batch.dead_letters.append(dead_letter(topic, f"invalid {record_type.kind} record: {error}", key, value))
                continue
            except Exception as error:  # e.g. JSON nested too deep to parse
                logger.exception("failed to parse a %s record from %s (key %r)", record_type.kind, topic, key)
                reason = f"invalid {record_type.kind} record: {type(error).__name__}: {error}"
                batch.dead_letters.append(dead_letter(topic, reason, key, value))
                continue

            (batch.results if record_type is InspectionResult else batch.labels).append(record)
            batch.originals.append((topic, key, value))
        return batch

    def write(self, batch: Batch) -> int:
        """Write the batch's results and labels (blocking); return the number of records."""
        written = 0
        for topic, records in ((self.settings.topic_results, batch.results), (self.settings.topic_labels, batch.labels)):
            if records:
                self.writers[topic][1].write_batch(records)
                written += len(records)
        return written

    async def write_with_retries(self, batch: Batch) -> list[DeadLetter]:
        """Write the batch, retrying; if all tries fail, return dead letters for its records."""
        loop = asyncio.get_running_loop()
        for attempt, delay in enumerate((*WRITE_RETRY_DELAYS, None), start=1):
            try:
                await loop.run_in_executor(None, self.write, batch)
                return []
            except Exception as error:
                if delay is None:
                    logger.exception("giving up writing %d results and %d labels to Parquet",
                                     len(batch.results), len(batch.labels))
                    reason = f"Parquet write failed: {type(error).__name__}: {error}"
                    return [dead_letter(topic, reason, key, value) for topic, key, value in batch.originals]
                logger.warning("Parquet write failed (attempt %d): %s; retrying in %.0f s", attempt, error, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns")


def register_sink_agent(app: faust.App, topics: Any, record_sink: RecordSink, settings: Settings) -> None:
    """Add the ``sink`` agent, reading ``topics.sink_input`` (results and labels), to ``app``."""

    async def sink(stream: faust.StreamT) -> None:
        logger.info("sink agent started: Parquet under %s", settings.data_dir)
        async for events in stream.take_events(settings.sink_batch_size, within=settings.sink_batch_seconds):
            try:
                batch = record_sink.parse([(event.message.topic, event.key, event.value) for event in events])
                letters = batch.dead_letters + await record_sink.write_with_retries(batch)
                for letter in letters:
                    await topics.publish_dead_letter(letter)
                logger.debug("sink wrote %d results and %d labels; %d dead letters",
                             len(batch.results), len(batch.labels), len(letters))
            except Exception:  # the sink must keep running
                logger.exception("sink failed on a batch of %d messages", len(events))

    app.agent(topics.sink_input, name="sink")(sink)
