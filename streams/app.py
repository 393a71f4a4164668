"""The Faust application of the worker: topics, the inspect and sink agents, and the drift check timer.

All topics carry raw bytes: the agents decode the JSON records themselves, so that a
message that does not decode goes to the dead-letter topic instead of crashing the
stream inside Faust's deserializer.
"""

from __future__ import annotations

import dataclasses
import logging

import faust

from qcstream.settings import Settings
from qcstream.storage.objects import ObjectStore
from qcstream.streams.alerts import register_alert_timer
from qcstream.streams.inspect import Detector, FrameInspector, load_model, register_inspect_agent
from qcstream.streams.records import DeadLetter, InspectionResult
from qcstream.streams.sink import RecordSink, register_sink_agent

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Topics:
    """The app's Faust topics and the sends the agents make on them."""

    frames: faust.TopicT
    results: faust.TopicT
    defects: faust.TopicT
    labels: faust.TopicT
    dead_letter: faust.TopicT
    alerts: faust.TopicT
    #: ``results`` and ``labels`` read as one channel by the sink agent.
    sink_input: faust.TopicT

    async def publish_result(self, result: InspectionResult) -> None:
        """Send a result to ``results`` and, if defective, to ``defects``; keyed by line."""
        key = result.line_id.encode()
        value = result.dumps()
        await self.results.send(key=key, value=value)
        if result.is_defect:
            await self.defects.send(key=key, value=value)

    async def publish_dead_letter(self, letter: DeadLetter) -> None:
        key = letter.original_key.encode() if letter.original_key is not None else None
        await self.dead_letter.send(key=key, value=letter.dumps())


def broker_url(bootstrap: str) -> str:
    """Return Faust's broker URL for Kafka bootstrap servers ``host:port[,host:port...]``."""
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip())


def _declare_topics(app: faust.App, settings: Settings) -> Topics:
    def topic(*names: str) -> faust.TopicT:
        return app.topic(*names, key_serializer="raw", value_serializer="raw")

    return Topics(
        frames=topic(settings.topic_frames),
        results=topic(settings.topic_results),
        defects=topic(settings.topic_defects),
        labels=topic(settings.topic_labels),
        dead_letter=topic(settings.topic_dead_letter),
        alerts=topic(settings.topic_alerts),
        sink_input=topic(settings.topic_results, settings.topic_labels),
    )


def create_app(settings: Settings, detector: Detector | None = None) -> faust.App:
    """Return the worker's Faust app with its ``inspect`` and ``sink`` agents and the FNR drift timer.

    The app id ``settings.app_id`` is also the Kafka consumer group, so workers with
    the same id share the partitions. ``detector`` defaults to the fitted model in
    ``settings.model_dir``.
    """
    if detector is None:
        detector = load_model(settings.model_dir)

    app = faust.App(
        settings.app_id,
        broker=broker_url(settings.kafka_bootstrap),
        store="memory://",
        autodiscover=False,
        datadir=str(settings.home / "faust"),
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=settings.worker_web_port,
        consumer_auto_offset_reset="earliest",
    )
    topics = _declare_topics(app, settings)
    store = ObjectStore(settings)

    register_inspect_agent(app, topics, FrameInspector(settings, detector, store))
    register_sink_agent(app, topics, RecordSink(settings), settings)
    register_alert_timer(app, topics, settings)
    logger.info(
        "worker app %s ready: broker %s, model version %s, Parquet under %s",
        settings.app_id, settings.kafka_bootstrap, detector.version, settings.data_dir,
    )
    return app
